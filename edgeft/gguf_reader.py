"""GGUF <-> mlx-lm translation: key names, hyper-parameters, tensor names, Q/K row order.

Everything here is a small pure function over plain values, so the loader (GGUF in) and the
exporter (GGUF out) share one definition of each convention. Metadata dicts are shaped like
`mx.load(path, return_metadata=True)` returns them: strings and string lists as Python
values, numbers as `mx.array` scalars or arrays (plain Python numbers and NumPy work too).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.errors import UserError


class ModelLoadError(UserError, ValueError):
    """A model file or folder edgeft cannot load; the message names it and what to do."""


# --- file layout -------------------------------------------------------------------------
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; nothing current writes it
HEADER_SIZE = 24  # magic u32, version u32, tensor count u64, metadata kv count u64
MAX_TENSORS = 1_000_000  # the largest MoE files hold tens of thousands
MAX_KV = 100_000  # real files hold tens to a few hundred keys
MAX_DIMS = 4  # ggml tensors have at most four dimensions
DEFAULT_ALIGNMENT = 32
# Smallest encodings: a tensor info (u64 name length, u32 n_dims, u32 type, u64 offset) and
# a key-value pair (u64 key length, u32 type, 1-byte value): lets a header that claims more
# entries than the file can hold be refused before anything is read or allocated.
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
MIN_KV_BYTES = 8 + 4 + 1

# --- general keys ------------------------------------------------------------------------
KEY_ARCHITECTURE = "general.architecture"
KEY_ALIGNMENT = "general.alignment"
KEY_NAME = "general.name"
KEY_FILE_TYPE = "general.file_type"
KEY_QUANTIZATION_VERSION = "general.quantization_version"

# --- per-architecture keys ({arch} is general.architecture) ------------------------------
KEY_CONTEXT_LENGTH = "{arch}.context_length"
KEY_EMBEDDING_LENGTH = "{arch}.embedding_length"
KEY_BLOCK_COUNT = "{arch}.block_count"
KEY_FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
KEY_VOCAB_SIZE = "{arch}.vocab_size"
KEY_HEAD_COUNT = "{arch}.attention.head_count"
KEY_HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
KEY_KEY_LENGTH = "{arch}.attention.key_length"
KEY_VALUE_LENGTH = "{arch}.attention.value_length"
KEY_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
KEY_ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
KEY_ROPE_FREQ_BASE = "{arch}.rope.freq_base"
KEY_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
KEY_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
KEY_ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"

# --- tokenizer keys ----------------------------------------------------------------------
KEY_TOKENIZER_MODEL = "tokenizer.ggml.model"  # "gpt2" (byte-level BPE) or "llama" (SPM)
KEY_TOKENIZER_PRE = "tokenizer.ggml.pre"  # pre-tokenizer regex family
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS_ID = "tokenizer.ggml.bos_token_id"
KEY_EOS_ID = "tokenizer.ggml.eos_token_id"
KEY_EOT_ID = "tokenizer.ggml.eot_token_id"
KEY_UNK_ID = "tokenizer.ggml.unknown_token_id"
KEY_PAD_ID = "tokenizer.ggml.padding_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# tokenizer.ggml.token_type values (the same numbers as SentencePiece's piece types)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6,
)

# --- architectures -----------------------------------------------------------------------
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Hugging Face / mlx-lm model_type -> GGUF architecture
MODEL_TYPE_TO_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's converter permutes llama Q/K rows for its "norm" RoPE, which is MLX's
# traditional (interleaved) RoPE; qwen2/qwen3 keep the HF rows and use "neox" RoPE.
ROPE_TRADITIONAL = {"llama": True, "qwen2": False, "qwen3": False}
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_CONTEXT_LENGTH = 4096

# ggml tensor types that `mx.load` reads itself (quantized ones as MLX affine, group 32)
MLX_NATIVE_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama 3.1+ RoPE scaling, stored as a tensor


def unsupported_arch_error(arch: Any) -> ModelLoadError:
    return ModelLoadError(f"unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")


# --- header ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    version: int
    n_tensors: int
    n_kv: int


def parse_header(data: bytes, file_size: int, name: str = "file") -> Header:
    """Validate the fixed 24-byte header; `file_size` bounds the counts it claims."""
    if len(data) < HEADER_SIZE:
        raise ModelLoadError(
            f"{name}: {len(data)} bytes is shorter than a GGUF header (truncated download?)"
        )
    if data[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{name}: not a GGUF file (starts with {data[:4]!r}, expected {GGUF_MAGIC!r})"
        )
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{name}: GGUF version {version} is not supported (only 2 and 3); "
            "re-convert it with a current llama.cpp"
        )
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise ModelLoadError(
            f"{name}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
            "more than any real model: the file is corrupt"
        )
    needed = HEADER_SIZE + n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES
    if file_size < needed:
        raise ModelLoadError(
            f"{name}: {file_size} bytes cannot hold the {n_tensors} tensors and {n_kv} keys "
            "its header announces: the file is truncated, download it again"
        )
    return Header(version, n_tensors, n_kv)


def check_header(path: str | os.PathLike) -> Header:
    """Cheap sanity check of a GGUF file's header before anything large is allocated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from e
    return parse_header(data, size, str(path))


