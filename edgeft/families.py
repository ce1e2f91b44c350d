"""Model families between llama.cpp and mlx-lm: names, hyper-parameters, tensor names, Q/K rows.

`FAMILIES` is the one table of supported families: a new one is added there (its GGUF
architecture, the Hugging Face model_type values that load as it, its mlx-lm module, its
RoPE convention), then taught its differences below. Everything else is a small pure function
over plain values, so the loader (GGUF in) and the exporter (GGUF out) share one definition of
each convention. Metadata keys are gguf-py's own (`gguf.Keys`). Metadata dicts are shaped like
`mx.load(path, return_metadata=True)` returns them: strings and string lists as Python values,
numbers as `mx.array` scalars or arrays (plain Python numbers and NumPy work too).

Over 400 lines because its one job is every family's conventions, side by side: the loader,
the exporter and the verifier must read each from the same place (gemma's own section below).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gguf
import numpy as np
from gguf import Keys

from edgeft.gguf_reader import ModelLoadError, scalar
from edgeft.rope_scaling import (
    DEFAULT_ROPE_THETA,
    LLAMA3_ORIGINAL_CONTEXT,
    PHI3_LONGROPE_TYPES,
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS_TENSOR,
    llama3_scaling_from_rope_freqs,
    phi3_attn_factor,
)


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF general.architecture
    model_types: tuple[str, ...]  # Hugging Face / mlx-lm config model_type values of the family
    mlx_module: str  # mlx_lm.models.<mlx_module> holds its Model and ModelArgs
    # llama.cpp's converter permutes llama Q/K rows for its "norm" RoPE, which is MLX's
    # traditional (interleaved) RoPE; qwen2/qwen3 keep the HF rows and use "neox" RoPE.
    rope_traditional: bool


FAMILIES = (
    Family("llama", ("llama", "mistral"), "llama", rope_traditional=True),
    Family("qwen2", ("qwen2",), "qwen2", rope_traditional=False),
    Family("qwen3", ("qwen3",), "qwen3", rope_traditional=False),
    Family("phi3", ("phi3",), "phi3", rope_traditional=False),
    # "gemma3" is also Hugging Face's multimodal wrapper: its text_config is what loads
    Family("gemma3", ("gemma3", "gemma3_text"), "gemma3_text", rope_traditional=False),
    Family("gemma2", ("gemma2",), "gemma2", rope_traditional=False),
)
ARCHITECTURES = tuple(f.arch for f in FAMILIES)
MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}

DEFAULT_CONTEXT_LENGTH = 4096
MAX_DIM = 1 << 24  # no model dimension or count comes near this; corrupt headers do


def unsupported_arch_error(arch: Any) -> ModelLoadError:
    return ModelLoadError(f"unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")


def family(model_type: Any) -> Family:
    """The family of a config's model_type (a GGUF architecture names its own family)."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except (KeyError, TypeError):
        raise unsupported_arch_error(model_type) from None


# --- metadata <-> config -------------------------------------------------------------------
def _get(md: dict, key: str, arch: str, default: Any = None) -> Any:
    value = md.get(key.format(arch=arch))
    return default if value is None else scalar(value)


def _require(md: dict, key: str, arch: str) -> Any:
    value = _get(md, key, arch)
    if value is None:
        raise ModelLoadError(f"GGUF metadata lacks {key.format(arch=arch)}; the file is incomplete")
    return value


