"""Give MLX's Linux CPU backend a fast BLAS.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS it bundles, which runs fp32
matmul at ~6 GFLOP/s. libmlx resolves ``cblas_sgemm`` and friends through the global symbol
scope, so loading an optimized BLAS with ``RTLD_GLOBAL`` *before* ``import mlx`` makes MLX use
it, with no rebuild. This must run before anything imports ``mlx``; ``edgeft/__init__.py``
calls :func:`ensure` first thing.

Candidates, first found wins (override with ``EDGEFT_BLAS=/path/to/lib.so`` or ``EDGEFT_BLAS=none``):
MKL from the ``mkl`` wheel (a dependency on Linux x86_64), then a system OpenBLAS.

With MKL, MLX's ``cblas_sgemm`` is edgeft's own (``edgeft/_sgemm.c``, built by the install): it
hands MKL a wide product as calls of ``SPLIT_COLUMNS`` output columns each, which MKL's
single-thread sgemm does faster (README, "How it runs on a CPU"). ``EDGEFT_SGEMM_SPLIT=0`` turns that off,
``EDGEFT_SGEMM_SPLIT=N`` makes it N columns per call. Inside :func:`bf16` it also hands the
larger products to MKL's ``cblas_gemm_bf16bf16f32`` (inputs rounded to bfloat16, fp32 sums),
which CPUs with bfloat16 units run faster than sgemm (AMX: 3-4x a product, rounding included);
:func:`bf16_speedup` measures by how much on this machine.

Settings that a library reads once from the environment are given to it with
:func:`set_while`, which takes them out again, so that child processes (pip, llama.cpp, other
programs) never inherit them.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# What was loaded, for `edgeft doctor`: (name, path) or ("reference BLAS bundled with mlx", None).
LOADED: tuple[str, str | None] | None = None

# Products whose output has at least SPLIT_FROM_COLUMNS columns and SPLIT_FROM_ROWS rows reach MKL
# as calls of SPLIT_COLUMNS columns (edgeft/_sgemm.c). Interleaved A/B, whole training steps on
# an AMD EPYC (AVX2), against whole products: SmolLM2-135M 1.04-1.10x, Gemma 3 270M 1.09-1.13x,
# Qwen2.5-0.5B's shapes 1.11-1.25x; 512 columns no better (README). Not measured on Intel.
SPLIT_COLUMNS = 256
SPLIT_FROM_COLUMNS = 1024
SPLIT_FROM_ROWS = 64
# What the split does in this process, for `edgeft doctor`.
SPLIT: str | None = None
_split_lib: ctypes.CDLL | None = None
_sgemm: int | None = None  # the BLAS's own cblas_sgemm
_bf16_gemm: int | None = None  # MKL's cblas_gemm_bf16bf16f32
_columns = 0  # the split in force
# Inside bf16(): products whose sides (rows, columns, inner) are all at least this many go in
# bfloat16. The rank-8 LoRA products stay fp32.
BF16_FROM = 32
_speedup: float | None = None
_bf16_on = False

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


def _split_columns() -> int:
    setting = os.environ.get("EDGEFT_SGEMM_SPLIT", "").strip()
    if not setting:
        return SPLIT_COLUMNS
    if not setting.isdigit():
        raise RuntimeError(f"EDGEFT_SGEMM_SPLIT={setting}: give output columns per call (e.g. 256), or 0 for none")
    return int(setting)


def _load_split(blas: ctypes.CDLL) -> str:
    """Put edgeft's cblas_sgemm into the global scope, ahead of `blas` (not yet global), calling it."""
    global _split_lib, _sgemm
    columns = _split_columns()
    if columns == 0:
        return "off (EDGEFT_SGEMM_SPLIT=0)"
    spec = importlib.util.find_spec("edgeft._sgemm")
    if spec is None or not spec.origin:
        return "off (edgeft._sgemm was not built: the install found no C compiler)"
    _split_lib = ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
    _sgemm = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p).value
    global _bf16_gemm
    gemm = getattr(blas, "cblas_gemm_bf16bf16f32", None)
    _bf16_gemm = ctypes.cast(gemm, ctypes.c_void_p).value if gemm is not None else None
    _set_split(columns)
    return f"outputs >= {SPLIT_FROM_COLUMNS} columns in calls of {columns} columns (edgeft._sgemm)"


def _set_split(columns: int) -> None:
    global _columns
    _split_lib.edgeft_sgemm_next(ctypes.c_void_p(_sgemm), columns, SPLIT_FROM_COLUMNS, SPLIT_FROM_ROWS)
    _columns = columns


@contextmanager
def split(columns: int):
    """Wide products as calls of `columns` output columns inside the block (0: whole, as MLX asks
    for them); a no-op where they are not split (SPLIT says why). Not for blocks that run while
    another thread evaluates MLX arrays."""
    if _split_lib is None:
        yield
        return
    before = _columns
    _set_split(columns)
    try:
        yield
    finally:
        _set_split(before)


def bf16_available() -> bool:
    """Whether bf16() can hand products to a bfloat16 GEMM in this process (MKL and edgeft._sgemm)."""
    return _split_lib is not None and _bf16_gemm is not None


