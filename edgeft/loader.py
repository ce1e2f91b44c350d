"""Load a base model: a GGUF file or a Hugging Face / MLX folder -> an mlx-lm model + tokenizer.

GGUF files whose tensors are all F32/F16/BF16/Q4_0/Q4_1/Q8_0 are read by `mx.load` itself:
quantized tensors arrive as MLX affine triplets (weight/scales/biases, group 32, float16
scales) and the matching layers become nn.QuantizedLinear/QuantizedEmbedding with those exact
values. `mx.load` refuses a whole file if any tensor has another type (K-quants such as
Q4_K_M mix Q4_K/Q6_K with Q5_0/Q8_0), so such files are read block by block instead: the
types that are MLX affine quantization already (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K; see
edgeft.kquants) become triplets at their own bits holding the file's exact values; the others
(Q6_K, Q3_K, ...) are dequantized by gguf-py and re-quantized, at 8 bits for types of 6+ bits
and for the token embedding, 4 bits otherwise (a small extra rounding error). Scales and
biases from this path are float32. `held_bits` and `held_scale_bytes` state that rule, for
the loader and for the memory plan.

`build_model` is the one place a config becomes mlx-lm's model class.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from edgeft import families as F
from edgeft import gguf_reader as G
from edgeft import kquants as K
from edgeft import rope_scaling as R
from edgeft.gguf_reader import ModelLoadError
from edgeft.tokenizer import Tokenizer

__all__ = ["Loaded", "ModelLoadError", "load", "build_model", "sanitized", "held_bits", "held_scale_bytes",
           "read_natively", "QUANT_GROUP_SIZE"]

QUANT_GROUP_SIZE = 32  # GGUF's block size: MLX 4-bit g32 maps onto Q4_1 for export
# ggml tensor types that `mx.load` reads itself (quantized ones as MLX affine, group 32)
MLX_NATIVE_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
# ggml types re-quantized to 8 bits when a file needs gguf-py and its blocks are not MLX
# affine quantization (K.AFFINE_BITS); the rest of those: 4 bits
EIGHT_BIT_SOURCES = {"Q8_1", "Q8_K", "Q6_K"}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}


@dataclass
class Loaded:
    model: nn.Module | None  # None when loaded with tokenizer_only=True
    tokenizer: Tokenizer
    config: dict  # mlx-lm ModelArgs dict
    path: Path
    fmt: str  # "gguf" or "folder"
    qk_layout: str  # "gguf": Q/K rows as llama.cpp stores them; "hf": Hugging Face's
    gguf_metadata: dict | None


def load(path, quantize_bits: int | None = None, tokenizer_only: bool = False) -> Loaded:
    """Load a GGUF file or a model folder (config.json + *.safetensors, or one .gguf).

    quantize_bits (4 or 8) quantizes the layers still in full precision after loading,
    group size 32. tokenizer_only skips the weights (Loaded.model is None).
    """
    path = Path(path).expanduser()
    if quantize_bits not in (None, 4, 8):
        raise ModelLoadError(f"quantize_bits must be 4, 8 or unset, not {quantize_bits}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return load(ggufs[0], quantize_bits, tokenizer_only)
            raise ModelLoadError(
                f"{path}: no config.json (and not exactly one .gguf); point at a GGUF file "
                "or a Hugging Face model folder"
            )
        return _load_folder(path, quantize_bits, tokenizer_only)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file or folder")
    return _load_gguf(path, quantize_bits, tokenizer_only)


# --- GGUF ----------------------------------------------------------------------------------
def read_natively(index: G.GGUFIndex) -> bool:
    """Whether `mx.load` reads the file itself (it refuses a whole file over one other type)."""
    return index.type_names() <= MLX_NATIVE_TYPES


def held_bits(info: G.TensorInfo, native: bool, quantize_bits: int | None = None) -> int | None:
    """How edgeft holds a GGUF tensor after `load(path, quantize_bits)`: the bits of its MLX
    affine quantization (group QUANT_GROUP_SIZE), or None when it is held as floats.

    `native` is `read_natively` of its file. Float tensors stay floats unless quantize_bits
    quantizes the matrices; a quantized type the gguf-py path cannot regroup becomes float16.
    """
    kind = G.ggml_type_name(info.ggml_type)
    groups = len(info.shape) == 2 and info.shape[0] % QUANT_GROUP_SIZE == 0
    if kind in FLOAT_TYPES:
        return quantize_bits if quantize_bits and groups else None
    if native:
        return K.AFFINE_BITS[kind]
    if not (groups and info.name.endswith(".weight")):
        return None
    if kind in K.AFFINE_BITS:
        return K.AFFINE_BITS[kind]
    return 8 if kind in EIGHT_BIT_SOURCES or info.name.startswith("token_embd.") else 4


def held_scale_bytes(native: bool) -> int:
    """Bytes of each scale and bias of a GGUF file's quantized tensors as loaded: float16 as
    `mx.load` gives them, float32 from the block-by-block path (a K-quant group's scale
    d * sc needs 17 significant bits)."""
    return 2 if native else 4


def _load_gguf(path: Path, quantize_bits, tokenizer_only: bool) -> Loaded:
    index = G.read_index(path, with_metadata=True)  # header, bounds, metadata: no weights yet
    md = index.metadata
    infos = {t.name: t for t in index.tensors}
    rope = {name: _read_tensor(path, index, infos[name]) for name in R.ROPE_TENSORS if name in infos}
    try:
        config = F.metadata_to_config(md, set(infos), rope)
        F.check_config(config, {name: info.shape for name, info in infos.items()})
        tokenizer = Tokenizer.from_gguf_metadata(md)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, AttributeError, KeyError) as e:
        # Metadata of the wrong type or range (a string where a count belongs, ...).
        raise ModelLoadError(
            f"{path}: malformed GGUF metadata ({type(e).__name__}: {e}); the file is corrupt"
        ) from None
    qk_layout = "gguf" if config["rope_traditional"] else "hf"
    if tokenizer_only:
        return Loaded(None, tokenizer, config, path, "gguf", qk_layout, md)

    if read_natively(index):
        try:
            weights = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{path}: MLX cannot read it ({e}); download it again") from e
    else:
        weights = {}
        for info in index.tensors:
            weights.update(_held(path, index, info))
    for name in R.ROPE_TENSORS:
        weights.pop(name, None)  # their content is in config["rope_scaling"]

    model = _new_model(config, path)
    arch = F.family(config["model_type"]).arch
    by_gguf = F.mlx_names_by_gguf((n for n, _ in tree_flatten(model.parameters())), arch)
    mlx_weights = {}
    for name, w in weights.items():
        if name not in by_gguf and re.sub(r"^blk\.\d+\.", "blk.0.", name) in by_gguf:
            raise ModelLoadError(
                f"{path}: unexpected tensor {name}; the file does not match a "
                f"{config['model_type']} model of this configuration"
            )
        if name not in by_gguf:
            raise ModelLoadError(
                f"{path}: tensor {name} has no place in a {config['model_type']} model; "
                "the file holds an architecture variant edgeft does not support"
            )
        mlx_weights[by_gguf[name]] = _from_gguf_values(w, by_gguf[name], arch)
    _fill(model, config, mlx_weights, path, lambda n: F.mlx_to_gguf_name(n, arch) or n)
    if quantize_bits:
        _quantize_rest(model, quantize_bits)
    return Loaded(model, tokenizer, config, path, "gguf", qk_layout, md)


def _from_gguf_values(w: mx.array, mlx_name: str, arch: str) -> mx.array:
    """A GGUF tensor's values as mlx-lm holds them (gemma norms are stored shifted)."""
    offset = F.norm_offset(mlx_name, arch)
    return (w.astype(mx.float32) - offset).astype(w.dtype) if offset else w


