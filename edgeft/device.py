"""Which compute path this process takes: the CPU's, or the one MLX's GPU (Metal) takes.

Everything that differs between the two (dequantize-then-BLAS against ``quantized_matmul``,
packed batches and fused kernels, stream groups) asks :func:`on_cpu` and nothing else.
"""

from __future__ import annotations

import mlx.core as mx


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu
