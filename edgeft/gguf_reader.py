"""The hardened GGUF reader: header, tensor table and metadata, every count and offset checked
against the file before anything is read or allocated.

Nothing here knows a model family (that is edgeft.families); this module answers what a GGUF
file holds, or refuses it in one line naming the file and what to do.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
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
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
# Smallest encodings: a tensor info (u64 name length, u32 n_dims, u32 type, u64 offset) and
# a key-value pair (u64 key length, u32 type, 1-byte value): lets a header that claims more
# entries than the file can hold be refused before anything is read or allocated.
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
MIN_KV_BYTES = 8 + 4 + 1


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
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
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
                decode = with_metadata or key == gguf.Keys.General.ALIGNMENT
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
    alignment = metadata.get(gguf.Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
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
