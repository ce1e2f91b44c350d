"""Give MLX's Linux CPU backend a fast BLAS.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS it bundles, which runs fp32
matmul at ~6 GFLOP/s. libmlx resolves ``cblas_sgemm`` and friends through the global symbol
scope, so loading an optimized BLAS with ``RTLD_GLOBAL`` *before* ``import mlx`` makes MLX use
it, with no rebuild. This must run before anything imports ``mlx``; ``edgeft/__init__.py``
calls :func:`ensure` first thing.

Candidates, first found wins (override with ``EDGEFT_BLAS=/path/to/lib.so`` or ``EDGEFT_BLAS=none``):
MKL from the ``mkl`` wheel (a dependency on Linux x86_64), then a system OpenBLAS.

Settings that a library reads once from the environment are given to it with
:func:`set_while`, which takes them out again, so that child processes (pip, llama.cpp, other
programs) never inherit them.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# What was loaded, for `edgeft doctor`: (name, path) or ("reference BLAS bundled with mlx", None).
LOADED: tuple[str, str | None] | None = None

_SYSTEM_OPENBLAS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


def candidates() -> list[tuple[str, str]]:
    """(name, path) of every optimized BLAS found on this machine, in order of preference."""
    found = []
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix])
    for prefix in prefixes:
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            found.append(("MKL", path))
            break
    for path in _SYSTEM_OPENBLAS:
        if os.path.exists(path):
            found.append(("OpenBLAS", path))
            break
    return found


@contextmanager
def set_while(name: str, value: str):
    """Set an environment variable for the duration of the block, for a library that reads it
    once in there; then remove it again. A value the user set is theirs: left as it is."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _start_mkl(lib: ctypes.CDLL) -> None:
    # MKL's OpenMP workers spin for 200 ms after each BLAS call by default, holding a core that
    # MLX's own thread needs between calls: with 0, ~20% more tokens per CPU-second and up to
    # 1.5x the speed on a busy machine. The OpenMP runtime reads KMP_BLOCKTIME once, when MKL
    # first asks it for threads, and gives it to every thread it meets later (MLX's included).
    start = getattr(lib, "MKL_Get_Max_Threads", None)
    if start is not None:
        with set_while("KMP_BLOCKTIME", "0"):
            start()


def ensure() -> tuple[str, str | None]:
    """Load the best BLAS into the global symbol scope once; return what is in use."""
    global LOADED
    if LOADED is not None:
        return LOADED
    if sys.platform != "linux" or "mlx.core" in sys.modules:
        # macOS: MLX uses Accelerate. Already imported: too late to change it.
        LOADED = ("as linked by mlx", None)
        return LOADED
    choice = os.environ.get("EDGEFT_BLAS", "").strip()
    if choice.lower() == "none":
        LOADED = ("reference BLAS bundled with mlx (EDGEFT_BLAS=none)", None)
        return LOADED
    options = [("EDGEFT_BLAS", choice)] if choice else candidates()
    for name, path in options:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            if name == "EDGEFT_BLAS":
                raise RuntimeError(f"EDGEFT_BLAS={path}: cannot load that library") from None
            continue
        _start_mkl(lib)
        LOADED = (name, str(Path(path).resolve()))
        return LOADED
    LOADED = ("reference BLAS bundled with mlx (slow: install mkl or libopenblas0)", None)
    return LOADED
