"""Files edgeft writes and reads whole: atomic writes (a reader sees the old file or the new
one, never half of one) and checksums.

Write to a temporary file in the same folder, fsync it, rename it over the target, fsync
the folder. A crash leaves at worst a stray ``*.tmp*`` file, which the next write replaces.
The finished file gets the permissions a plain ``open(path, "w")`` would give it (the
temporary file is private while it is written): a GGUF is read by other users' programs,
such as the Ollama server that runs as its own user.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: not every OS can fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(tmp: Path, target: Path) -> None:
    """Give the finished temporary file its final permissions, make it durable and rename it
    onto `target`."""
    os.chmod(tmp, default_file_mode())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically,
    on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_save_safetensors(target: str | Path, arrays: dict, metadata: dict | None = None) -> None:
    import mlx.core as mx

    # mx.save_safetensors appends ".safetensors" to names without it: keep that suffix last.
    with atomic_path(target, suffix=".safetensors") as tmp:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as e:  # MLX reports a failed write (a full disk) as RuntimeError
            raise OSError(errno.EIO, f"write failed, is the disk full? ({e})", str(target)) from e


@contextlib.contextmanager
def staged(targets: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths beside `targets`, published onto them (all of them, each atomically)
    only if the block succeeds; removed otherwise."""
    tmps = []
    try:
        for t in targets:
            t = Path(t)
            t.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=t.parent, prefix=f".{t.name}.", suffix=".tmp")
            os.close(fd)
            tmps.append(Path(tmp))
        yield tmps
        for tmp, t in zip(tmps, targets):
            publish(tmp, Path(t))
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
