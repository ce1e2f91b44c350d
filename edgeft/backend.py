"""How quantized weights multiply, decided in this one place.

Metal: MLX's fused ``mx.quantized_matmul`` is fast; nothing changes.
CPU: ``mx.quantized_matmul`` runs ~50x slower than dequantizing the weight and doing an fp32
matmul through BLAS (1024x576 @ 576x1536: 800 ms against 15 ms, ../shared/FACTS.md), and CPU
half-precision matmul has no BLAS path at all. So on CPU every quantized layer dequantizes
its weight just in time (the base stays 4-bit in memory) and the model computes in fp32.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The full-precision weight of a (possibly quantized) Linear or Embedding."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(
            layer["weight"],
            scales=layer["scales"],
            biases=layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    return layer["weight"]


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


_CPU_CLASSES = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}


def prepare(model: nn.Module, cpu: bool | None = None) -> nn.Module:
    """Make `model` compute the fast way for the current device (in place; returns it).

    On CPU: quantized layers switch to their dequantize-then-BLAS twins (same parameters,
    same file layout) and half-precision parameters become fp32.
    """
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return model
    for _, module in model.named_modules():
        twin = _CPU_CLASSES.get(type(module))
        if twin is not None:
            module.__class__ = twin

    def to_fp32(x):
        return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x

    model.update(tree_map(to_fp32, model.parameters()))
    return model


def prepare_inference(model: nn.Module, cpu: bool | None = None) -> nn.Module:
    """Make `model` fast at generating one token at a time (in place; returns it).

    On CPU a one-row product is memory-bound, and both MLX's 4-bit kernel and just-in-time
    dequantization run it at well under 1 GFLOP/s; fp32 weights through BLAS are ~10x faster.
    So LoRA layers are merged and every quantized layer is dequantized once (memory: 4 bytes
    a weight). On Metal the model stays as it is.
    """
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return model
    from edgeft.lora import merge

    merge(model)
    dense = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = dequantized_weight(module).astype(mx.float32)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            lin.weight = w
            if "bias" in module:
                lin.bias = module["bias"]
            dense.append((name, lin))
        elif isinstance(module, nn.QuantizedEmbedding):
            w = dequantized_weight(module).astype(mx.float32)
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            dense.append((name, emb))
    if dense:
        model.update_modules(tree_unflatten(dense))
    mx.eval(model.parameters())
    return model
