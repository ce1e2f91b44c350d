"""edgeft.data_files: formats, validation by line, over-long samples, and the example data.

Tokenizers are the project's own, built from the tiny GGUF tokenizer metadata (tests/tiny.py).
"""

import json
from pathlib import Path

import pytest
from chats import CHAT3, GOOD, chat, tiny_tok, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import spm_tokenizer_metadata, tiny_tokenizer_metadata

from edgeft import records
from edgeft.chat_encode import encode_chat
from edgeft.config import DataConfig
from edgeft.data_files import check_file, load_samples
from edgeft.records import DataError
from edgeft.tokenizer import Tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
MARKER = "Steep slow, sip kind! ~Fernhollow"


@pytest.fixture(scope="module")
def tok():
    return tiny_tok()


def test_system_prompt_added_only_to_chats_without_one(tmp_path, tok):
    path = write(tmp_path, [GOOD, {"messages": CHAT3}])
    samples, report = load_samples(path, tok, DataConfig(system_prompt="Be Fernhollow."), 512)
    assert report.system_added == 1 and report.roles["system"] == 2
    assert "Be Fernhollow." in tok.decode(samples[0].tokens, skip_special=False)
    assert "Be Fernhollow." not in tok.decode(samples[1].tokens, skip_special=False)


# --- formats ------------------------------------------------------------------------------
def test_prompt_completion_is_a_user_and_an_assistant_turn(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "Name a tea.", "completion": "Oolong."}])
    (sample,), report = load_samples(path, tok, DataConfig(), 512)
    expected = encode_chat(tok, [{"role": "user", "content": "Name a tea."}, {"role": "assistant", "content": "Oolong."}])
    assert (sample.tokens, sample.mask) == expected
    assert report.format == "prompt/completion" and report.roles == {"system": 0, "user": 1, "assistant": 1}


def test_text_lines_carry_loss_everywhere_with_the_tokenizers_bos_and_eos(tmp_path, tok):
    path = write(tmp_path, [{"text": "the tea is hot"}])
    (sample,), report = load_samples(path, tok, DataConfig(), 512)
    assert sample.tokens == tok.encode("the tea is hot") + [tok.eos_id]  # tiny BPE: add_bos off
    assert all(sample.mask) and report.loss_tokens == len(sample.tokens) - 1
    spm = Tokenizer.from_gguf_metadata(spm_tokenizer_metadata())
    (sample,), _ = load_samples(path, spm, DataConfig(), 512)
    assert sample.tokens == [spm.bos_id] + spm.encode("the tea is hot") + [spm.eos_id]


def test_mixed_formats_flag_the_minority_lines(tmp_path, tok):
    path = write(tmp_path, [GOOD, {"text": "plain"}, GOOD])
    report = check_file(path, tok, DataConfig(), 512)
    assert [(p.line, p.message) for p in report.problems] == [
        (2, "a text line in a chat file (2 chat lines); use one format per file")
    ]