def _raw_rows(path: Path, index: G.GGUFIndex, info: G.TensorInfo) -> np.ndarray:
    """A tensor's bytes, mapped from the file, one row of the row-major tensor per row."""
    start = index.data_offset + info.offset
    raw = np.memmap(path, np.uint8, "r", start, G.tensor_nbytes(info.shape, info.ggml_type))
    return raw.reshape(-1, G.tensor_nbytes(info.shape[:1], info.ggml_type))


def _read_tensor(path: Path, index: G.GGUFIndex, info: G.TensorInfo) -> np.ndarray:
    """One tensor as NumPy in row-major order: floats as stored, quantized ones dequantized."""
    import gguf

    kind = G.ggml_type_name(info.ggml_type)
    rows = _raw_rows(path, index, info)
    shape = tuple(reversed(info.shape))  # ggml lists the fastest-varying dimension first
    if kind in ("F32", "F16", "F64"):
        return np.array(rows.view(FLOAT_TYPES[kind]).reshape(shape))
    if kind == "BF16":
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    try:
        values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(info.ggml_type))
        return values.reshape(shape)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {info.name} is {kind}, which gguf-py cannot dequantize; "
            "re-quantize the model to Q4_K_M, Q8_0 or Q4_0 with llama.cpp's llama-quantize"
        ) from None