def metadata_to_config(
    md: dict, tensor_names: set[str] | list[str], rope_tensors: dict[str, np.ndarray] | None = None
) -> dict:
    """GGUF metadata (+ the tensor names) -> mlx-lm ModelArgs dict.

    `tensor_names` decides tie_word_embeddings (no `output.weight`) and biases;
    `rope_tensors` holds the file's ROPE_TENSORS by name (llama 3.1+'s `rope_freqs.weight`,
    phi3 LongRoPE's factor pair), if any.
    """
    rope_tensors = rope_tensors or {}
    arch = scalar(md.get(Keys.General.ARCHITECTURE))
    if arch not in ARCHITECTURES:
        raise unsupported_arch_error(arch)
    names = set(tensor_names)
    hidden = int(_require(md, Keys.LLM.EMBEDDING_LENGTH, arch))
    n_heads = int(_require(md, Keys.Attention.HEAD_COUNT, arch))
    n_kv = int(_get(md, Keys.Attention.HEAD_COUNT_KV, arch, n_heads))
    head_dim = int(_get(md, Keys.Attention.KEY_LENGTH, arch, hidden // n_heads))
    rope_dim = int(_get(md, Keys.Rope.DIMENSION_COUNT, arch, head_dim))
    if rope_dim != head_dim and arch != "phi3":
        raise ModelLoadError(
            f"partial RoPE ({rope_dim} of {head_dim} dims) is not supported for {arch}"
        )
    vocab = _get(md, Keys.LLM.VOCAB_SIZE, arch) or len(md.get(Keys.Tokenizer.LIST) or [])
    if not vocab:
        raise ModelLoadError("GGUF metadata has neither a vocab size nor a token list")
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(md, Keys.LLM.BLOCK_COUNT, arch)),
        "intermediate_size": int(_require(md, Keys.LLM.FEED_FORWARD_LENGTH, arch)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_require(md, Keys.Attention.LAYERNORM_RMS_EPS, arch)),
        "vocab_size": int(vocab),
        "rope_theta": float(_get(md, Keys.Rope.FREQ_BASE, arch, DEFAULT_ROPE_THETA)),
        "max_position_embeddings": int(_get(md, Keys.LLM.CONTEXT_LENGTH, arch, DEFAULT_CONTEXT_LENGTH)),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_traditional": family(arch).rope_traditional,
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    if arch in GEMMA_ARCHS:
        cfg.update(gemma_metadata_to_config(md, arch, cfg))
    if arch == "qwen2" and head_dim * n_heads != hidden:
        raise ModelLoadError(
            f"qwen2 with head_dim {head_dim} != hidden/heads is not supported by mlx-lm's qwen2"
        )
    if arch == "phi3":
        cfg.update(_phi3_config(md, cfg, rope_dim, rope_tensors))
        return cfg
    scaling = _rope_scaling(md, arch, cfg, rope_tensors.get(ROPE_FREQS_TENSOR))
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def check_config(cfg: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse hyper-parameters that do not fit the tensors the file holds, before a model of
    that size is built (a corrupt header could otherwise ask for terabytes)."""
    def fail(what: str):
        raise ModelLoadError(f"GGUF metadata does not match the tensors: {what}; the file is corrupt")

    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size"):
        if not 1 <= cfg[key] <= MAX_DIM:
            fail(f"{key} is {cfg[key]}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        fail(f"{cfg['num_attention_heads']} heads do not split into {cfg['num_key_value_heads']} KV groups")
    if not (cfg["rms_norm_eps"] > 0 and math.isfinite(cfg["rms_norm_eps"])):
        fail(f"rms_norm_eps is {cfg['rms_norm_eps']}")
    blocks = {int(n.split(".")[1]) for n in shapes if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if cfg["num_hidden_layers"] > len(blocks):  # extra blocks: the loader names the tensor
        fail(f"block_count is {cfg['num_hidden_layers']} but the file has {len(blocks)} blocks")
    hidden, vocab, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    fused = cfg["model_type"] == "phi3"  # gate+up and q+k+v in one tensor each
    expect = {
        "token_embd.weight": (hidden, vocab),
        "blk.0.ffn_up.weight": (hidden, 2 * inter if fused else inter),
        "blk.0.attn_q.weight": (hidden, heads * head_dim),
        "blk.0.attn_qkv.weight": (hidden, (heads + 2 * kv) * head_dim),
    }
    for name, shape in expect.items():
        if name in shapes and tuple(shapes[name]) != shape:
            fail(f"{name} is {list(shapes[name])}, the metadata implies {list(shape)}")


def _rope_scaling(md: dict, arch: str, cfg: dict, rope_freqs) -> dict | None:
    if rope_freqs is not None:
        orig = _get(md, Keys.Rope.SCALING_ORIG_CTX_LEN, arch, LLAMA3_ORIGINAL_CONTEXT)
        return llama3_scaling_from_rope_freqs(
            np.asarray(rope_freqs), cfg["rope_theta"], cfg["head_dim"], int(orig)
        )
    kind = _get(md, Keys.Rope.SCALING_TYPE, arch)
    factor = _get(md, Keys.Rope.SCALING_FACTOR, arch)
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = _get(md, Keys.Rope.SCALING_ORIG_CTX_LEN, arch, cfg["max_position_embeddings"])
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(orig)}
    raise ModelLoadError(f"RoPE scaling type {kind!r} is not supported (linear, yarn, llama3)")


def config_to_metadata(cfg: dict) -> dict:
    """mlx-lm ModelArgs dict -> GGUF architecture metadata (Python values; no tokenizer).

    llama 3 and phi3 LongRoPE scaling have no metadata form: write `rope_tensors(cfg)` as
    tensors beside it
    (edgeft.rope_scaling.rope_tensors).
    """
    arch = family(cfg.get("model_type")).arch
    n_heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    if arch == "phi3":
        head_dim = int(cfg["hidden_size"]) // n_heads  # mlx-lm's phi3 has no head_dim of its own
    k = lambda key: key.format(arch=arch)  # noqa: E731
    md = {
        Keys.General.ARCHITECTURE: arch,
        k(Keys.LLM.CONTEXT_LENGTH): int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        k(Keys.LLM.EMBEDDING_LENGTH): int(cfg["hidden_size"]),
        k(Keys.LLM.BLOCK_COUNT): int(cfg["num_hidden_layers"]),
        k(Keys.LLM.FEED_FORWARD_LENGTH): int(cfg["intermediate_size"]),
        k(Keys.Attention.HEAD_COUNT): n_heads,
        k(Keys.Attention.HEAD_COUNT_KV): int(cfg.get("num_key_value_heads") or n_heads),
        k(Keys.Attention.KEY_LENGTH): head_dim,
        k(Keys.Attention.VALUE_LENGTH): head_dim,
        k(Keys.Rope.DIMENSION_COUNT): head_dim,
        k(Keys.Attention.LAYERNORM_RMS_EPS): float(cfg["rms_norm_eps"]),
        k(Keys.Rope.FREQ_BASE): float(cfg.get("rope_theta") or DEFAULT_ROPE_THETA),
        k(Keys.LLM.VOCAB_SIZE): int(cfg["vocab_size"]),
    }
    if arch == "phi3":
        md.update(_phi3_metadata(cfg, k))
        return md
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("linear", "yarn"):
        md[k(Keys.Rope.SCALING_TYPE)] = kind
        md[k(Keys.Rope.SCALING_FACTOR)] = float(scaling["factor"])
    if kind == "yarn" and "original_max_position_embeddings" in scaling:
        md[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] = int(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        md[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] = int(
            scaling.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT)
        )
    elif kind not in (None, "default", "linear", "yarn"):
        raise ModelLoadError(f"RoPE scaling {kind!r} cannot be written to GGUF")
    if arch in GEMMA_ARCHS:
        md.update(gemma_config_to_metadata(cfg, arch))
    return md


# --- phi3 ----------------------------------------------------------------------------------
# llama.cpp's Phi3MiniModel converter: partial RoPE as a rope dimension count, the original
# context always written, sliding_window written (0 if none; llama.cpp's runtime disables
# phi3's SWA, and mlx-lm's phi3 has none, so both attend to the whole context), LongRoPE
# ("su"/"longrope") as the rope_factors_long/short tensors plus rope.scaling.attn_factor.
PHI3_ORIGINAL_CONTEXT = 4096  # mlx-lm's phi3 default


def _phi3_metadata(cfg: dict, k) -> dict:
    rope_dim = int(float(cfg.get("partial_rotary_factor", 1.0)) * int(cfg["hidden_size"])) // int(cfg["num_attention_heads"])
    original = int(cfg.get("original_max_position_embeddings") or PHI3_ORIGINAL_CONTEXT)
    md = {
        k(Keys.Rope.DIMENSION_COUNT): rope_dim,
        k(Keys.Rope.SCALING_ORIG_CTX_LEN): original,
        k(Keys.Attention.SLIDING_WINDOW): int(cfg.get("sliding_window") or 0),
    }
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in PHI3_LONGROPE_TYPES:
        for name in ("long_factor", "short_factor"):
            if len(scaling.get(name) or ()) != rope_dim // 2:
                raise ModelLoadError(f"phi3 rope_scaling.{name} must hold {rope_dim // 2} values (rope dims / 2)")
        md[k(Keys.Rope.SCALING_ATTN_FACTOR)] = phi3_attn_factor(
            int(cfg["max_position_embeddings"]), original)
    elif kind not in (None, "default"):
        raise ModelLoadError(f"phi3 RoPE scaling {kind!r} is not supported (longrope, su)")
    return md


def _phi3_config(md: dict, cfg: dict, rope_dim: int, rope_tensors: dict) -> dict:
    arch = "phi3"
    if cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ModelLoadError("phi3 with head_dim != hidden/heads is not supported by mlx-lm's phi3")
    out = {
        "original_max_position_embeddings": int(
            _get(md, Keys.Rope.SCALING_ORIG_CTX_LEN, arch, cfg["max_position_embeddings"])),
    }
    if rope_dim != cfg["head_dim"]:
        out["partial_rotary_factor"] = rope_dim / cfg["head_dim"]
    window = int(_get(md, Keys.Attention.SLIDING_WINDOW, arch, 0))
    if window:
        out["sliding_window"] = window
    long, short = rope_tensors.get(ROPE_FACTORS_LONG), rope_tensors.get(ROPE_FACTORS_SHORT)
    if (long is None) != (short is None):
        raise ModelLoadError(f"the file has only one of {ROPE_FACTORS_LONG} and {ROPE_FACTORS_SHORT}")
    if long is not None:
        out["rope_scaling"] = {
            "type": "longrope",
            "long_factor": [float(x) for x in np.asarray(long).reshape(-1)],
            "short_factor": [float(x) for x in np.asarray(short).reshape(-1)],
        }
        attn = _get(md, Keys.Rope.SCALING_ATTN_FACTOR, arch)
        want = phi3_attn_factor(cfg["max_position_embeddings"], out["original_max_position_embeddings"])
        if attn is not None and not math.isclose(float(attn), want, rel_tol=1e-4):
            raise ModelLoadError(
                f"{arch}.rope.scaling.attn_factor is {float(attn):g}, but LongRoPE over "
                f"{cfg['max_position_embeddings']} of {out['original_max_position_embeddings']} "
                f"positions implies {want:g}; the file's RoPE is not one mlx-lm can run")
    return out


# --- tensor names ------------------------------------------------------------------------
# mlx-lm names its parameters as Hugging Face does; gguf-py's TensorNameMap is llama.cpp's own
# map from those names to GGUF's, per architecture (gemma's post_attention_layernorm is not
# llama's). The reverse is ambiguous in general (llama's ffn_up is up_proj or gate_up_proj), so
# it is made from the names of the model at hand.
# .weight/.bias are the tensor itself; .scales/.biases are MLX affine quantization parts
SUFFIXES = ("weight", "bias", "scales", "biases")
_MLX_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.")
_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


@lru_cache(maxsize=None)
def _tensor_name_map(arch: str) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(_ARCH_ENUM[arch], 1)


def mlx_to_gguf_name(name: str, arch: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` in a model of GGUF
    architecture `arch`; None if llama.cpp has no such tensor."""
    base, _, suffix = name.rpartition(".")
    if suffix not in SUFFIXES or arch not in _ARCH_ENUM:
        return None
    layer = _MLX_LAYER_RE.match(base)
    generic = _MLX_LAYER_RE.sub("model.layers.0.", base, count=1) if layer else base
    mapped = _tensor_name_map(arch).get_name(generic)
    if mapped is None or (layer is None) != (_GGUF_LAYER_RE.match(mapped) is None):
        return None
    if layer:
        mapped = _GGUF_LAYER_RE.sub(f"blk.{layer.group(1)}.", mapped, count=1)
    return f"{mapped}.{suffix}"


def mlx_names_by_gguf(mlx_names, arch: str) -> dict[str, str]:
    """GGUF name -> mlx-lm name for the parameters `mlx_names` of a model of `arch`, each with
    every suffix (a quantized file brings .scales/.biases where the model has .weight)."""
    out = {}
    for name in mlx_names:
        base = name.rpartition(".")[0]
        for suffix in SUFFIXES:
            gguf_name = mlx_to_gguf_name(f"{base}.{suffix}", arch)
            if gguf_name is not None:
                out[gguf_name] = f"{base}.{suffix}"
    return out


# --- LoRA targets ---------------------------------------------------------------------------
# Hugging Face's split projection names -> the fused layer that holds them in families that
# fuse (phi3: qkv_proj, gate_up_proj). llama.cpp adapts whole GGUF tensors, so a LoRA target
# named by a split projection adapts its fused layer.
FUSED_PROJECTIONS = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}


# --- llama.cpp's Q/K row permutation -----------------------------------------------------
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order -> llama.cpp's (convert_hf_to_gguf `permute`), for llama-family Q and K.

    Use n_heads = num_attention_heads for Q and num_key_value_heads for K. Works on any
    array whose first axis is the output rows: weights, biases, and MLX packed quantized
    weights/scales/biases alike, since rows are permuted whole.
    """
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def qk_heads(mlx_name: str, config: dict) -> int | None:
    """Heads of a Q or K projection (by its MLX name), whose rows llama.cpp permutes; None for
    any other tensor."""
    if ".self_attn.q_proj." in mlx_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in mlx_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def needs_qk_permute(config: dict, qk_layout: str) -> bool:
    """llama.cpp's llama family wants permuted Q/K rows; an "hf" model does not have them."""
    return qk_layout == "hf" and family(config["model_type"]).rope_traditional


# --- gemma2 / gemma3 -----------------------------------------------------------------------
# What llama.cpp's runtime (src/models/gemma2.cpp, gemma3.cpp) reads from a gemma GGUF, and
# what it assumes when a key is absent; mlx-lm's gemma2 / gemma3_text classes take the same
# facts as ModelArgs. A value the runtime would compute differently is refused in one line.
GEMMA_ARCHS = ("gemma2", "gemma3")
LLAMA_CPP_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # every n-th layer is global
LLAMA_CPP_SWA_ROPE_BASE = 10000.0  # gemma3's local-layer RoPE base when the file has none
GEMMA2_WINDOW = 4096  # gemma2's sliding window when the file has none
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# llama.cpp scales queries by 1/sqrt(hidden/heads) at these depths (the 27B models), by
# 1/sqrt(head_dim) otherwise; no metadata key carries query_pre_attn_scalar.
LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def norm_offset(mlx_name: str, arch: str) -> float:
    """What a GGUF holds over the mlx-lm parameter `mlx_name`: gemma's RMSNorm multiplies by
    1 + w and mlx-lm (like Hugging Face) holds w, while llama.cpp's converter stores w + 1 for
    every `*norm.weight` and its runtime multiplies by the stored value. Added on export,
    subtracted on load."""
    return 1.0 if arch in GEMMA_ARCHS and mlx_name.endswith("norm.weight") else 0.0


def llama_cpp_query_scalar(arch: str, n_layers: int, hidden: int, n_heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp applies to a gemma model of this shape."""
    return hidden // n_heads if n_layers == LLAMA_CPP_27B_LAYERS[arch] else head_dim


def gemma_swa_pattern(is_swa: list[bool]) -> int:
    """mlx-lm's sliding_window_pattern p (layer i is global iff i % p == p - 1) for a GGUF's
    per-layer sliding flags; refuses a layout that p cannot express."""
    flags = [bool(x) for x in is_swa]
    p = flags.index(False) + 1 if False in flags else len(flags) + 1  # all sliding: n + 1
    if flags != [i % p != p - 1 for i in range(len(flags))]:
        raise ModelLoadError(
            "the sliding-window layer layout is not every-n-th-layer-global, as mlx-lm's gemma needs"
        )
    return p


def gemma_metadata_to_config(md: dict, arch: str, cfg: dict) -> dict:
    """The gemma fields of an mlx-lm ModelArgs dict, from GGUF metadata as llama.cpp reads it."""
    out = {"query_pre_attn_scalar": float(llama_cpp_query_scalar(
        arch, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]))}
    window = _get(md, Keys.Attention.SLIDING_WINDOW, arch)
    pattern = md.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if pattern is not None:
        pattern = np.asarray(pattern).reshape(-1)
        if pattern.size == 1 and pattern.dtype != np.bool_:  # llama.cpp's n: 0 means all sliding
            pattern = int(pattern[0]) or cfg["num_hidden_layers"] + 1
        else:
            pattern = gemma_swa_pattern(list(pattern))
    local_base = _get(md, Keys.Rope.FREQ_BASE_SWA, arch)
    if arch == "gemma2":
        if pattern not in (None, LLAMA_CPP_SWA_PATTERN[arch]):
            raise ModelLoadError(f"gemma2 with sliding window pattern {pattern} is not supported (mlx-lm's is 2)")
        if local_base is not None and float(local_base) != cfg["rope_theta"]:
            raise ModelLoadError("gemma2 with a local-layer RoPE base of its own is not supported by mlx-lm's gemma2")
        out["sliding_window"] = int(window or GEMMA2_WINDOW)
        for key, default in GEMMA2_SOFTCAPS.items():
            out[key] = float(_get(md, getattr(Keys.LLM, key.upper()), arch, default))
        return out
    if _get(md, Keys.LLM.FINAL_LOGIT_SOFTCAPPING, arch):
        raise ModelLoadError("gemma3 with final logit soft-capping is not supported by mlx-lm's gemma3_text")
    if not window:  # llama.cpp: no sliding window, every layer global
        window, pattern = cfg["max_position_embeddings"], 1
    out.update(sliding_window=int(window),
               sliding_window_pattern=LLAMA_CPP_SWA_PATTERN[arch] if pattern is None else pattern,
               rope_local_base_freq=float(LLAMA_CPP_SWA_ROPE_BASE if local_base is None else local_base))
    return out


def gemma_config_to_metadata(cfg: dict, arch: str) -> dict:
    """The gemma keys of a GGUF for an mlx-lm ModelArgs dict (see gemma_metadata_to_config)."""
    check_gemma_config(cfg)
    k = lambda key: key.format(arch=arch)  # noqa: E731
    if arch == "gemma2":
        md = {k(Keys.Attention.SLIDING_WINDOW): int(cfg.get("sliding_window") or GEMMA2_WINDOW)}
        for key, default in GEMMA2_SOFTCAPS.items():
            md[k(getattr(Keys.LLM, key.upper()))] = float(cfg.get(key, default))
        return md
    return {
        k(Keys.Attention.SLIDING_WINDOW): int(cfg.get("sliding_window", 512)),
        k(Keys.Attention.SLIDING_WINDOW_PATTERN): int(cfg.get("sliding_window_pattern", 6)),
        k(Keys.Rope.FREQ_BASE_SWA): float(cfg.get("rope_local_base_freq", LLAMA_CPP_SWA_ROPE_BASE)),
    }


def check_gemma_config(cfg: dict) -> None:
    """Refuse a gemma config that mlx-lm or llama.cpp would compute differently from the
    model: an attention scale llama.cpp cannot take, soft-capping the class ignores (gemma3)
    or lacks (gemma2), a layer layout other than mlx-lm's every-n-th-layer-global."""
    arch = family(cfg.get("model_type")).arch
    n_heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    want = llama_cpp_query_scalar(arch, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), n_heads, head_dim)
    got = cfg.get("query_pre_attn_scalar", 256 if arch == "gemma3" else 144)
    if float(got) != want:
        raise ModelLoadError(
            f"{arch} with query_pre_attn_scalar {got} is not supported: llama.cpp scales queries "
            f"by 1/sqrt({want}) for this shape"
        )
    if arch == "gemma2":
        for key in GEMMA2_SOFTCAPS:
            if key in cfg and not cfg[key]:
                raise ModelLoadError(f"gemma2 without {key} is not supported (llama.cpp and mlx-lm apply it)")
        return
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key):
            raise ModelLoadError(f"gemma3 with {key} is not supported by mlx-lm's gemma3_text")
    pattern = int(cfg.get("sliding_window_pattern", 6))
    if pattern < 1:
        raise ModelLoadError(f"gemma3 with sliding_window_pattern {pattern} is not supported")
    types = cfg.get("layer_types")
    if types is not None and list(types) != [
        "full_attention" if i % pattern == pattern - 1 else "sliding_attention" for i in range(len(types))
    ]:
        raise ModelLoadError(
            f"gemma3 layer_types do not follow sliding_window_pattern {pattern}, as mlx-lm's gemma3_text needs"
        )


def gemma_folder_config(config: dict) -> dict:
    """A Hugging Face gemma config as mlx-lm's class reads it: a multimodal gemma3's
    text_config, the sliding pattern from layer_types when only those are given; checked."""
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": "gemma3_text"}
    types = config.get("layer_types")
    if config.get("model_type") == "gemma3_text" and types and "sliding_window_pattern" not in config:
        global_layers = [i for i, t in enumerate(types) if t == "full_attention"]
        config = {**config, "sliding_window_pattern": global_layers[0] + 1 if global_layers else len(types) + 1}
    check_gemma_config(config)
    return config
