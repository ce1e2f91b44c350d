"""Which compute path this process takes: the CPU's, or the one MLX's GPU (Metal) takes.

Everything that differs between the two (dequantize-then-BLAS against ``quantized_matmul``,
packed batches and fused kernels, stream groups, a dense model for generating, the memory
plan's model of the weights) asks :func:`on_cpu` and nothing else.

The path follows MLX's default device unless the environment variable ``EDGEFT_COMPUTE_PATH``
says otherwise:

  auto (or unset)  the CPU path on the CPU, the GPU path on a GPU.
  gpu              the GPU path on whatever device MLX computes on: quantized layers keep
                   ``mx.quantized_matmul``, half-precision weights stay half, batches are padded
                   (not packed), MLX's own ops, one stream, and a model loaded for generating
                   stays quantized. On a CPU this runs Apple Silicon's code where there is no
                   Apple Silicon (tests/test_gpu_path.py); it is slower there than the CPU path
                   and says nothing about speed on Metal.

The variable is read once, at the first question: a process never changes path half way.
"""

from __future__ import annotations

import os
from functools import cache

import mlx.core as mx

from edgeft.errors import UserError

COMPUTE_PATH_VARIABLE = "EDGEFT_COMPUTE_PATH"
COMPUTE_PATHS = ("auto", "gpu")


class ComputePathError(UserError):
    pass


def on_cpu() -> bool:
    """Whether this process computes the CPU's way (see the module docstring)."""
    return _compute_path() == "auto" and mx.default_device() == mx.cpu


@cache
def _compute_path() -> str:
    value = os.environ.get(COMPUTE_PATH_VARIABLE, "")
    path = value.strip().lower() or "auto"
    if path not in COMPUTE_PATHS:
        raise ComputePathError(
            f"{COMPUTE_PATH_VARIABLE}={value!r} is not a compute path; set it to gpu (compute as "
            "on Apple Silicon's GPU, on any device) or auto, or unset it"
        )
    return path