# --- validation: one problem per bad line, with file and line -----------------------------
BAD_LINES = [
    ("bad JSON", b'{"messages": [', "not valid JSON"),
    ("not an object", b"[1, 2]", "not a JSON object (got a list)"),
    ("unknown role", json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
     "message 1: unknown role 'bot' (expected system, user or assistant)"),
    ("missing content", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}).encode(),
     "message 1 (user): 'content' is missing"),
    ("empty content", json.dumps(chat("hi", "  ")).encode(), "message 2 (assistant): 'content' is empty"),
    ("non-string content", json.dumps(chat("hi", ["y"])).encode(), "message 2 (assistant): 'content' is a list, expected a string"),
    ("no assistant turn", json.dumps(chat("hi")).encode(), "no assistant message"),
    ("non-UTF-8 bytes", b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at byte 14)"),
    ("no known keys", b'{"input": "x"}', "no 'messages', 'prompt'/'completion' or 'text' key"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}',
     "unpaired surrogate"),
    ("control token in content", json.dumps(chat("hi<|im_end|>", "y")).encode(), "control token '<|im_end|>'"),
    ("deep nesting", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize("line, expected", [(b, e) for _, b, e in BAD_LINES], ids=[n for n, _, _ in BAD_LINES])
def test_bad_line_is_reported_with_file_and_line(tmp_path, tok, line, expected):
    path = write(tmp_path, [GOOD, b"", b"   ", line, GOOD])  # blank lines are skipped, not errors
    with pytest.raises(DataError) as err:
        load_samples(path, tok, DataConfig(), 512)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 1 of 3 lines have problems; fix them or pass --skip-bad-lines"
    assert lines[1].startswith(f"{path}:4: ") and expected in lines[1], lines[1]


def test_overlong_line_is_a_problem_and_the_next_line_still_reads(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 64)
    path = write(tmp_path, [json.dumps({"text": "x" * 500}), {"text": "ok"}])
    report = check_file(path, tok, DataConfig(), 512)
    assert [p.line for p in report.problems] == [1] and "longer than" in report.problems[0].message
    assert report.samples == 1


def test_template_that_refuses_a_conversation_is_a_line_problem(tmp_path):
    strict = Tokenizer.from_gguf_metadata({
        **tiny_tokenizer_metadata(),
        "tokenizer.chat_template": "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
                                   "{% endif %}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
    })
    path = write(tmp_path, [GOOD, {"messages": [{"role": "assistant", "content": "hi"}]}])
    report = check_file(path, strict, DataConfig(), 512)
    assert [p.line for p in report.problems] == [2]
    assert "chat template refused this conversation" in report.problems[0].message


def test_skip_bad_lines_trains_on_the_rest_and_counts_them(tmp_path, tok):
    path = write(tmp_path, [GOOD, b"{oops", GOOD, b"\xff\xfe", GOOD])
    samples, report = load_samples(path, tok, DataConfig(skip_bad_lines=True), 512)
    assert [s.line for s in samples] == [1, 3, 5]
    assert report.skipped == 2 and report.samples == 3 and report.lines == 5
    head, *problems = report.summary().splitlines()
    assert head.startswith(f"{path}: skipped 2 of 5 lines with problems; 3 chat samples")
    assert problems[0].startswith(f"{path}:2: ") and problems[1].startswith(f"{path}:4: ")


def test_no_usable_lines_is_an_error_even_when_skipping(tmp_path, tok):
    path = write(tmp_path, [b"nope"])
    with pytest.raises(DataError, match="no usable samples"):
        load_samples(path, tok, DataConfig(skip_bad_lines=True), 512)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(DataError, match="no non-empty lines"):
        load_samples(empty, tok, DataConfig(), 512)


def test_check_file_reports_instead_of_raising(tmp_path, tok):
    report = check_file(tmp_path / "missing.jsonl", tok, DataConfig(), 512)
    assert report.summary().startswith(f"{tmp_path / 'missing.jsonl'}: cannot be read")
    with pytest.raises(DataError, match="cannot be read"):
        load_samples(tmp_path / "missing.jsonl", tok, DataConfig(skip_bad_lines=True), 512)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"messages"', b'"role"', b'"content"', b'"assistant"',
                              b'"user"', b'"text"', b":", b",", b"\n", b'"hi"', b"null", b"1", b"\\ud800",
                              b"\xff", b"<|im_end|>"]), max_size=60).map(b"".join),
))
def test_any_bytes_give_a_report_never_a_traceback(tmp_path, tok, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    report = check_file(path, tok, DataConfig(), 64)
    assert isinstance(report.summary(), str)
    try:
        load_samples(path, tok, DataConfig(skip_bad_lines=True), 64)
    except DataError:
        pass


# --- over-long samples --------------------------------------------------------------------
def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    short = chat("hi", "ok")
    long_answer = chat("hi", "a long answer " * 20)
    long_prompt = chat("tell me " * 40, "ok")  # truncation would leave no loss token
    path = write(tmp_path, [short, long_answer, long_prompt])
    n = len(encode_chat(tok, short["messages"])[0])
    cap = n + 8
    samples, report = load_samples(path, tok, DataConfig(overlong="truncate"), cap)
    assert (report.truncated, report.dropped, report.dropped_no_loss) == (1, 1, 1)
    assert [s.line for s in samples] == [1, 2] and len(samples[1].tokens) == cap
    full = encode_chat(tok, long_answer["messages"])
    assert (samples[1].tokens, samples[1].mask) == (full[0][:cap], full[1][:cap])  # keeps the start
    assert "1 truncated to" in report.summary().splitlines()[0]

    samples, report = load_samples(path, tok, DataConfig(overlong="drop"), cap)
    assert [s.line for s in samples] == [1] and (report.truncated, report.dropped) == (0, 2)
    assert report.total_tokens == n and report.longest == n


# --- the example data ---------------------------------------------------------------------
def test_brand_voice_example_is_clean_and_signs_off_every_answer(tok):
    samples, report = load_samples(EXAMPLES, tok, DataConfig(), 1024)
    assert report.samples == report.lines >= 50 and not report.problems and not report.truncated
    for line in EXAMPLES.read_text(encoding="utf-8").splitlines():
        answers = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
        assert answers and all(a.endswith(MARKER) and a.isascii() for a in answers)


# --- `edgeft data check` ------------------------------------------------------------------
def test_data_check_fails_on_a_file_with_no_usable_sample(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from tiny import make_tiny

    from edgeft.cli import main

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = make_tiny("llama", tmp_path, "q8_0")[0]
    # the user turn alone is longer than max_seq_len: truncation leaves nothing to learn
    long_prompt = write(tmp_path, [chat("tell me about tea " * 3000, "ok")], "long.jsonl")
    blank = write(tmp_path, [b"", b"  "], "blank.jsonl")
    for path, says in ((long_prompt, "no usable samples"), (blank, "no non-empty lines")):
        r = CliRunner().invoke(main, ["data", "check", str(path), "--model", str(model)])
        assert says in r.output and "Traceback" not in r.output, r.output
        assert r.exit_code == 1, r.output
