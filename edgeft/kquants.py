"""ggml block formats that are MLX affine quantization: GGUF blocks -> MLX triplets, exactly.

MLX affine quantization holds a row as groups of 32 values `scale * q + bias`, q unsigned of
`bits` bits. Every ggml format whose blocks are groups of 32 with one scale and one offset is
that already: Q4_0 (d*(q-8)), Q4_1 (d*q+m), Q5_0 (d*(q-16)), Q5_1 (d*q+m), Q8_0 (d*q, q
signed: d*(q+128) - 128d), and the K-quants Q4_K and Q5_K, whose 256-value super-blocks are 8
groups of 32 with scale d*sc and bias -dmin*m (6-bit sc and m). Their triplets hold the
file's values, not a re-quantization of them. Scales and biases are float32: d*sc and
dmin*m need up to 17 significant bits, and scale * q (at most 22 bits) is then exact too, so
the triplet dequantizes to gguf-py's float32 values exactly. Q6_K, Q2_K and Q3_K use
sub-blocks of 16, which MLX's smallest group (32) cannot hold.

Layouts follow gguf-py's `gguf.quants` (and ggml-quants.c). All functions take a tensor's raw
bytes as rows (one row of blocks per output row) and are pure NumPy until `triplet`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

GROUP = 32
K_BLOCK = 256  # a K-quant super-block: 8 groups
# bits of the MLX quantization each exactly-held ggml type becomes
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}


def triplet(kind: str, rows: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
    """(weight, scales, biases) of MLX affine group-32 quantization at AFFINE_BITS[kind] for a
    tensor of ggml type `kind` given as uint8 `rows` (rows, bytes per row)."""
    q, scales, biases = UNPACK[kind](np.ascontiguousarray(rows))
    return mx.array(pack(q, AFFINE_BITS[kind])), mx.array(scales), mx.array(biases)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values (rows, n) of `bits` bits as MLX packs them: one little-endian bit stream,
    value j in bits [j * bits, (j + 1) * bits), read as uint32 words."""
    rows, n = q.shape
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    eight = q.reshape(rows, n // 8, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * bits)
    stream = np.bitwise_or.reduce(eight, axis=-1)  # 8 values in the low 8 * bits bits
    return np.ascontiguousarray(stream[..., None].view(np.uint8)[..., :bits]).reshape(rows, -1).view(np.uint32)


def _blocks(rows: np.ndarray, size: int) -> np.ndarray:
    return rows.reshape(rows.shape[0], -1, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) as float16 -> float32, shape without that axis."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are values 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) -> bit i of value i, as 0/16."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def _out(q: np.ndarray, scales: np.ndarray, biases: np.ndarray):
    rows = q.shape[0]
    return (q.reshape(rows, -1), scales.reshape(rows, -1).astype(np.float32),
            biases.reshape(rows, -1).astype(np.float32))


def _q4_0(rows):
    b = _blocks(rows, 18)
    d = _f16(b[..., 0:2])
    return _out(_nibbles(b[..., 2:]), d, -8 * d)


def _q4_1(rows):
    b = _blocks(rows, 20)
    return _out(_nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q5_0(rows):
    b = _blocks(rows, 22)
    d = _f16(b[..., 0:2])
    return _out(_nibbles(b[..., 6:]) | _high_bits(b[..., 2:6]), d, -16 * d)


def _q5_1(rows):
    b = _blocks(rows, 24)
    return _out(_nibbles(b[..., 8:]) | _high_bits(b[..., 4:8]), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q8_0(rows):
    b = _blocks(rows, 34)
    d = _f16(b[..., 0:2])
    return _out(b[..., 2:] ^ np.uint8(0x80), d, -128 * d)  # int8 q + 128, as unsigned


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-quant super-block's scale d*sc and bias -dmin*m for each of its 8 groups (the 12
    bytes of 6-bit sc and m after d and dmin, packed as gguf-py's Q4_K.get_scale_min reads)."""
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    s = b[..., 4:16]
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 8 groups of 32: group 2j is the low nibbles of bytes 32j..32j+31, 2j+1 the high."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    return (chunks & 0x0F).reshape(*qs.shape[:-1], 8, 32)


def _q4_k(rows):
    b = _blocks(rows, 144)
    scales, biases = _k_scales(b)
    return _out(_k_nibbles(b[..., 16:]), scales, biases)


def _q5_k(rows):
    b = _blocks(rows, 176)
    scales, biases = _k_scales(b)
    qh = b[..., 16:48]  # bit g of byte i: the fifth bit of value i of group g
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    return _out(_k_nibbles(b[..., 48:]) | (high << 4), scales, biases)


UNPACK = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
          "Q4_K": _q4_k, "Q5_K": _q5_k}