def _held(path: Path, index: G.GGUFIndex, info: G.TensorInfo) -> dict[str, mx.array]:
    """A tensor of a file `mx.load` refuses, as `held_bits` says: quantized ones as MLX triplets
    (float32 scales and biases), exact where the blocks are MLX affine quantization already."""
    kind = G.ggml_type_name(info.ggml_type)
    bits = held_bits(info, native=False)
    base = info.name.removesuffix(".weight")
    if bits is not None and kind in K.AFFINE_BITS:
        w, scales, biases = K.triplet(kind, _raw_rows(path, index, info))
        return {info.name: w, f"{base}.scales": scales, f"{base}.biases": biases}
    array = _read_tensor(path, index, info)
    if kind in FLOAT_TYPES:
        a = mx.array(array.astype(np.float32) if kind == "F64" else array)
        return {info.name: a.astype(mx.bfloat16) if kind == "BF16" else a}
    if bits is None:
        return {info.name: mx.array(array.astype(np.float16))}
    w, scales, biases = mx.quantize(mx.array(array), group_size=QUANT_GROUP_SIZE, bits=bits)
    return {info.name: w, f"{base}.scales": scales, f"{base}.biases": biases}


# --- folders -------------------------------------------------------------------------------
def _load_folder(path: Path, quantize_bits, tokenizer_only: bool) -> Loaded:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: not readable JSON ({e})") from e
    model_type = config.get("model_type")
    if model_type not in F.MODEL_TYPES:
        raise ModelLoadError(
            f"{config_file}: unsupported architecture {model_type}; supported: "
            f"{', '.join(F.ARCHITECTURES)} (mistral loads as llama)"
        )
    multimodal = False
    if F.family(model_type).arch in F.GEMMA_ARCHS:
        multimodal = isinstance(config.get("text_config"), dict)
        try:
            config = F.gemma_folder_config(config)
        except ModelLoadError as e:
            raise ModelLoadError(f"{config_file}: {e}") from None
    if "quantization_config" in config and "quantization" not in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(
            f"{config_file}: {method}-quantized checkpoints are not supported; use the "
            "fp16/bf16 model (quantize_bits=4 quantizes it on load) or an MLX-quantized one"
        )
    tokenizer = Tokenizer.from_folder(path)
    if tokenizer_only:
        return Loaded(None, tokenizer, config, path, "folder", "hf", None)

    files = sorted(path.glob("model*.safetensors")) or sorted(
        f for f in path.glob("*.safetensors") if not f.name.startswith("adapter")
    )
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights in the folder")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{f}: MLX cannot read it ({e}); download it again") from e
    if multimodal:
        weights = _language_model_weights(weights)
    # HF's default is untied; mlx-lm's is tied: let the weights decide when config is silent.
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in weights)
    model = _new_model(config, path)
    _fill(model, config, weights, path, lambda n: n)
    if quantize_bits and "quantization" not in config:
        _quantize_rest(model, quantize_bits)
    return Loaded(model, tokenizer, config, path, "folder", "hf", None)


