"""Tiny random models written as real files, for tests of loading, data, training and export.

    from tiny import make_tiny, make_tiny_folder      # tests/ is on sys.path under pytest

    path, ref_model, cfg = make_tiny("llama", tmp_path)               # f32 GGUF
    path, ref_model, cfg = make_tiny("qwen2", tmp_path, quant="q4_0")  # 4-bit GGUF
    folder, ref_model, cfg = make_tiny_folder("qwen3", tmp_path)       # HF-style folder

Each model: 2 layers, hidden 64, 4 heads (head_dim 16), 2 KV heads, intermediate 128, and a
byte-level BPE vocabulary of 300 tokens: ids 0-2 are the specials <|endoftext|> (BOS),
<|im_start|>, <|im_end|> (EOS, the only stop id), then the 256 byte tokens, then 41 merges;
the chat template is ChatML; add_bos is off. `make_tiny(..., tokenizer="spm")` writes a
300-token SentencePiece vocabulary instead (<unk> <s> </s>, BOS 1, EOS 2, add_bos on).
`ref_model` is an mlx-lm model holding exactly the weights the file holds (for quantized
files, gguf-py's dequantization of them), built with `cfg`, the ModelArgs dict edgeft's
loader should produce for the file. The same `seed` gives the same underlying weights in
both forms: the folder keeps Hugging Face's Q/K row order (`rope_traditional=False`), the
GGUF llama.cpp's permuted one (`rope_traditional=True` for llama), so both compute the same
function.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import Keys, TokenType
from mlx.utils import tree_flatten

import edgeft  # noqa: F401  (BLAS before mlx)
from edgeft import families as F
from edgeft.chat_template import CHATML_TEMPLATE
from edgeft.gguf_writer import write_metadata
from edgeft.loader import build_model as edgeft_build_model
from edgeft.loader import sanitized
from edgeft.rope_scaling import ROPE_TENSORS

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS = "<|endoftext|>", "<|im_end|>"
MERGES = (
    "Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a n", "Ġ w", "o u",
    "Ġ c", "a t", "e n", "Ġ o", "i s", "Ġ f", "Ġ b", "o r", "e s", "in g", "Ġ p", "Ġ m",
    "l l", "Ġ d", "a r", "Ġ h", "Ġ i", "i t", "a l", "l e", "Ġ l", "e d", "Ġ n", "o m",
    "Ġ g", "Ġ y", "Ġ u", "s t", "Ġo f",
)
ARCHS = ("llama", "qwen2", "qwen3")
# More families, proven in their own test file (ARCHS run through every shared test):
# phi3 (fused qkv_proj/gate_up_proj, neox RoPE) and mistral (llama's GGUF architecture).
PHI3_MISTRAL_ARCHS = ("phi3", "mistral")
# Not in ARCHS (the shared loader/export tests run over those); tests/test_family_gemma.py
# runs these. gemma3 has 6 layers so its pattern holds 5 sliding layers and a global one.
GEMMA_ARCHS = ("gemma3", "gemma2")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM",
                    "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokens() -> list[str]:
    return list(SPECIALS) + _byte_chars() + [m.replace(" ", "") for m in MERGES]


def tiny_tokenizer_metadata() -> dict:
    """GGUF tokenizer keys of the tiny byte-level BPE (ChatML template)."""
    tokens = tiny_tokens()
    return {
        Keys.Tokenizer.MODEL: "gpt2",
        Keys.Tokenizer.PRE: "smollm",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.TOKEN_TYPE: [TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)),
        Keys.Tokenizer.MERGES: list(MERGES),
        Keys.Tokenizer.BOS_ID: tokens.index(BOS),
        Keys.Tokenizer.EOS_ID: tokens.index(EOS),
        Keys.Tokenizer.PAD_ID: tokens.index(BOS),
        Keys.Tokenizer.ADD_BOS: False,
        Keys.Tokenizer.CHAT_TEMPLATE: CHATML_TEMPLATE,
    }


SPM_PIECES = (
    "▁", "e", "t", "a", "o", "i", "n", "s", "h", "r", "d", "l", "u", "c", "m", "w", "f", "g",
    "y", "p", "b", "▁t", "he", "▁a", "in", "er", "on", "▁s", "re", "an", "▁w", "▁the", "at",
    "en", "is", "ing", "▁c", "▁of", "▁i", "it", "ed",
)


def spm_tokenizer_metadata() -> dict:
    """GGUF keys of a tiny SentencePiece ("llama") vocabulary, also 300 tokens: <unk> <s>
    </s> (BOS 1, EOS 2, add_bos on), 256 byte-fallback tokens, 41 scored pieces; ChatML."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    return {
        Keys.Tokenizer.MODEL: "llama",
        Keys.Tokenizer.PRE: None,
        Keys.Tokenizer.MERGES: None,
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.SCORES: [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
        Keys.Tokenizer.TOKEN_TYPE: [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
        + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(SPM_PIECES),
        Keys.Tokenizer.BOS_ID: 1,
        Keys.Tokenizer.EOS_ID: 2,
        Keys.Tokenizer.UNK_ID: 0,
        Keys.Tokenizer.PAD_ID: None,
        Keys.Tokenizer.ADD_BOS: True,
        Keys.Tokenizer.CHAT_TEMPLATE: CHATML_TEMPLATE,
    }


def tiny_config(arch: str = "llama", tie: bool = True, **overrides) -> dict:
    """Hugging Face-style config (Q/K in HF row order: rope_traditional False)."""
    if arch in GEMMA_ARCHS:
        return gemma_tiny_config(arch, tie, **overrides)
    if arch not in ARCHS + PHI3_MISTRAL_ARCHS:
        raise ValueError(f"arch must be one of {ARCHS + PHI3_MISTRAL_ARCHS + GEMMA_ARCHS}")
    cfg = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tiny_tokens()),
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "rope_traditional": False,
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if arch == "phi3":
        cfg.update(original_max_position_embeddings=cfg["max_position_embeddings"])
    cfg.update(overrides)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def gemma_tiny_config(arch: str, tie: bool = True, **overrides) -> dict:
    """A tiny gemma3 (6 layers: 5 sliding with a window of 24 tokens, then 1 global, each
    with its own RoPE base) or gemma2 (2 layers, always tied, soft-capped at 5 (attention) and
    10 (logits), small enough to bite). mlx-lm's gemma2 attends globally on every layer, so
    its window (512) covers every sequence the tests feed it."""
    cfg = {
        "model_type": {"gemma3": "gemma3_text", "gemma2": "gemma2"}[arch],
        "hidden_size": 64, "num_hidden_layers": 6 if arch == "gemma3" else 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "vocab_size": len(tiny_tokens()), "max_position_embeddings": 512,
        "tie_word_embeddings": tie or arch == "gemma2", "rope_traditional": False,
        "query_pre_attn_scalar": 16.0, "hidden_activation": "gelu_pytorch_tanh",
    }
    if arch == "gemma3":
        cfg.update(rope_theta=1_000_000.0, rope_local_base_freq=10000.0, sliding_window=24,
                   sliding_window_pattern=6)
    else:
        cfg.update(rope_theta=10000.0, sliding_window=512, attn_logit_softcapping=5.0,
                   final_logit_softcapping=10.0)
    cfg.update(overrides)
    return cfg


