"""Quantized weights made full precision: the one primitive, and the layers that use it.

A leaf of the package (it imports only mlx, edgeft.device and edgeft.cpu_kernels): backend.py swaps quantized
layers for the ``Dequantized*`` twins below, and lora.py merges adapters into
:func:`dequantized_weight`, without either importing the other.

On the CPU a quantized layer multiplies through its dequantized weight: MLX's
``quantized_matmul`` there is ~50x slower than dequantize + fp32 BLAS (../shared/FACTS.md).
Inside a training forward (:func:`in_forward`) the dequantized weights can be kept: for the
whole run (:func:`keep_dequantized`) or for the stream groups of one batch
(:func:`shared_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from edgeft import cpu_kernels
from edgeft.device import on_cpu

_IN_FORWARD: ContextVar[bool] = ContextVar("edgeft_in_forward", default=False)
_KEPT_WEIGHTS: ContextVar[dict | None] = ContextVar("edgeft_kept_weights", default=None)
_ON_KEEP: ContextVar[Callable[[mx.array], None] | None] = ContextVar("edgeft_on_keep", default=None)
_SHARED_WEIGHTS: ContextVar[dict | None] = ContextVar("edgeft_shared_weights", default=None)


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The full-precision weight of a (possibly quantized) Linear or Embedding."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        memo = None
        if _IN_FORWARD.get():
            memo = _KEPT_WEIGHTS.get()
            memo = _SHARED_WEIGHTS.get() if memo is None else memo
        if memo is not None and id(layer) in memo:
            return memo[id(layer)][1]
        w = dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.bits, layer.group_size, layer.mode)
        if memo is not None:
            memo[id(layer)] = (layer, w)  # the layer too: its id stays its own while kept
            on_keep = _ON_KEEP.get() if memo is _KEPT_WEIGHTS.get() else None
            if on_keep is not None:
                mx.eval(w)  # depends on no traced array (best outside one: backend.keep_weights)
                on_keep(w)
        return w
    return layer["weight"]


def dequantize(w, scales, biases, bits: int, group_size: int, mode: str) -> mx.array:
    """mx.dequantize, through one fused loop for affine 2/4/8-bit weights on the CPU."""
    if mode == "affine" and biases is not None and bits in (2, 4, 8) and on_cpu():
        return _affine_dequantizer(bits, group_size)(w, scales, biases)
    return mx.dequantize(w, scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode)


@lru_cache(maxsize=None)
def _affine_dequantizer(bits: int, group_size: int):
    """mx.dequantize for affine 2/4/8-bit weights as one fused loop: the same values, ~2x faster
    on CPU (4-bit 1536x576: 2.4 -> 1.3 ms; SmolLM2's 8-bit embedding: 217 -> 86 ms). Element j
    of a uint32 word sits in its bits [j * bits, (j + 1) * bits), as MLX packs them."""
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)

    def dequantize(w, scales, biases):
        rows, groups = w.shape[:-1], scales.shape[-1]
        q = (w.reshape(*rows, groups, group_size // per_word, 1) >> shifts) & ((1 << bits) - 1)
        out = q.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
        return out.reshape(*rows, groups * group_size)

    return cpu_kernels.fused(dequantize)  # fused even on arrays that mx.grad traces


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its dequantized weight through BLAS."""

    def __call__(self, x):
        x = x @ dequantized_weight(self).T
        if "bias" in self:
            x = x + self["bias"]
        return x


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied output projection goes through BLAS."""

    def as_linear(self, x):
        return x @ dequantized_weight(self).T


@contextmanager
def in_forward():
    """Within: a training forward (backend.fast_forward), where kept weights are used."""
    token = _IN_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_FORWARD.reset(token)


@contextmanager
def keep_dequantized(enabled: bool = True, store: dict | None = None,
                     on_keep: Callable[[mx.array], None] | None = None):
    """Within (a training run: the base weights do not change): the fast forward dequantizes
    each weight once and keeps it for every later step. Without gradient checkpointing this
    costs no peak memory, since a step's backward holds every layer's dequantized weight at
    once anyway (the memory plan's "dequantized" part), and it saves the per-step
    dequantization and the wait of one stream group for another's (SmolLM2, batch 4, 2
    streams: 175 -> 218 tokens/s, scripts/profile_step.py ab base dequantize-each-step). With
    checkpointing (enabled False) weights are made again for each layer's recomputation, as
    the estimate assumes. `store`: keep them in this dict, to share them across blocks.
    `on_keep(w)`: called with each weight when it is first kept, evaluated, before any product
    reads it (backend.matmul_precision's keep)."""
    token = _KEPT_WEIGHTS.set((store if store is not None else {}) if enabled else None)
    keep_token = _ON_KEEP.set(on_keep if enabled else None)
    try:
        yield
    finally:
        _ON_KEEP.reset(keep_token)
        _KEPT_WEIGHTS.reset(token)


@contextmanager
def shared_weights():
    """Within: the fast forwards of one batch (its groups on several streams) dequantize each
    weight once between them."""
    token = _SHARED_WEIGHTS.set({})
    try:
        yield
    finally:
        _SHARED_WEIGHTS.reset(token)