# --- tensor index (header + tensor infos, metadata values skipped) -----------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFIndex:
    header: Header
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    metadata: dict  # decoded only when asked for (read_index(..., with_metadata=True))

    def type_names(self) -> set[str]:
        return {ggml_type_name(t.ggml_type) for t in self.tensors}


# GGUF value type id -> struct format of one scalar (8 = string, 9 = array)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


MAX_DIM = 1 << 24  # no model dimension or count comes near this; corrupt headers do
MAX_ARRAY_NESTING = 16  # real files nest arrays once at most; each level costs a stack frame


class _Cursor:
    def __init__(self, buf, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise ModelLoadError(
                f"{self.name}: truncated or corrupt GGUF header near byte {start}; "
                "download the file again"
            )
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, decode: bool, depth: int = 0):
        """Read (decode=True) or skip one metadata value; numeric arrays come back as NumPy."""
        if vtype in _SCALAR_FORMATS:
            dtype = np.dtype("<" + _SCALAR_FORMATS[vtype])
            start = self.take(dtype.itemsize)
            # NumPy scalars keep the GGUF width and sign, so a re-export writes the same type
            return np.frombuffer(self.buf, dtype, 1, start)[0] if decode else None
        if vtype == _STRING:
            return self.string() if decode else self.take(self.unpack("Q"))
        if vtype == _ARRAY:
            sub, n = self.unpack("I"), self.unpack("Q")
            if sub in _SCALAR_FORMATS:
                fmt = "<" + _SCALAR_FORMATS[sub]
                start = self.take(n * struct.calcsize(fmt))
                if decode:
                    return np.frombuffer(self.buf, np.dtype(fmt), n, start).copy()
                return None
            if n > len(self.buf):  # every element takes at least one byte
                self.take(n)
            if depth >= MAX_ARRAY_NESTING:
                raise ModelLoadError(
                    f"{self.name}: metadata arrays nested more than {MAX_ARRAY_NESTING} deep near "
                    f"byte {self.pos}; the file is corrupt or not a model"
                )
            items = [self.value(sub, decode, depth + 1) for _ in range(n)]
            return items if decode else None
        raise ModelLoadError(f"{self.name}: unknown GGUF value type {vtype} near byte {self.pos}")


def ggml_type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return math.prod(shape) // block * size


