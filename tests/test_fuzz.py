"""Hostile inputs: fuzzed JSONL and malformed GGUF files end in a report or one clear error,
never a traceback, a hang or a large allocation.

    python -m pytest -q -s tests/test_fuzz.py                         # prints the counts
    EDGEFT_FUZZ_EXAMPLES=5000 python -m pytest -q -s tests/test_fuzz.py   # a longer campaign

Every input tried is counted (COUNTS, printed by the last test): JSONL files through
data_files.check_file / load_samples (and some through `edgeft data check`), GGUF files through
loader.load (and the named malformed cases through `edgeft tune --model`).
"""

import json
import os
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
from chats import tools_tok
from click.testing import CliRunner
from gguf import Keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import (
    gguf_config,
    gguf_tensors,
    make_tiny,
    tiny_config,
    tiny_tokenizer_metadata,
    tiny_weights,
    write_gguf,
)

from edgeft import gguf_reader as G
from edgeft import records
from edgeft.cli import main
from edgeft.config import DataConfig
from edgeft.data_files import check_file, load_samples
from edgeft.loader import ModelLoadError, load
from edgeft.tokenizer import Tokenizer

EXAMPLES = int(os.environ.get("EDGEFT_FUZZ_EXAMPLES", "400"))
COUNTS = {"jsonl": 0, "jsonl_cli": 0, "gguf": 0, "gguf_cli": 0, "damaged_loaded": 0}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata())


@pytest.fixture(scope="module")
def ttok():
    return tools_tok()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tiny_gguf(workdir):
    (workdir / "model").mkdir(exist_ok=True)
    return make_tiny("llama", workdir / "model", "q8_0")[0]


# --- JSONL ------------------------------------------------------------------------------------
def check_never_crashes(path: Path, tok, max_seq_len=64) -> records.Report:
    """The contract: a Report for anything, DataError or samples from load_samples."""
    COUNTS["jsonl"] += 1
    report = check_file(path, tok, DataConfig(), max_seq_len)
    text = report.summary()
    assert text.splitlines()[0].startswith(str(path))
    n_lines = path.read_bytes().count(b"\n") + 1
    assert all(0 <= p.line <= n_lines for p in report.problems)
    for skip in (False, True):
        try:
            samples, _ = load_samples(path, tok, DataConfig(skip_bad_lines=skip), max_seq_len)
        except records.DataError as e:
            assert str(e).splitlines()[0].startswith(str(path))
        else:
            assert samples and all(len(s.tokens) <= max_seq_len and any(s.mask[1:]) for s in samples)
    return report


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                      st.text(max_size=30),
                      st.sampled_from(["user", "assistant", "system", "tool", "bot", "", "<|im_end|>", "<|im_start|>",
                                       "\ud800", "\x00", "\u202e", " " * 5, "human", "gpt", "function_call",
                                       "observation", "function", "call_1", '{"name": "f", "arguments": {}}', "{}",
                                       '{"a": 1}', "[]"]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(["messages", "role", "content", "prompt", "completion", "text",
                                     "weight", "x", "conversations", "from", "value", "system", "tools",
                                     "tool_calls", "tool_call_id", "function", "name", "arguments", "type",
                                     "id"]), kids, max_size=4)), max_leaves=20)
tool_call = st.fixed_dictionaries(
    {"function": st.one_of(st.fixed_dictionaries(
        {}, optional={"name": st.one_of(st.sampled_from(["lookup", ""]), json_leaf),
                      "arguments": st.one_of(st.sampled_from(['{"id": "A1"}', "{}", "{oops", "[1]"]), json_value)}),
        json_value)},
    optional={"id": st.one_of(st.sampled_from(["call_1", "call_2"]), json_leaf), "type": json_leaf},
)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), json_leaf)},
    optional={"content": st.one_of(st.text(max_size=60), json_value), "weight": json_value,
              "tool_calls": st.one_of(st.lists(tool_call, max_size=2), json_value),
              "tool_call_id": st.one_of(st.sampled_from(["call_1", "call_2"]), json_leaf)},
)
turn = st.fixed_dictionaries(
    {"from": st.one_of(st.sampled_from(["human", "gpt", "system", "function_call", "observation", "tool"]),
                       json_leaf)},
    optional={"value": st.one_of(st.text(max_size=60), st.sampled_from(['{"name": "lookup", "arguments": {}}']),
                                 json_value), "weight": json_value},
)
tools = st.one_of(st.just([{"type": "function", "function": {"name": "lookup"}}]), json_value)
line_object = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=5), json_value)},
                          optional={"tools": tools}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(turn, max_size=5), json_value)},
                          optional={"system": json_value, "tools": tools}),
    st.fixed_dictionaries({}, optional={"prompt": json_value, "completion": json_value}),
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=80), json_value)}),
    json_value,
)


def encode_line(obj, mangle: int) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=bool(mangle & 1))
    except (ValueError, TypeError):
        text = repr(obj)
    raw = text.encode("utf-8", "surrogatepass")
    if mangle & 2:  # cut the line short
        raw = raw[: len(raw) // 2]
    if mangle & 4:
        raw = raw.replace(b'"', b"'", 1)
    return raw


def files_checked(fuzz) -> int:
    """Run a hypothesis test body over all its examples; the JSONL files it checked."""
    before = COUNTS["jsonl"]
    fuzz()
    return COUNTS["jsonl"] - before


def test_fuzzed_jsonl_lines_give_a_report_never_a_traceback(tmp_path, tok):
    @FUZZ
    @given(lines=st.lists(st.tuples(line_object, st.integers(0, 7)), min_size=1, max_size=8),
           eol=st.sampled_from([b"\n", b"\r\n", b"\n\n"]), bom=st.booleans())
    def fuzz(lines, eol, bom):
        path = tmp_path / "fuzz.jsonl"
        data = eol.join(encode_line(obj, m) for obj, m in lines)
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
        check_never_crashes(path, tok)

    assert files_checked(fuzz) >= EXAMPLES


@FUZZ
@given(lines=st.lists(st.tuples(line_object, st.integers(0, 7)), min_size=1, max_size=8))
def test_fuzzed_lines_for_a_template_with_tools_give_a_report_never_a_traceback(tmp_path, ttok, lines):
    path = tmp_path / "tools.jsonl"
    path.write_bytes(b"\n".join(encode_line(obj, m) for obj, m in lines))
    check_never_crashes(path, ttok, max_seq_len=512)


def test_random_bytes_give_a_report_never_a_traceback(tmp_path, tok):
    @FUZZ
    @given(data=st.binary(max_size=2000))
    def fuzz(data):
        path = tmp_path / "bytes.jsonl"
        path.write_bytes(data)
        check_never_crashes(path, tok)

    assert files_checked(fuzz) >= EXAMPLES


@settings(max_examples=max(EXAMPLES // 10, 10), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(line_object, st.integers(0, 7)), min_size=1, max_size=5))
def test_fuzzed_files_through_data_check_exit_0_or_1_without_traceback(tmp_path, tiny_gguf, lines):
    path = tmp_path / "cli.jsonl"
    path.write_bytes(b"\n".join(encode_line(o, m) for o, m in lines))
    COUNTS["jsonl_cli"] += 1
    r = CliRunner().invoke(main, ["data", "check", str(path), "--model", str(tiny_gguf)])
    assert r.exit_code in (0, 1), r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("name, raw, problem", [
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("unclosed nesting 1M deep", b'{"messages": ' + b"[" * 1_000_000, "not valid JSON"),
    ("objects nested 50k deep", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    ("5000-digit integer", b'{"text": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("NaN and Infinity", b'{"messages": [{"role": "user", "content": NaN}, {"role": "assistant", "content": Infinity}]}', "is a number"),
    ("NUL bytes", b'{"text": "a\x00b"}', "not valid JSON"),
    ("lone surrogate escape", b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}', "unpaired surrogate"),
    ("invalid UTF-8", b'{"text": "\xc3\x28"}', "not valid UTF-8"),
    ("overlong UTF-8", b'{"text": "\xc0\xaf"}', "not valid UTF-8"),
    ("control token in content", json.dumps({"messages": [{"role": "user", "content": "<|im_start|>system"},
                                                          {"role": "assistant", "content": "x"}]}).encode(), "control token"),
    ("a list, not an object", b"[1, 2, 3]", "not a JSON object"),
    ("messages is a string", b'{"messages": "hi"}', "expected a list"),
    ("role is a list", b'{"messages": [{"role": ["user"], "content": "x"}]}', "unknown role"),
    ("content is a dict", b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "expected a string"),
    ("weight 0.5", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]}', "'weight' must be 0 or 1"),
    ("duplicate keys: the last wins", b'{"messages": 1, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', None),
    ("huge line", None, "longer than"),
])
def test_hostile_jsonl_lines_are_named_problems(tmp_path, tok, monkeypatch, name, raw, problem):
    if raw is None:  # a line over the limit (lowered so the test stays small) then a good one
        monkeypatch.setattr(records, "MAX_LINE_BYTES", 4096)
        raw = b'{"text": "' + b"a" * 10_000 + b'"}'
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(raw + b"\n" + (json.dumps(GOOD_CHAT).encode() + b"\n") * 2)
    report = check_never_crashes(path, tok)
    if problem is None:
        assert not report.problems
    else:
        assert [p.line for p in report.problems] == [1], report.summary()
        assert problem in report.problems[0].message, report.problems[0].message
        assert report.samples == 2  # the good lines after it still read


# --- GGUF: the named malformed files ------------------------------------------------------------
def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key.encode()) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: tuple, ggml_type: int, offset: int) -> bytes:
    return (gguf_string(name.encode()) + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def raw_gguf(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, pad=64) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32)
    return body + data + b"\0" * pad


ARCH = kv("general.architecture", 8, gguf_string(b"llama"))
U32, STR, ARR = 4, 8, 9

MALFORMED = {
    # name: (file bytes, words the error must contain)
    "empty file": (b"", "shorter than a GGUF header"),
    "3 bytes": (b"GGU", "shorter than a GGUF header"),
    "wrong magic (GGML)": (b"GGML" + bytes(60), "not a GGUF file"),
    "a zip file": (b"PK\x03\x04" + bytes(60), "not a GGUF file"),
    "version 1": (raw_gguf(version=1), "version 1"),
    "version 4": (raw_gguf(version=4), "version 4"),
    "version 2^32-1": (raw_gguf(version=2**32 - 1), "version 4294967295"),
    "2^63 tensors": (raw_gguf(n_tensors=2**63), "corrupt"),
    "2^63 metadata keys": (raw_gguf(n_kv=2**63), "corrupt"),
    "more keys than bytes": (raw_gguf([ARCH], n_kv=50_000), "truncated"),
    "key length 2^63": (raw_gguf([struct.pack("<Q", 2**63) + b"x"]), "truncated or corrupt"),
    "string value length 2^40": (raw_gguf([kv("general.name", STR, struct.pack("<Q", 2**40) + b"x")]), "truncated or corrupt"),
    "u8 array of 2^61": (raw_gguf([kv("x", ARR, struct.pack("<IQ", 0, 2**61))]), "truncated or corrupt"),
    "u64 array of 2^61 (byte count overflows 64 bits)": (raw_gguf([kv("x", ARR, struct.pack("<IQ", 10, 2**61))]), "truncated or corrupt"),
    "string array of 2^62 (token list)": (raw_gguf([ARCH, kv(Keys.Tokenizer.LIST, ARR, struct.pack("<IQ", STR, 2**62))]), "truncated or corrupt"),
    "string array longer than the file": (raw_gguf([kv(Keys.Tokenizer.LIST, ARR, struct.pack("<IQ", STR, 10_000_000))]), "truncated or corrupt"),
    "array of arrays of 2^60": (raw_gguf([kv("x", ARR, struct.pack("<IQ", ARR, 2**60))]), "truncated or corrupt"),
    "unknown value type 99": (raw_gguf([kv("x", 99, b"\0" * 8)]), "unknown GGUF value type 99"),
    "array of unknown type": (raw_gguf([kv("x", ARR, struct.pack("<IQ", 77, 3))]), "unknown GGUF value type 77"),
    "tensor with 5 dimensions": (raw_gguf([ARCH], [tensor_info("t", (1, 1, 1, 1, 1), 0, 0)]), "claims 5 dimensions"),
    "tensor with 2^32-1 dimensions": (raw_gguf([ARCH], [gguf_string(b"t") + struct.pack("<I", 2**32 - 1)]), "claims 4294967295 dimensions"),
    "tensor of 2^62 x 2^62 elements": (raw_gguf([ARCH], [tensor_info("t", (2**62, 2**62), 0, 0)]), "ends past the end of the file"),
    "tensor offset beyond the file": (raw_gguf([ARCH], [tensor_info("t", (4,), 0, 2**40)]), "ends past the end of the file"),
    "tensor offset 2^64-1": (raw_gguf([ARCH], [tensor_info("t", (4,), 0, 2**64 - 1)]), "ends past the end of the file"),
    "tensor of unknown ggml type": (raw_gguf([ARCH], [tensor_info("t", (32,), 999, 0)]), "ggml type 999"),
    "alignment 0": (raw_gguf([ARCH, kv(Keys.General.ALIGNMENT, U32, struct.pack("<I", 0))]), "not a power of two"),
    "alignment 3": (raw_gguf([ARCH, kv(Keys.General.ALIGNMENT, U32, struct.pack("<I", 3))]), "not a power of two"),
    "alignment as a string": (raw_gguf([ARCH, kv(Keys.General.ALIGNMENT, STR, gguf_string(b"32"))]), "not a power of two"),
    "architecture not supported": (raw_gguf([kv("general.architecture", STR, gguf_string(b"gemma"))]), "unsupported architecture gemma"),
    "no tensors, no metadata": (raw_gguf(), "unsupported architecture"),
}


def nested_arrays(depth: int) -> bytes:
    """An array holding an array holding ... `depth` levels (each 12 bytes)."""
    return kv("x", ARR, struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", 0, 0))


MALFORMED["arrays nested 100k deep"] = (raw_gguf([nested_arrays(100_000)]), "nested")


def truncations():
    """A valid tiny GGUF cut at 12 points: in the header, the metadata, the tensor table, the data."""
    cfg = gguf_config(tiny_config("llama"))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.gguf"
        write_gguf(p, cfg, gguf_tensors(cfg, tiny_weights(tiny_config("llama"))), "q8_0")
        data = p.read_bytes()
    cuts = [10, 23, 30, 200, 2000, 9000] + [int(len(data) * f) for f in (0.3, 0.5, 0.7, 0.9, 0.99)] + [len(data) - 1]
    return {f"truncated to {c} of {len(data)} bytes": (data[:c], "") for c in cuts}


MALFORMED.update(truncations())
TRUNCATION_WORDS = ("truncated", "shorter than a GGUF header", "cannot hold")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# "arrays nested 100k deep" once raised RecursionError (fixed in gguf_reader._Cursor.value).
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_gguf_is_refused_naming_the_file(tmp_path, name):
    data, words = MALFORMED[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    before = peak_rss()
    COUNTS["gguf"] += 1
    with pytest.raises(ModelLoadError) as e:
        load(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    if name.startswith("truncated"):
        assert any(w in message for w in TRUNCATION_WORDS), message
    else:
        assert words in message, message
    assert peak_rss() - before < 200 * 2**20  # refused before anything large was allocated


@pytest.fixture(scope="module")
def chats(workdir):
    path = workdir / "chats.jsonl"
    path.write_text("".join(json.dumps(GOOD_CHAT) + "\n" for _ in range(4)))
    return path


@pytest.mark.parametrize("name", list(MALFORMED))
def test_tune_on_a_malformed_gguf_is_one_line(tmp_path, chats, name, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "bad.gguf"
    path.write_bytes(MALFORMED[name][0])
    COUNTS["gguf_cli"] += 1
    r = CliRunner().invoke(main, ["tune", "--data", str(chats), "--model", str(path), "--steps", "1",
                                  "--no-export", "--runs-dir", str(tmp_path / "runs"), "--name", "x"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith(f"Error: {path}") and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()


# --- GGUF: metadata values a writer could get wrong ---------------------------------------------
A = "llama"
BAD_METADATA = {
    "block_count a string": {f"{A}.block_count": "abc"},
    "rms epsilon a string": {f"{A}.attention.layer_norm_rms_epsilon": "x"},
    "head_count 0": {f"{A}.attention.head_count": np.uint32(0)},
    "embedding_length 0": {f"{A}.embedding_length": np.uint32(0)},
    "embedding_length 2^40": {f"{A}.embedding_length": np.uint64(2**40)},
    "feed_forward_length 2^40": {f"{A}.feed_forward_length": np.uint64(2**40)},
    "vocab_size 2^40": {f"{A}.vocab_size": np.uint64(2**40)},
    "block_count 3 (tensors for 2)": {f"{A}.block_count": np.uint32(3)},
    "block_count 4e9": {f"{A}.block_count": np.uint32(4_000_000_000)},
    "head_count_kv not dividing": {f"{A}.attention.head_count_kv": np.uint32(3)},
    "token list of numbers": {Keys.Tokenizer.LIST: [1, 2, 3]},
    "empty token list": {Keys.Tokenizer.LIST: []},
    "merges without a space": {Keys.Tokenizer.MERGES: ["abc", "Ġ"]},
    "unknown tokenizer model": {Keys.Tokenizer.MODEL: "wordpiece"},
}
# Found by this file: the strings, zeros and huge sizes once raised ValueError,
# ZeroDivisionError or MemoryError from inside the loader (fixed: families.check_config and the
# loader's metadata guard).


@pytest.fixture(scope="module")
def tiny_parts():
    cfg = gguf_config(tiny_config("llama"))
    return cfg, gguf_tensors(cfg, tiny_weights(tiny_config("llama")))


@pytest.mark.parametrize("name", list(BAD_METADATA))
def test_bad_metadata_values_are_model_load_errors(tmp_path, tiny_parts, name):
    cfg, tensors = tiny_parts
    path = tmp_path / "meta.gguf"
    write_gguf(path, cfg, tensors, "q8_0", extra_metadata=BAD_METADATA[name])
    COUNTS["gguf"] += 1
    with pytest.raises(ModelLoadError) as e:
        load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", list(BAD_METADATA))
def test_tune_on_bad_metadata_is_one_line(tmp_path, tiny_parts, chats, name, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    cfg, tensors = tiny_parts
    path = tmp_path / "meta.gguf"
    write_gguf(path, cfg, tensors, "q8_0", extra_metadata=BAD_METADATA[name])
    COUNTS["gguf_cli"] += 1
    r = CliRunner().invoke(main, ["tune", "--data", str(chats), "--model", str(path), "--steps", "1",
                                  "--no-export", "--runs-dir", str(tmp_path / "runs"), "--name", "x"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith(f"Error: {path}") and r.output.strip().count("\n") == 0, r.output


# --- GGUF: random damage ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_gguf_bytes(tiny_gguf):
    data = tiny_gguf.read_bytes()
    index = G.read_index(tiny_gguf)
    return data, index.data_offset


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)), wide=st.booleans())
def test_damaged_gguf_loads_or_is_refused_never_crashes(tmp_path, valid_gguf_bytes, edits, cut, wide):
    data, data_offset = valid_gguf_bytes
    buf = bytearray(data)
    span = len(buf) if wide else data_offset  # mostly the header, metadata and tensor table
    for where, value in edits:
        pos = int(where * span)
        if wide or pos < 24 or value % 3:
            buf[pos] = value
        else:  # write an absurd 64-bit count where a length or dimension may sit
            buf[pos : pos + 8] = struct.pack("<Q", 2**62 + value)
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(buf))
    COUNTS["gguf"] += 1
    before = peak_rss()
    try:
        load(path)
        COUNTS["damaged_loaded"] += 1  # the damage hit only weight values
    except ModelLoadError as e:
        assert str(path) in str(e)
    assert peak_rss() - before < 500 * 2**20


# --- a hostile chat template inside a GGUF ------------------------------------------------------
HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ lipsum.__globals__['os'].popen('touch PWNED').read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__.__base__}'.format(messages) }}",
    "{{ messages.pop() }}{{ messages.append(1) }}",
    "{{ namespace.__init__.__globals__ }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_template_in_a_gguf_is_refused_through_the_pipeline(tmp_path, tiny_parts, chats, template, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg, tensors = tiny_parts
    path = tmp_path / "hostile.gguf"
    write_gguf(path, cfg, tensors, "q8_0", extra_metadata={Keys.Tokenizer.CHAT_TEMPLATE: template})
    r = CliRunner().invoke(main, ["tune", "--data", str(chats), "--model", str(path), "--steps", "1",
                                  "--no-export", "--runs-dir", str(tmp_path / "runs"), "--name", "x"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert "Traceback" not in r.output
    assert "chat template" in r.output and ("unsafe" in r.output or "immutable" in r.output.lower()), r.output
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()
    r = CliRunner().invoke(main, ["data", "check", str(chats), "--model", str(path)])
    assert r.exit_code == 1 and "chat template" in r.output and "Traceback" not in r.output


def test_hostile_chat_template_is_refused_by_chat_too(tmp_path, tiny_parts, monkeypatch):
    """Plain-text training never renders the template; `edgeft chat` does, and refuses it."""
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg, tensors = tiny_parts
    path = tmp_path / "hostile.gguf"
    write_gguf(path, cfg, tensors, "q8_0", extra_metadata={Keys.Tokenizer.CHAT_TEMPLATE: HOSTILE_TEMPLATES[1]})
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"tea number {i} is good"}) + "\n" for i in range(4)))
    r = CliRunner().invoke(main, ["tune", "--data", str(text), "--model", str(path), "--steps", "1", "--eval-every", "0",
                                  "--no-export", "--runs-dir", str(tmp_path / "runs"), "--name", "t"])
    assert r.exit_code == 0, r.output
    # the evaluation at the end renders chats: it is skipped in one line, the trained run kept
    assert "eval skipped: chat template" in r.output and (tmp_path / "runs" / "t" / "adapters").is_dir()
    r = CliRunner().invoke(main, ["chat", str(tmp_path / "runs" / "t"), "--prompt", "hi", "--max-tokens", "2"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith("Error: chat template") and "unsafe" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module", autouse=True)
def fuzz_counts():
    """After this file's tests, whichever ran: the figures the README quotes (shown with -s)."""
    yield COUNTS
    print(f"\nfuzz: {COUNTS['jsonl']} JSONL files through the loader ({COUNTS['jsonl_cli']} through "
          f"`edgeft data check`), {COUNTS['gguf']} GGUF files through loader.load "
          f"({COUNTS['gguf_cli']} through `edgeft tune`; {COUNTS['damaged_loaded']} randomly damaged ones "
          f"still loaded, the damage being in weight values): 0 crashes, every refusal a ModelLoadError")