@contextmanager
def bf16(on: bool = True):
    """Inside the block, MLX's products with every side >= BF16_FROM take bfloat16 inputs and fp32
    sums (MKL's cblas_gemm_bf16bf16f32); a no-op where bf16_available() is False. Not for blocks
    that run while another thread evaluates MLX arrays."""
    global _bf16_on
    if not (on and bf16_available()) or _bf16_on:
        yield
        return
    _split_lib.edgeft_sgemm_bf16(ctypes.c_void_p(_bf16_gemm), BF16_FROM)
    _bf16_on = True
    try:
        yield
    finally:
        for a in _fixed.values():
            if sys.getrefcount(a) > 3:  # held beyond _fixed (and this loop): it outlives the block
                import numpy as np

                _split_lib.edgeft_sgemm_restore(ctypes.c_void_p(np.asarray(a).ctypes.data))
        _split_lib.edgeft_sgemm_unfix()  # first: released matrices take products in bf16 only
        _split_lib.edgeft_sgemm_bf16(None, 0)
        _fixed.clear()
        _bf16_on = False


# Fixed matrices inside bf16(): id -> the array, kept alive (its memory is its own) while its
# bfloat16 copy may be used.
_fixed: dict[int, object] = {}


def fix(arrays, release: bool = False) -> None:
    """Inside bf16(), while nothing is being evaluated: these MLX fp32 matrices (evaluated here if
    they are not yet) do not change until the block ends (a run's dequantized base weights), so
    each is rounded to bfloat16 once, at its first product, not in every product (2 bytes per
    value, freed at the end of the block). With `release`, each is rounded now and its fp32
    memory (the whole pages of it) goes back to the system: only the block's products may read
    it (they take it in bf16 whatever their sides; anything else reading it faults). At the
    block's end an array that nothing else holds any more stays zeros, without taking memory
    again, until it is freed; one still held elsewhere gets its bf16 values back."""
    if not _bf16_on:
        return
    import numpy as np

    for a in arrays:
        if id(a) in _fixed:
            continue
        view = np.asarray(a)  # the array's own memory (evaluated if it was not)
        if view.dtype != np.float32 or not view.flags.c_contiguous:
            continue
        if not _split_lib.edgeft_sgemm_fix(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.size), int(release)):
            return
        _fixed[id(a)] = a


def bf16_speedup() -> float | None:
    """sgemm's time over the bf16 path's (rounding included) at one BLAS thread, on a product of a
    small model's shape (512 x 576 @ 576 x 1536), measured once per process (~50 ms, and MKL's
    first bf16 call) while nothing is being evaluated; None where there is no bf16 path. Above 1
    the CPU multiplies bfloat16 faster (AMX; AVX512-BF16)."""
    global _speedup
    if _speedup is None and bf16_available():
        import time

        import numpy as np

        m, k, n = 512, 576, 1536
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        c = np.empty((m, n), np.float32)
        ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        blas = ctypes.CDLL(LOADED[1])
        threads = blas.MKL_Set_Num_Threads_Local(1)

        def best(on: bool) -> float:  # bf16 on or off whatever the block it is called in
            _split_lib.edgeft_sgemm_bf16(ctypes.c_void_p(_bf16_gemm) if on else None, BF16_FROM)
            times = []
            for _ in range(6):
                tic = time.perf_counter()
                _split_lib.cblas_sgemm(101, 111, 111, m, n, k, ctypes.c_float(1.0), ptr(a), k, ptr(b), n,
                                       ctypes.c_float(0.0), ptr(c), n)
                times.append(time.perf_counter() - tic)
            return min(times[1:])

        try:
            _speedup = best(False) / best(True)
        finally:
            _split_lib.edgeft_sgemm_bf16(ctypes.c_void_p(_bf16_gemm) if _bf16_on else None, BF16_FROM)
            blas.MKL_Set_Num_Threads_Local(threads)
    return _speedup


def _global_sgemm() -> int:
    """The cblas_sgemm that libraries loaded from now on (libmlx) will call."""
    return ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value


def ensure() -> tuple[str, str | None]:
    """Load the best BLAS into the global symbol scope once; return what is in use."""
    global LOADED, SPLIT, _split_lib
    if LOADED is not None:
        return LOADED
    SPLIT = "off (MKL only)"
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
            lib = ctypes.CDLL(path)  # not global yet: edgeft's cblas_sgemm goes ahead of it
        except OSError:
            if name == "EDGEFT_BLAS":
                raise RuntimeError(f"EDGEFT_BLAS={path}: cannot load that library") from None
            continue
        if name == "MKL":  # where it was measured
            SPLIT = _load_split(lib)
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if _split_lib is not None and _global_sgemm() != ctypes.cast(_split_lib.cblas_sgemm, ctypes.c_void_p).value:
            SPLIT, _split_lib = "off (another library's cblas_sgemm comes first in this process)", None
        _start_mkl(lib)
        LOADED = (name, str(Path(path).resolve()))
        return LOADED
    LOADED = ("reference BLAS bundled with mlx (slow: install mkl or libopenblas0)", None)
    return LOADED