def read_index(path: str | os.PathLike, with_metadata: bool = False) -> GGUFIndex:
    """Header check, then the tensor table; refuses files whose tensors run past the end.

    Metadata values are skipped unless `with_metadata` (then decoded: str, list[str],
    Python scalars, NumPy arrays); either way nothing proportional to the weights is read.
    """
    path = Path(path)
    header = check_header(path)
    name = str(path)
    metadata: dict = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(memoryview(mm), name)
        try:
            cur.take(HEADER_SIZE)
            for _ in range(header.n_kv):
                key, vtype = cur.string(), cur.unpack("I")
                decode = with_metadata or key == KEY_ALIGNMENT
                value = cur.value(vtype, decode)
                if decode:
                    metadata[key] = value
            tensors = []
            for _ in range(header.n_tensors):
                tname, n_dims = cur.string(), cur.unpack("I")
                if n_dims > MAX_DIMS:
                    raise ModelLoadError(f"{name}: tensor {tname} claims {n_dims} dimensions")
                shape = tuple(cur.unpack("Q") for _ in range(n_dims))
                tensors.append(TensorInfo(tname, shape, cur.unpack("I"), cur.unpack("Q")))
            end_of_infos = cur.pos
        finally:
            cur.buf.release()
        size = mm.size()
    alignment = metadata.get(KEY_ALIGNMENT, DEFAULT_ALIGNMENT)
    if not with_metadata:
        metadata.clear()
    if not isinstance(alignment, (int, np.integer)) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{name}: general.alignment {alignment} is not a power of two")
    alignment = int(alignment)
    data_offset = -(-end_of_infos // alignment) * alignment
    for t in tensors:
        try:
            nbytes = tensor_nbytes(t.shape, t.ggml_type)
        except (ValueError, KeyError):
            raise ModelLoadError(
                f"{name}: tensor {t.name} has ggml type {t.ggml_type}, unknown to gguf-py; "
                "upgrade the gguf package or re-quantize the model"
            ) from None
        if data_offset + t.offset + nbytes > size:
            raise ModelLoadError(
                f"{name}: tensor {t.name} ends past the end of the file ({size} bytes): "
                "the file is truncated, download it again"
            )
    return GGUFIndex(header, tensors, data_offset, size, metadata)


# --- metadata values ---------------------------------------------------------------------
def scalar(value: Any) -> Any:
    """An `mx.array`/NumPy 0-d value (or a plain one) as a Python scalar."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return value.item()
    return value


def as_list(value: Any) -> list:
    """An `mx.array`/NumPy 1-d value (or a list) as a Python list."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        out = value.tolist()
        return out if isinstance(out, list) else [out]
    return list(value)


def _get(md: dict, key: str, arch: str, default: Any = None) -> Any:
    value = md.get(key.format(arch=arch))
    return default if value is None else scalar(value)


def _require(md: dict, key: str, arch: str) -> Any:
    value = _get(md, key, arch)
    if value is None:
        raise ModelLoadError(f"GGUF metadata lacks {key.format(arch=arch)}; the file is incomplete")
    return value


def metadata_to_config(
    md: dict, tensor_names: set[str] | list[str], rope_freqs: np.ndarray | None = None
) -> dict:
    """GGUF metadata (+ the tensor names) -> mlx-lm ModelArgs dict.

    `tensor_names` decides tie_word_embeddings (no `output.weight`) and biases;
    `rope_freqs` is the `rope_freqs.weight` tensor of llama 3.1+ files, if any.
    """
    arch = scalar(md.get(KEY_ARCHITECTURE))
    if arch not in ARCHITECTURES:
        raise unsupported_arch_error(arch)
    names = set(tensor_names)
    hidden = int(_require(md, KEY_EMBEDDING_LENGTH, arch))
    n_heads = int(_require(md, KEY_HEAD_COUNT, arch))
    n_kv = int(_get(md, KEY_HEAD_COUNT_KV, arch, n_heads))
    head_dim = int(_get(md, KEY_KEY_LENGTH, arch, hidden // n_heads))
    rope_dim = int(_get(md, KEY_ROPE_DIMENSION_COUNT, arch, head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(
            f"partial RoPE ({rope_dim} of {head_dim} dims) is not supported for {arch}"
        )
    vocab = _get(md, KEY_VOCAB_SIZE, arch) or len(md.get(KEY_TOKENS) or [])
    if not vocab:
        raise ModelLoadError("GGUF metadata has neither a vocab size nor a token list")
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(md, KEY_BLOCK_COUNT, arch)),
        "intermediate_size": int(_require(md, KEY_FEED_FORWARD_LENGTH, arch)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_require(md, KEY_RMS_EPS, arch)),
        "vocab_size": int(vocab),
        "rope_theta": float(_get(md, KEY_ROPE_FREQ_BASE, arch, DEFAULT_ROPE_THETA)),
        "max_position_embeddings": int(_get(md, KEY_CONTEXT_LENGTH, arch, DEFAULT_CONTEXT_LENGTH)),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_traditional": ROPE_TRADITIONAL[arch],
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    if arch == "qwen2" and head_dim * n_heads != hidden:
        raise ModelLoadError(
            f"qwen2 with head_dim {head_dim} != hidden/heads is not supported by mlx-lm's qwen2"
        )
    scaling = _rope_scaling(md, arch, cfg, rope_freqs)
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
    expect = {
        "token_embd.weight": (hidden, vocab),
        "blk.0.ffn_up.weight": (hidden, inter),
        "blk.0.attn_q.weight": (hidden, cfg["num_attention_heads"] * cfg["head_dim"]),
    }
    for name, shape in expect.items():
        if name in shapes and tuple(shapes[name]) != shape:
            fail(f"{name} is {list(shapes[name])}, the metadata implies {list(shape)}")


def _rope_scaling(md: dict, arch: str, cfg: dict, rope_freqs) -> dict | None:
    if rope_freqs is not None:
        orig = _get(md, KEY_ROPE_SCALING_ORIG_CTX, arch, LLAMA3_ORIGINAL_CONTEXT)
        return llama3_scaling_from_rope_freqs(
            np.asarray(rope_freqs), cfg["rope_theta"], cfg["head_dim"], int(orig)
        )
    kind = _get(md, KEY_ROPE_SCALING_TYPE, arch)
    factor = _get(md, KEY_ROPE_SCALING_FACTOR, arch)
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = _get(md, KEY_ROPE_SCALING_ORIG_CTX, arch, cfg["max_position_embeddings"])
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(orig)}
    raise ModelLoadError(f"RoPE scaling type {kind!r} is not supported (linear, yarn, llama3)")


def config_to_metadata(cfg: dict) -> dict:
    """mlx-lm ModelArgs dict -> GGUF architecture metadata (Python values; no tokenizer).

    llama 3 RoPE scaling has no metadata form: write `llama3_rope_freqs(cfg)` as the
    `rope_freqs.weight` tensor instead.
    """
    arch = MODEL_TYPE_TO_ARCH.get(cfg.get("model_type"))
    if arch is None:
        raise unsupported_arch_error(cfg.get("model_type"))
    n_heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    k = lambda key: key.format(arch=arch)  # noqa: E731
    md = {
        KEY_ARCHITECTURE: arch,
        k(KEY_CONTEXT_LENGTH): int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        k(KEY_EMBEDDING_LENGTH): int(cfg["hidden_size"]),
        k(KEY_BLOCK_COUNT): int(cfg["num_hidden_layers"]),
        k(KEY_FEED_FORWARD_LENGTH): int(cfg["intermediate_size"]),
        k(KEY_HEAD_COUNT): n_heads,
        k(KEY_HEAD_COUNT_KV): int(cfg.get("num_key_value_heads") or n_heads),
        k(KEY_KEY_LENGTH): head_dim,
        k(KEY_VALUE_LENGTH): head_dim,
        k(KEY_ROPE_DIMENSION_COUNT): head_dim,
        k(KEY_RMS_EPS): float(cfg["rms_norm_eps"]),
        k(KEY_ROPE_FREQ_BASE): float(cfg.get("rope_theta") or DEFAULT_ROPE_THETA),
        k(KEY_VOCAB_SIZE): int(cfg["vocab_size"]),
    }
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("linear", "yarn"):
        md[k(KEY_ROPE_SCALING_TYPE)] = kind
        md[k(KEY_ROPE_SCALING_FACTOR)] = float(scaling["factor"])
    if kind == "yarn" and "original_max_position_embeddings" in scaling:
        md[k(KEY_ROPE_SCALING_ORIG_CTX)] = int(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        md[k(KEY_ROPE_SCALING_ORIG_CTX)] = int(
            scaling.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT)
        )
    elif kind not in (None, "default", "linear", "yarn"):
        raise ModelLoadError(f"RoPE scaling {kind!r} cannot be written to GGUF")
    return md


def write_metadata(writer, md: dict) -> None:
    """Add `md` to a gguf.GGUFWriter, choosing GGUF value types from the Python types.

    general.architecture is skipped: GGUFWriter(path, arch) writes it itself.
    """
    from gguf import GGUFValueType as T

    by_dtype = {np.dtype(np.uint8): T.UINT8, np.dtype(np.int8): T.INT8,
                np.dtype(np.uint16): T.UINT16, np.dtype(np.int16): T.INT16,
                np.dtype(np.uint32): T.UINT32, np.dtype(np.int32): T.INT32,
                np.dtype(np.uint64): T.UINT64, np.dtype(np.int64): T.INT64,
                np.dtype(np.float32): T.FLOAT32, np.dtype(np.float64): T.FLOAT64,
                np.dtype(np.bool_): T.BOOL}

    def vtype(v):
        if isinstance(v, (np.generic, np.ndarray)) and v.dtype in by_dtype:
            return by_dtype[v.dtype]
        if isinstance(v, (bool, np.bool_)):
            return T.BOOL
        if isinstance(v, (int, np.integer)):
            return T.UINT32 if v >= 0 else T.INT32
        if isinstance(v, (float, np.floating)):
            return T.FLOAT32
        if isinstance(v, str):
            return T.STRING
        raise TypeError(f"no GGUF type for {type(v).__name__}")

    for key, value in md.items():
        if key == KEY_ARCHITECTURE:
            continue
        if hasattr(value, "tolist") and not isinstance(value, (np.ndarray, np.generic)):
            value = np.array(value)  # mx.array -> NumPy, keeping its dtype
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) == 0:
                continue
            if isinstance(value, np.ndarray):
                sub = vtype(value)
            else:
                sub = T.INT32 if key == KEY_TOKEN_TYPE else vtype(value[0])
            writer.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, value, vtype(value))


# --- llama 3 RoPE frequencies ------------------------------------------------------------
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """The `rope_freqs.weight` tensor llama.cpp's converter writes for llama3 RoPE scaling."""
    s = cfg["rope_scaling"]
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR))
    high = float(s.get("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR))
    old_ctx = float(s.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT))
    base = float(cfg.get("rope_theta") or DEFAULT_ROPE_THETA)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(
        wavelen < old_ctx / high, 1.0,
        np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return out.astype(np.float32)


def llama3_scaling_from_rope_freqs(
    rope_freqs: np.ndarray, rope_theta: float, head_dim: int,
    original_context: int = LLAMA3_ORIGINAL_CONTEXT,
) -> dict:
    """Recover the llama3 `rope_scaling` dict from a `rope_freqs.weight` tensor.

    Meta's released models all use low/high frequency factors 1 and 4; the result is
    checked against the tensor so a file made with other factors is refused, not misread.
    """
    rope_freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(rope_freqs.max()),
        "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": int(original_context),
    }
    cfg = {"rope_scaling": scaling, "rope_theta": rope_theta, "head_dim": head_dim}
    if rope_freqs.shape != (head_dim // 2,) or not np.allclose(
        llama3_rope_freqs(cfg), rope_freqs, rtol=1e-4
    ):
        raise ModelLoadError(
            "rope_freqs.weight does not match llama3 RoPE scaling with the standard factors"
        )
    return scaling


# --- tensor names ------------------------------------------------------------------------
# GGUF per-block tensor base name -> mlx-lm module path inside model.layers.N
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# .weight/.bias are the tensor itself; .scales/.biases are MLX affine quantization parts
SUFFIXES = ("weight", "bias", "scales", "biases")
_BLOCK_TO_MLX = {v: k for k, v in BLOCK_TENSORS.items()}
_GLOBAL_TO_MLX = {v: k for k, v in GLOBAL_TENSORS.items()}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(\w+)")
_MLX_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(\w+)")


def gguf_to_mlx_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if m := _GGUF_BLOCK_RE.fullmatch(name):
        layer, base, suffix = m.groups()
        if base in BLOCK_TENSORS and suffix in SUFFIXES:
            return f"model.layers.{layer}.{BLOCK_TENSORS[base]}.{suffix}"
        return None
    base, _, suffix = name.rpartition(".")
    if base in GLOBAL_TENSORS and suffix in SUFFIXES:
        return f"{GLOBAL_TENSORS[base]}.{suffix}"
    return None


def mlx_to_gguf_name(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None if unknown."""
    if m := _MLX_BLOCK_RE.fullmatch(name):
        layer, path, suffix = m.groups()
        if path in _BLOCK_TO_MLX and suffix in SUFFIXES:
            return f"blk.{layer}.{_BLOCK_TO_MLX[path]}.{suffix}"
        return None
    path, _, suffix = name.rpartition(".")
    if path in _GLOBAL_TO_MLX and suffix in SUFFIXES:
        return f"{_GLOBAL_TO_MLX[path]}.{suffix}"
    return None


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


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp row order -> HF's: the inverse of `permute_qk`."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
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
    return qk_layout == "hf" and ROPE_TRADITIONAL[MODEL_TYPE_TO_ARCH[config["model_type"]]]
