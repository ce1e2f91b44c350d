"""edgeft.dataset: validation by line, loss masks through the real chat template, over-long
samples, split, and batches that resume exactly.

Tokenizers are the project's own, built from the tiny GGUF tokenizer metadata (tests/tiny.py);
one test uses the real SmolLM2 tokenizer.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import spm_tokenizer_metadata, tiny_tokenizer_metadata

from edgeft import dataset as D
from edgeft.config import DataConfig
from edgeft.tokenizer import Tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
MARKER = "Steep slow, sip kind! ~Fernhollow"
CHAT3 = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "what is the tea of the day"},
    {"role": "assistant", "content": " It is oolong, brewed at 90 C. "},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You're welcome.\nBye!"},
]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata())


def loss_runs(tok, tokens, mask):
    """The text of each maximal run of loss-carrying tokens."""
    runs, cur = [], []
    for t, m in zip(tokens, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special=False) for r in runs]


def write(tmp_path, lines, name="data.jsonl") -> Path:
    path = tmp_path / name
    raw = [ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode() for ln in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def chat(*contents):
    """Alternating user/assistant messages."""
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]}


# --- loss masks ---------------------------------------------------------------------------
def test_mask_is_exactly_every_assistant_turn_and_its_end_token(tok):
    tokens, mask = D.encode_chat(tok, CHAT3)
    contents = [m["content"] for m in CHAT3 if m["role"] == "assistant"]
    assert loss_runs(tok, tokens, mask) == [c + "<|im_end|>" for c in contents]
    # the tokens are the template's rendering tokenized whole, as at inference
    assert tokens == tok.encode(tok.render(CHAT3))
    # and nothing else carries loss: the unmasked text is the rest of the rendering
    rest = tok.decode([t for t, m in zip(tokens, mask) if not m], skip_special=False)
    full = tok.render(CHAT3)
    for c in contents:
        full = full.replace(c + "<|im_end|>", "", 1)
    assert rest == full


def test_mask_when_template_is_not_prefix_consistent(tok):
    # SmolLM2-style: a default system message only when the chat does not start with one, so
    # rendering the empty prefix before a leading assistant turn is not a prefix of the whole.
    odd = Tokenizer.from_gguf_metadata({
        **tiny_tokenizer_metadata(),
        "tokenizer.chat_template": (
            "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
            "{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
    })
    messages = [{"role": "assistant", "content": "Welcome in!"}] + CHAT3[1:]
    tokens, mask = D.encode_chat(odd, messages)
    assert loss_runs(odd, tokens, mask) == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert tokens == odd.encode(odd.render(messages))


def test_assistant_weight_zero_is_not_trained(tok):
    messages = [dict(m) for m in CHAT3]
    messages[2]["weight"] = 0
    tokens, mask = D.encode_chat(tok, messages)
    assert loss_runs(tok, tokens, mask) == [messages[4]["content"] + "<|im_end|>", messages[6]["content"] + "<|im_end|>"]


def test_sentencepiece_tokenizer_gets_bos_and_exact_mask():
    spm = Tokenizer.from_gguf_metadata(spm_tokenizer_metadata())
    # (SentencePiece decoding drops a run's leading space, so no content starts with one here)
    messages = [{**m, "content": m["content"].lstrip()} for m in CHAT3]
    tokens, mask = D.encode_chat(spm, messages)
    assert tokens[0] == spm.bos_id and not mask[0]
    assert tokens == [spm.bos_id] + spm.encode(spm.render(messages))
    # this vocabulary has no <|im_end|> token: the whole turn the template writes is trained
    assert loss_runs(spm, tokens, mask) == [
        m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"
    ]


def test_system_prompt_added_only_to_chats_without_one(tmp_path, tok):
    path = write(tmp_path, [GOOD, {"messages": CHAT3}])
    samples, report = D.load_samples(path, tok, DataConfig(system_prompt="Be Fernhollow."), 512)
    assert report.system_added == 1 and report.roles["system"] == 2
    assert "Be Fernhollow." in tok.decode(samples[0].tokens, skip_special=False)
    assert "Be Fernhollow." not in tok.decode(samples[1].tokens, skip_special=False)


# --- formats ------------------------------------------------------------------------------
def test_prompt_completion_is_a_user_and_an_assistant_turn(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "Name a tea.", "completion": "Oolong."}])
    (sample,), report = D.load_samples(path, tok, DataConfig(), 512)
    expected = D.encode_chat(tok, [{"role": "user", "content": "Name a tea."}, {"role": "assistant", "content": "Oolong."}])
    assert (sample.tokens, sample.mask) == expected
    assert report.format == "prompt/completion" and report.roles == {"system": 0, "user": 1, "assistant": 1}


def test_text_lines_carry_loss_everywhere_with_the_tokenizers_bos_and_eos(tmp_path, tok):
    path = write(tmp_path, [{"text": "the tea is hot"}])
    (sample,), report = D.load_samples(path, tok, DataConfig(), 512)
    assert sample.tokens == tok.encode("the tea is hot") + [tok.eos_id]  # tiny BPE: add_bos off
    assert all(sample.mask) and report.loss_tokens == len(sample.tokens) - 1
    spm = Tokenizer.from_gguf_metadata(spm_tokenizer_metadata())
    (sample,), _ = D.load_samples(path, spm, DataConfig(), 512)
    assert sample.tokens == [spm.bos_id] + spm.encode("the tea is hot") + [spm.eos_id]


def test_mixed_formats_flag_the_minority_lines(tmp_path, tok):
    path = write(tmp_path, [GOOD, {"text": "plain"}, GOOD])
    report = D.check_file(path, tok, DataConfig(), 512)
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
    with pytest.raises(D.DataError) as err:
        D.load_samples(path, tok, DataConfig(), 512)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 1 of 3 lines have problems; fix them or pass --skip-bad-lines"
    assert lines[1].startswith(f"{path}:4: ") and expected in lines[1], lines[1]


def test_overlong_line_is_a_problem_and_the_next_line_still_reads(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(D, "MAX_LINE_BYTES", 64)
    path = write(tmp_path, [json.dumps({"text": "x" * 500}), {"text": "ok"}])
    report = D.check_file(path, tok, DataConfig(), 512)
    assert [p.line for p in report.problems] == [1] and "longer than" in report.problems[0].message
    assert report.samples == 1


def test_template_that_refuses_a_conversation_is_a_line_problem(tmp_path):
    strict = Tokenizer.from_gguf_metadata({
        **tiny_tokenizer_metadata(),
        "tokenizer.chat_template": "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
                                   "{% endif %}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
    })
    path = write(tmp_path, [GOOD, {"messages": [{"role": "assistant", "content": "hi"}]}])
    report = D.check_file(path, strict, DataConfig(), 512)
    assert [p.line for p in report.problems] == [2]
    assert "chat template refused this conversation" in report.problems[0].message


def test_skip_bad_lines_trains_on_the_rest_and_counts_them(tmp_path, tok):
    path = write(tmp_path, [GOOD, b"{oops", GOOD, b"\xff\xfe", GOOD])
    samples, report = D.load_samples(path, tok, DataConfig(skip_bad_lines=True), 512)
    assert [s.line for s in samples] == [1, 3, 5]
    assert report.skipped == 2 and report.samples == 3 and report.lines == 5
    head, *problems = report.summary().splitlines()
    assert head.startswith(f"{path}: skipped 2 of 5 lines with problems; 3 chat samples")
    assert problems[0].startswith(f"{path}:2: ") and problems[1].startswith(f"{path}:4: ")


def test_no_usable_lines_is_an_error_even_when_skipping(tmp_path, tok):
    path = write(tmp_path, [b"nope"])
    with pytest.raises(D.DataError, match="no usable samples"):
        D.load_samples(path, tok, DataConfig(skip_bad_lines=True), 512)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(D.DataError, match="no non-empty lines"):
        D.load_samples(empty, tok, DataConfig(), 512)


def test_check_file_reports_instead_of_raising(tmp_path, tok):
    report = D.check_file(tmp_path / "missing.jsonl", tok, DataConfig(), 512)
    assert report.summary().startswith(f"{tmp_path / 'missing.jsonl'}: cannot be read")
    with pytest.raises(D.DataError, match="cannot be read"):
        D.load_samples(tmp_path / "missing.jsonl", tok, DataConfig(skip_bad_lines=True), 512)


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
    report = D.check_file(path, tok, DataConfig(), 64)
    assert isinstance(report.summary(), str)
    try:
        D.load_samples(path, tok, DataConfig(skip_bad_lines=True), 64)
    except D.DataError:
        pass


# --- over-long samples --------------------------------------------------------------------
def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    short = chat("hi", "ok")
    long_answer = chat("hi", "a long answer " * 20)
    long_prompt = chat("tell me " * 40, "ok")  # truncation would leave no loss token
    path = write(tmp_path, [short, long_answer, long_prompt])
    n = len(D.encode_chat(tok, short["messages"])[0])
    cap = n + 8
    samples, report = D.load_samples(path, tok, DataConfig(overlong="truncate"), cap)
    assert (report.truncated, report.dropped, report.dropped_no_loss) == (1, 1, 1)
    assert [s.line for s in samples] == [1, 2] and len(samples[1].tokens) == cap
    full = D.encode_chat(tok, long_answer["messages"])
    assert (samples[1].tokens, samples[1].mask) == (full[0][:cap], full[1][:cap])  # keeps the start
    assert "1 truncated to" in report.summary().splitlines()[0]

    samples, report = D.load_samples(path, tok, DataConfig(overlong="drop"), cap)
    assert [s.line for s in samples] == [1] and (report.truncated, report.dropped) == (0, 2)
    assert report.total_tokens == n and report.longest == n


# --- split --------------------------------------------------------------------------------
def fake_samples(lengths):
    return [D.Sample(list(range(1, n + 1)), [False] + [True] * (n - 1), i + 1) for i, n in enumerate(lengths)]


def test_split_is_seeded_disjoint_and_never_empties_either_side():
    samples = fake_samples([5] * 50)
    train, valid = D.split(samples, 0.1, seed=3)
    assert len(valid) == 5 and len(train) == 45
    assert sorted(s.line for s in train + valid) == list(range(1, 51))
    assert [s.line for s in valid] == sorted(s.line for s in valid)  # file order kept
    assert D.split(samples, 0.1, seed=3) == (train, valid)
    assert D.split(samples, 0.1, seed=4)[1] != valid
    assert len(D.split(samples[:3], 0.01, 0)[1]) == 1  # at least one validation sample
    assert [len(x) for x in D.split(samples[:2], 0.9, 0)] == [1, 1]  # train never empty
    assert D.split(samples[:1], 0.5, 0) == (samples[:1], [])
    assert D.split(samples, 0.0, 0) == (samples, [])


# --- batches ------------------------------------------------------------------------------
def take(it, k):
    return [tuple(np.array(a) for a in next(it)) for _ in range(k)]


def test_batches_pad_to_a_multiple_of_8_and_shift_targets():
    samples = fake_samples([4, 11])
    inputs, targets, mask = D.collate(samples)
    assert inputs.dtype == mx.int32 and targets.dtype == mx.int32 and mask.dtype == mx.float32
    assert inputs.shape == (2, 16)
    inputs, targets, mask = np.array(inputs), np.array(targets), np.array(mask)
    assert inputs[0, :3].tolist() == [1, 2, 3] and targets[0, :3].tolist() == [2, 3, 4]
    assert (inputs[0, 3:] == 0).all() and (targets[0, 3:] == 0).all() and (mask[0, 3:] == 0).all()
    assert mask[1].tolist() == [1.0] * 10 + [0.0] * 6


def test_iterate_batches_is_deterministic_and_resumes_exactly():
    samples = fake_samples([3, 5, 7, 9, 11, 13, 15])
    a = take(D.iterate_batches(samples, 3, seed=1), 12)
    b = take(D.iterate_batches(samples, 3, seed=1), 12)
    assert all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    resumed = take(D.iterate_batches(samples, 3, seed=1, start_step=5), 7)
    assert all(np.array_equal(x, y) for p, q in zip(a[5:], resumed) for x, y in zip(p, q))
    other = take(D.iterate_batches(samples, 3, seed=2), 12)
    assert any(not np.array_equal(p[0], q[0]) for p, q in zip(a, other))


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    samples = fake_samples(range(2, 14))  # 12 samples of distinct lengths
    seen = [int((m > 0).sum()) + 1 for batch in take(D.iterate_batches(samples, 4, seed=0), 9) for m in batch[2]]
    epochs = [seen[i : i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == list(range(2, 14)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_eval_batches_cover_every_sample_once():
    samples = fake_samples([3, 9, 5, 7, 4])
    batches = list(D.eval_batches(samples, 2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert sum(float(b[2].sum()) for b in batches) == sum(n - 1 for n in [3, 9, 5, 7, 4])


# --- the example data ---------------------------------------------------------------------
def test_brand_voice_example_is_clean_and_signs_off_every_answer(tok):
    samples, report = D.load_samples(EXAMPLES, tok, DataConfig(), 1024)
    assert report.samples == report.lines >= 50 and not report.problems and not report.truncated
    for line in EXAMPLES.read_text(encoding="utf-8").splitlines():
        answers = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
        assert answers and all(a.endswith(MARKER) and a.isascii() for a in answers)


# --- the real tokenizer -------------------------------------------------------------------
@pytest.mark.real
def test_real_smollm2_mask_on_a_three_turn_chat(smollm2_path):
    _, md = mx.load(str(smollm2_path), return_metadata=True)
    real = Tokenizer.from_gguf_metadata(md)
    tokens, mask = D.encode_chat(real, CHAT3)
    assert loss_runs(real, tokens, mask) == [m["content"] + "<|im_end|>" for m in CHAT3 if m["role"] == "assistant"]
    assert tokens == real.encode(real.render(CHAT3))
    # without a system message SmolLM2's template adds its own; the mask is still exact
    tokens, mask = D.encode_chat(real, CHAT3[1:])
    assert loss_runs(real, tokens, mask) == [m["content"] + "<|im_end|>" for m in CHAT3 if m["role"] == "assistant"]