# Where a multimodal checkpoint keeps its language model (older and newer transformers)
LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                           "language_model.lm_head.": "lm_head."}


def _language_model_weights(weights: dict) -> dict:
    """The text model's weights of a multimodal checkpoint (vision tower and projector left out)."""
    out = {}
    for name, w in weights.items():
        for prefix, to in LANGUAGE_MODEL_PREFIXES.items():
            if name.startswith(prefix):
                out[to + name[len(prefix):]] = w
    return out


# --- building ------------------------------------------------------------------------------
def build_model(config: dict) -> nn.Module:
    """The mlx-lm model of its family for an mlx-lm ModelArgs dict, with fresh (lazy, so not
    yet allocated) weights; refuses an unsupported model_type in one line."""
    module = importlib.import_module(f"mlx_lm.models.{F.family(config.get('model_type')).mlx_module}")
    return module.Model(module.ModelArgs.from_dict(R.model_args(config)))


def sanitized(model: nn.Module, weights: dict) -> dict:
    """`weights` after the model class's own clean-up, if it has one (phi3's and gemma2's have none)."""
    sanitize = getattr(model, "sanitize", None)
    return sanitize(dict(weights)) if sanitize else dict(weights)


def _new_model(config: dict, source: Path) -> nn.Module:
    try:
        return build_model(config)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ModelLoadError(f"{source}: config does not describe a valid model ({e})") from e


def _fill(model: nn.Module, config: dict, weights: dict, source: Path, shown) -> None:
    """Give a fresh `model` the `weights` (mlx-lm names): quantize the layers that come with
    scales, then load strictly. `shown` maps an mlx-lm parameter name to the name the user's
    file uses, for messages.
    """
    weights = sanitized(model, weights)
    overrides = config.get("quantization") or {}
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}

    def predicate(p, m):
        if p not in quantized:
            return False
        if not hasattr(m, "to_quantized"):
            raise ModelLoadError(f"{source}: tensor {shown(p + '.scales')} belongs to no quantizable layer")
        if isinstance(overrides.get(p), dict):
            return overrides[p]
        return _quant_params(m, weights[p + ".weight"], weights[p + ".scales"], source, shown(p + ".weight"))

    nn.quantize(model, class_predicate=predicate)
    _check_weights(model, weights, source, shown, config["model_type"])
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def _quant_params(module: nn.Module, w: mx.array, scales: mx.array, source, shown_name) -> dict:
    in_dims = module.weight.shape[-1]
    if scales.dtype == mx.uint8:
        raise ModelLoadError(f"{source}: tensor {shown_name} uses a non-affine MLX quantization mode")
    if w.ndim != 2 or scales.ndim != 2 or scales.shape[-1] == 0 or in_dims % scales.shape[-1]:
        raise ModelLoadError(
            f"{source}: tensor {shown_name} has scales of shape {tuple(scales.shape)}, which do "
            f"not divide its {in_dims} inputs into groups"
        )
    return {
        "group_size": in_dims // scales.shape[-1],
        "bits": w.shape[-1] * 32 // in_dims,
        "mode": "affine",
    }


def _check_weights(model: nn.Module, weights: dict, source: Path, shown, model_type: str) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, value in expected.items():
        if name not in weights:
            raise ModelLoadError(
                f"{source}: tensor {shown(name)} is missing; the file is incomplete or not "
                f"a {model_type} model of this configuration"
            )
        if tuple(weights[name].shape) != tuple(value.shape):
            raise ModelLoadError(
                f"{source}: tensor {shown(name)} has shape {tuple(weights[name].shape)}, "
                f"expected {tuple(value.shape)} from the model's configuration"
            )
    for name in weights:
        if name not in expected:
            raise ModelLoadError(
                f"{source}: unexpected tensor {shown(name)}; the file does not match a "
                f"{model_type} model of this configuration"
            )


def _quantize_rest(model: nn.Module, bits: int) -> None:
    """Quantize the Linear/Embedding layers still in full precision (group size 32)."""

    def predicate(_, m):
        return isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % QUANT_GROUP_SIZE == 0

    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=bits, class_predicate=predicate)
    mx.eval(model.parameters())
