"""What the machine and this process have: the CPU's instruction sets, memory a new allocation
can get, this process's resident memory (now and at its peak), what it holds outside MLX's
arrays, free disk."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (avx2, avx512_bf16, amx_int8, ...); empty
    where /proc/cpuinfo is not there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def available_memory() -> tuple[int | None, str]:
    """(bytes a new allocation can get without swapping, where the figure comes from)."""
    try:
        import mlx.core as mx

        if mx.default_device() != mx.cpu and hasattr(mx, "metal") and mx.metal.is_available():
            info = mx.metal.device_info()
            limit = info.get("max_recommended_working_set_size")
            if limit:
                return int(limit), "Metal's recommended working set"
    except Exception:  # noqa: BLE001 - a probe; fall back to the OS figures
        pass
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
        except OSError:
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (Linux), e.g. 'VmRSS', in bytes; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """This program's resident-memory high-water mark. On Linux VmHWM, not ru_maxrss: that
    one survives exec, so a process started by a big one (pytest, an IDE) reports its parent's
    RSS at fork time as its own peak."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB


def current_rss() -> int:
    """Resident memory of this process now (Linux), else its peak so far."""
    now = _proc_status_bytes("VmRSS")
    return peak_rss() if now is None else now


def bytes_outside_mlx() -> int:
    """What this process holds outside MLX's buffers now, once BLAS has started its threads:
    Python, the libraries, BLAS's thread buffers, the tokenizer and data."""
    import mlx.core as mx

    a = mx.ones((256, 256))
    mx.eval(a @ a)  # BLAS and its thread pool start on first use
    del a
    return max(current_rss() - mx.get_active_memory() - mx.get_cache_memory(), 0)


def free_disk(path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
