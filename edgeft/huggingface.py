"""The Hugging Face Hub and its cache, through huggingface_hub: which file of a repo to take,
fetching it (or finding it in the cache when offline), checking a pinned sha256, and saying in
one line why a repo could not be had.

Nothing here reads a pickle or runs a repository's code: folders are fetched as config.json,
safetensors and tokenizer files only. ``HF_HUB_OFFLINE=1`` uses cached copies and never touches
the network; an unreachable Hub is detected by a 3 s probe first, because huggingface_hub 2.4
retries five times with back-off: measured, 23.5 s when DNS fails at once and 394 s against a
server that accepts connections but never answers (what a firewall dropping packets looks like).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import ssl
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeft.files import sha256_file
from edgeft.registry import FOLDER_PATTERNS, SourceMiss, safe_relpath

PROBE_TIMEOUT = 3.0  # seconds a Hub reachability probe may take (DNS included)
# never fetched from a repo: pickle weights and code
NEVER_FETCH = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack",
               "*.py", "*.onnx", "*.onnx_data")


@dataclass(frozen=True)
class Target:
    """What to get from a repo: one GGUF file, the GGUF a quant tag names, or a folder."""

    repo: str
    revision: str | None
    file: str | None               # exact GGUF file
    tag: str | None                # quant tag to pick a GGUF file by
    patterns: tuple[str, ...]      # folder files (built-in folder models)
    sha256: str | None


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
def _progress(show: bool):
    """huggingface_hub's progress bars on (`show`) or off. Byte progress stays its own bar on
    stderr: a log callback takes whole lines, and a line per chunk would flood it."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def from_cache(t: Target) -> Path:
    """`t` as the Hugging Face cache holds it, without touching the network."""
    return _fetch(t, offline=True)


def from_hub(t: Target, log: Callable[[str], None] | None = None) -> Path:
    """`t` downloaded from the Hub into the HF cache, after a short probe that the Hub answers.
    `log` hears what is fetched, and then huggingface_hub's progress bars show (not without)."""
    if _hf_offline():
        raise SourceMiss("skipped: HF_HUB_OFFLINE is set")
    endpoint = _endpoint()
    why = _hub_unreachable(endpoint)
    if why:
        raise SourceMiss(why)
    if log:
        log(f"fetching {t.repo}{':' + t.file if t.file else ''} from {endpoint}")
    return _fetch(t, offline=False, show_progress=log is not None)


def _fetch(t: Target, offline: bool, show_progress: bool = False) -> Path:
    """Get `t` from the HF cache only (offline=True) or from the Hub into the HF cache."""
    try:
        with _progress(show_progress):
            if t.file:
                path = _download_file(t, t.file, offline)
            elif t.patterns:
                path = _download_folder(t, t.patterns, offline)
            else:
                kind, fname = choose(_repo_files(t, offline), t.tag)
                if kind == "gguf":
                    path = _download_file(t, fname, offline)
                else:
                    path = _download_folder(t, FOLDER_PATTERNS, offline)
    except SourceMiss:
        raise
    except Exception as e:  # huggingface_hub / network errors become one line
        raise SourceMiss(_hub_reason(e, t, offline)) from e
    if t.sha256 and path.is_file():
        _check_hub_sha(path, t.sha256, fresh=not offline)
    return path


def _hub_kwargs(t: Target, offline: bool) -> dict:
    return dict(repo_id=t.repo, revision=t.revision, cache_dir=_hf_cache(),
                local_files_only=offline, endpoint=_endpoint(), etag_timeout=_etag_timeout())


def _download_file(t: Target, fname: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    safe_relpath(fname, "file name")
    return Path(hf_hub_download(filename=fname, **_hub_kwargs(t, offline)))


def _download_folder(t: Target, patterns, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(allow_patterns=list(patterns),
                                    ignore_patterns=list(NEVER_FETCH), **_hub_kwargs(t, offline)))
    names = [p.name for p in folder.iterdir()]
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise SourceMiss(f"{t.repo}: no config.json + *.safetensors in {folder} (edgeft never "
                         "loads pickle *.bin weights)")
    return folder


def _repo_files(t: Target, offline: bool) -> list[str]:
    """The repo's file names: from the Hub, or from the cached snapshot when offline."""
    if not offline:
        from huggingface_hub import HfApi

        return HfApi(endpoint=_endpoint()).list_repo_files(t.repo, revision=t.revision)
    snap = _cached_snapshot(t.repo, t.revision)
    if snap is None:
        raise SourceMiss(f"{t.repo} not in {_hf_cache()}")
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """snapshots/<commit> of `repo` in the HF cache (models--org--name/refs/<rev> -> commit)."""
    base = _hf_cache() / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    commit = rev
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        ref = base / "refs" / safe_relpath(rev, "revision")
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = base / "snapshots" / safe_relpath(commit, "commit")
    return snap if snap.is_dir() else None


_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.I)


def choose(files: list[str], tag: str | None) -> tuple[str, str | None]:
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
            raise SourceMiss(f"no GGUF file ending in {tag}.gguf "
                             f"(have: {_few(ggufs) or 'none'})")
        raise SourceMiss(f"several GGUF files match {tag}: {_few(hits)}; "
                         "pass org/name:FILE.gguf")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return "folder", None
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    for preferred in ("Q4_K_M", "Q8_0"):
        hits = by_tag(preferred)
        if len(hits) == 1:
            return "gguf", hits[0]
    if ggufs:
        raise SourceMiss(f"several GGUF files ({_few(ggufs)}): pick one with org/name:FILE.gguf "
                         "or org/name:QUANT")
    if any(fnmatch.fnmatch(f, p) for f in files for p in NEVER_FETCH[:6]):
        raise SourceMiss("only pickle weights (*.bin/*.pt), which edgeft never loads; use a "
                         "repo with GGUF or safetensors")
    raise SourceMiss("no GGUF file and no config.json + *.safetensors "
                     f"(have: {_few(files) or 'none'})")


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
        raise SourceMiss(f"{path} has sha256 {got}, expected {expected}: refusing it (delete it "
                         "from the Hugging Face cache to fetch it again)")


def _hub_reason(e: Exception, t: Target, offline: bool) -> str:
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
