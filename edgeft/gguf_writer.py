"""Write a GGUF file: metadata with its value types, then tensors one at a time in the type
chosen for each, so writing a model costs the memory of one tensor, not of the model.

What goes in (llama.cpp's names, row order and keys for a tuned model or adapter) is
edgeft.export's business; this module only encodes it, with gguf-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np
from gguf import Keys

from edgeft.gguf_reader import tensor_nbytes


@dataclass
class TensorSpec:
    name: str  # GGUF name
    shape: tuple[int, ...]  # NumPy order (rows first)
    get: Callable[[], np.ndarray]  # fp32, llama.cpp row order


# 4-bit files keep the embedding and output matrices at 8 bits, as llama.cpp's quantizer
# keeps them above the rest (measured on SmolLM2, tied: q4_1 everywhere agreed with the tuned
# model on 53% of next tokens).
EIGHT_BIT_TENSORS = ("token_embd.weight", "output.weight")


def _ggml_type(name: str, shape: tuple[int, ...], quant: str):
    """What a tensor is stored as: norms, biases and other vectors stay F32 (as llama.cpp
    does); rows a block type cannot divide fall back to F16."""
    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith(".lora_a") or name.endswith(".lora_b") or quant == "f32":
        return T.F32
    qtype = T[quant.upper()]
    if quant in ("q4_0", "q4_1") and name in EIGHT_BIT_TENSORS:
        qtype = T.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else T.F16


def _encode(w: np.ndarray, qtype) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


_VALUE_TYPES = {np.dtype(t): v for t, v in (
    (np.uint8, gguf.GGUFValueType.UINT8), (np.int8, gguf.GGUFValueType.INT8),
    (np.uint16, gguf.GGUFValueType.UINT16), (np.int16, gguf.GGUFValueType.INT16),
    (np.uint32, gguf.GGUFValueType.UINT32), (np.int32, gguf.GGUFValueType.INT32),
    (np.uint64, gguf.GGUFValueType.UINT64), (np.int64, gguf.GGUFValueType.INT64),
    (np.float32, gguf.GGUFValueType.FLOAT32), (np.float64, gguf.GGUFValueType.FLOAT64),
    (np.bool_, gguf.GGUFValueType.BOOL))}


def _value_type(v) -> gguf.GGUFValueType:
    T = gguf.GGUFValueType
    if isinstance(v, (np.generic, np.ndarray)) and v.dtype in _VALUE_TYPES:
        return _VALUE_TYPES[v.dtype]
    if isinstance(v, (bool, np.bool_)):
        return T.BOOL
    if isinstance(v, (int, np.integer)):
        return T.UINT32 if v >= 0 else T.INT32
    if isinstance(v, (float, np.floating)):
        return T.FLOAT32
    if isinstance(v, str):
        return T.STRING
    raise TypeError(f"no GGUF type for {type(v).__name__}")


def write_metadata(writer, md: dict) -> None:
    """Add `md` to a gguf.GGUFWriter, choosing GGUF value types from the Python types (NumPy
    values keep theirs, so a GGUF base's keys are written back with the type they were read).

    general.architecture is skipped: GGUFWriter(path, arch) writes it itself.
    """
    T = gguf.GGUFValueType
    for key, value in md.items():
        if key == Keys.General.ARCHITECTURE:
            continue
        if hasattr(value, "tolist") and not isinstance(value, (np.ndarray, np.generic)):
            value = np.array(value)  # mx.array -> NumPy, keeping its dtype
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) == 0:
                continue
            if isinstance(value, np.ndarray):
                sub = _value_type(value)
            else:
                sub = T.INT32 if key == Keys.Tokenizer.TOKEN_TYPE else _value_type(value[0])
            writer.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, value, _value_type(value))


def write_gguf(path, arch: str, metadata: dict, tensors: list[TensorSpec], quant: str) -> None:
    """Write a GGUF one tensor at a time (memory: one tensor, not the model)."""
    writer = gguf.GGUFWriter(str(path), arch)
    write_metadata(writer, metadata)
    plan = []
    for t in tensors:
        qtype = _ggml_type(t.name, t.shape, quant)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, qtype), raw_dtype=qtype)
        plan.append((t, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t, qtype in plan:
            w = t.get()
            if tuple(w.shape) != tuple(t.shape):
                raise ValueError(f"tensor {t.name}: shape {tuple(w.shape)}, expected {t.shape}")
            writer.write_tensor_data(_encode(w, qtype))
    finally:
        writer.close()


def file_type(quant: str) -> int:
    """general.file_type (llama.cpp's LLAMA_FTYPE_*) of a file written as `quant`."""
    name = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(quant, f"MOSTLY_{quant.upper()}")
    return int(gguf.LlamaFileType[name])