def gguf_config(cfg: dict) -> dict:
    """The config a GGUF of `cfg` loads with: llama gets llama.cpp's Q/K order, a family's
    Hugging Face model_type (gemma3_text) its GGUF architecture's name."""
    family = F.family(cfg["model_type"])
    out = {**cfg, "model_type": family.arch, "rope_traditional": family.rope_traditional}
    out.pop("hidden_activation", None)
    return out


def build_model(cfg: dict, weights: dict | None = None):
    """An mlx-lm model for `cfg`, optionally with `weights` (name -> array) loaded strictly."""
    model = edgeft_build_model(cfg)
    if weights is not None:
        model.load_weights([(k, mx.array(v)) for k, v in sanitized(model, weights).items()], strict=True)
    mx.eval(model.parameters())
    return model


def tiny_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in mlx-lm/HF names and HF row order; norms away from 1."""
    mx.random.seed(seed)
    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in tree_flatten(model.parameters()):
        w = np.array(value, dtype=np.float32)
        if "norm" in name:
            w = 1.0 + 0.2 * rng.standard_normal(w.shape).astype(np.float32)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(w.shape).astype(np.float32)
        elif "embed_tokens" in name:
            w = 0.5 * rng.standard_normal(w.shape).astype(np.float32)
        out[name] = w
    if not cfg.get("tie_word_embeddings", True):
        return out
    return {k: v for k, v in out.items() if not k.startswith("lm_head.")}  # gemma3 drops it then


def gguf_tensors(cfg: dict, weights: dict) -> dict[str, np.ndarray]:
    """mlx names/HF order -> GGUF names/llama.cpp order (Q/K permuted for llama, gemma norms
    shifted by one)."""
    arch = F.family(cfg["model_type"]).arch
    permute = arch == "llama"
    out = {}
    for name, w in weights.items():
        w = w + F.norm_offset(name, arch)
        if permute and ".q_proj." in name:
            w = F.permute_qk(w, cfg["num_attention_heads"])
        elif permute and ".k_proj." in name:
            w = F.permute_qk(w, cfg["num_key_value_heads"])
        out[F.mlx_to_gguf_name(name, F.family(cfg["model_type"]).arch)] = w
    return out


def mlx_tensors(cfg: dict, tensors: dict) -> dict:
    """GGUF names -> mlx-lm names, for a model of `cfg` (the inverse of gguf_tensors' names)."""
    names = [n for n, _ in tree_flatten(edgeft_build_model(cfg).parameters())]
    by_gguf = F.mlx_names_by_gguf(names, F.family(cfg["model_type"]).arch)
    arch = F.family(cfg["model_type"]).arch
    return {by_gguf[k]: v - F.norm_offset(by_gguf[k], arch) for k, v in tensors.items() if k not in ROPE_TENSORS}


def _encode_tensor(name: str, w: np.ndarray, quant: str | None):
    """(data to write, raw ggml type or None, what a reader dequantizes it to)."""
    if quant is None or w.ndim < 2 or name.endswith("norm.weight"):
        return w, None, w
    if quant == "f16":
        h = w.astype(np.float16)
        return h, None, h.astype(np.float32)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    data = gguf.quants.quantize(w, qtype)
    return data, qtype, gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(w.shape)


def write_gguf(path, cfg: dict, tensors: dict[str, np.ndarray], quant: str | None = None,
               extra_metadata: dict | None = None) -> dict[str, np.ndarray]:
    """Write a GGUF of `tensors` (GGUF names) with `cfg`'s and the tiny tokenizer's metadata.

    `extra_metadata` adds or replaces keys (a None value removes one). Returns the tensors
    as a reader dequantizes them.
    """
    arch = F.family(cfg["model_type"]).arch
    writer = gguf.GGUFWriter(str(path), arch)
    md = {**F.config_to_metadata(cfg), Keys.General.NAME: f"tiny-{arch}", **tiny_tokenizer_metadata()}
    md.update(extra_metadata or {})
    md = {k: v for k, v in md.items() if v is not None}
    write_metadata(writer, md)
    stored = {}
    for name, w in tensors.items():
        data, raw, stored[name] = _encode_tensor(name, w, quant)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def make_tiny(arch: str = "llama", tmp_path=".", quant: str | None = None, *, seed: int = 0,
              tie: bool = True, tokenizer: str = "bpe", **overrides):
    """A tiny random model as a GGUF file.

    quant: None (f32), "f16", "bf16", "q8_0", "q4_0", "q4_1" (any type gguf-py can quantize)
    applied to every 2-D weight, token embedding included, norms kept f32 as llama.cpp does.
    tokenizer: "bpe" (byte-level, the default) or "spm" (SentencePiece, see
    spm_tokenizer_metadata). overrides: config fields, e.g. hidden_size=256 (K-quants need
    rows of 256). Returns (gguf_path, ref_model, cfg).
    """
    cfg = gguf_config(tiny_config(arch, tie, **overrides))
    tensors = gguf_tensors(cfg, tiny_weights(tiny_config(arch, tie, **overrides), seed))
    path = Path(tmp_path) / f"tiny-{arch}-{quant or 'f32'}-{tokenizer}-{seed}.gguf"
    extra = {"bpe": None, "spm": spm_tokenizer_metadata()}[tokenizer]
    stored = write_gguf(path, cfg, tensors, quant, extra_metadata=extra)
    ref = build_model(cfg, mlx_tensors(cfg, stored))
    return path, ref, cfg


def tiny_hf_tokenizer():
    """The tiny BPE as a `tokenizers.Tokenizer` (what tokenizer.json holds)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = tiny_tokens()
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in MERGES]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tk


def make_tiny_folder(arch: str = "llama", tmp_path=".", *, seed: int = 0, tie: bool = True,
                     dtype: str = "float32", **overrides):
    """A tiny random model as a Hugging Face-style folder.

    Writes config.json, model.safetensors (dtype "float32", "float16" or "bfloat16"),
    tokenizer.json, tokenizer_config.json. Same `seed` -> same weights as make_tiny.
    Returns (folder, ref_model, cfg).
    """
    cfg = tiny_config(arch, tie, **overrides)
    weights = tiny_weights(cfg, seed)
    folder = Path(tmp_path) / f"tiny-{arch}-hf-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    hf_cfg = {k: v for k, v in cfg.items() if k != "rope_traditional"}
    hf_cfg.update(architectures=[HF_ARCHITECTURES[arch]], torch_dtype=dtype, bos_token_id=0, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    arrays = {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "pt"})
    tiny_hf_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE, "model_max_length": cfg["max_position_embeddings"],
    }, indent=2))
    ref = build_model(cfg, {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()})
    return folder, ref, cfg
