"""Data files read whole, and data folders: every line checked and encoded, over-long samples
truncated or dropped, then the samples and a Report, or DataError listing the file's bad lines.

Every line is checked before any training. load_samples refuses a file with bad lines (the
error's text lists each one as "file:line: what is wrong") unless data.skip_bad_lines;
check_file reports the same without raising. A file whose lines use tools, for a model whose
chat template cannot render them, is refused in one line for the file.

A data folder is mlx-lm's layout: train.jsonl, and optionally valid.jsonl and test.jsonl.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgeft import chat_formats as F
from edgeft.chat_encode import (
    encode_chat,
    encode_text,
    specials_pattern,
    token_strings,
    tools_problem,
)
from edgeft.chat_template import TemplateError
from edgeft.data_stats import sample_text
from edgeft.records import (
    DataError,
    LineProblem,
    Problem,
    Report,
    Sample,
    parse,
    read_lines,
)

FOLDER_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")


def load_samples(path, tokenizer, data_cfg, max_seq_len: int) -> tuple[list[Sample], Report]:
    """Samples of a JSONL file, or DataError listing its bad lines.

    With data_cfg.skip_bad_lines the good lines are used and the report counts the rest.
    """
    samples, report = _build(path, tokenizer, data_cfg, max_seq_len)
    file_problem = any(p.line == 0 for p in report.problems)
    if file_problem or (report.problems and not data_cfg.skip_bad_lines) or not samples:
        raise DataError(report)
    return samples, report


def check_file(path, tokenizer, data_cfg, max_seq_len: int) -> Report:
    """Everything load_samples would find, as a Report; never raises on bad data."""
    return _build(path, tokenizer, data_cfg, max_seq_len)[1]


def folder_files(folder) -> list[Path]:
    """The data files of a folder in mlx-lm's layout, train.jsonl first; DataError if it has
    no train.jsonl."""
    folder = Path(folder)
    files = [folder / name for name in FOLDER_FILES if (folder / name).is_file()]
    if not files or files[0].name != FOLDER_FILES[0]:
        report = Report(str(folder), 0)
        report.problems.append(Problem(0, "no train.jsonl in this folder; a data folder holds train.jsonl, "
                                          "and optionally valid.jsonl and test.jsonl (mlx-lm's layout)"))
        raise DataError(report)
    return files


def training_files(train: str | None, valid: str | None) -> tuple[str | None, str | None]:
    """(training file, validation file or None) of data.train and data.valid. data.train may
    be a data folder: its train.jsonl, and its valid.jsonl unless data.valid names a file
    (test.jsonl is not trained on)."""
    if train is None or not Path(train).is_dir():
        return train, valid
    files = {p.name: str(p) for p in folder_files(train)}
    return files[FOLDER_FILES[0]], valid or files.get(FOLDER_FILES[1])


def _build(path, tokenizer, data_cfg, max_seq_len: int) -> tuple[list[Sample], Report]:
    report = Report(str(path), max_seq_len, skip_bad_lines=bool(data_cfg.skip_bad_lines))
    try:
        parsed = []  # (line, object, format)
        for lineno, raw in read_lines(path):
            try:
                obj = parse(raw, lineno)
                if obj is None:
                    continue
                parsed.append((lineno, obj, F.format_of(obj)))
            except LineProblem as e:
                report.problems.append(Problem(lineno, str(e)))
            report.lines += 1
    except OSError as e:
        report.problems = [Problem(0, f"cannot be read ({e.strerror or e})")]
        return [], report

    counts = Counter(fmt for _, _, fmt in parsed)
    report.format = max(counts, key=counts.get) if counts else None  # ties: first seen
    report.format_name = F.FORMAT_NAMES.get(report.format)
    specials = specials_pattern(tokenizer)
    read = []  # (line, object, text or conversation)
    for lineno, obj, fmt in parsed:
        try:
            if fmt != report.format:
                raise LineProblem(
                    f"a {fmt} line in a {report.format} file ({counts[report.format]} {report.format} lines); "
                    "use one format per file"
                )
            read.append((lineno, obj, F.text_of(obj) if fmt == F.TEXT else F.conversation(obj, fmt, specials)))
        except LineProblem as e:
            report.problems.append(Problem(lineno, str(e)))
    with_tools = sum(isinstance(c, F.Conversation) and c.uses_tools for _, _, c in read)
    if with_tools and (why := tools_problem(tokenizer)):
        report.problems = [Problem(0, (
            f"{with_tools} of {report.lines} lines use tools, but {why}; train them on a model whose "
            "template renders tools (e.g. Qwen 2.5, Qwen 3, Llama 3.1 and later) or leave those lines out"))]
        return [], report

    stops = token_strings(tokenizer, tokenizer.stop_ids)
    samples = []
    for lineno, obj, item in read:
        try:
            (tokens, mask), messages, added = _encode(item, tokenizer, data_cfg, stops)
        except LineProblem as e:
            report.problems.append(Problem(lineno, str(e)))
            continue
        report.lengths.append(len(tokens))
        report.texts.append((lineno, sample_text(obj, messages)))
        if len(tokens) > max_seq_len:
            if data_cfg.overlong == "drop":
                report.dropped += 1
                continue
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
            if not any(mask[1:]):
                report.dropped += 1
                report.dropped_no_loss += 1
                continue
            report.truncated += 1
        elif not any(mask[1:]):
            report.problems.append(Problem(lineno, "no token carries loss"))
            continue
        samples.append(Sample(tokens, mask, lineno))
        _count(report, messages, added, tokens, mask)
    report.problems.sort(key=lambda p: p.line)
    report.samples = len(samples)
    if report.skip_bad_lines:
        report.skipped = report.bad_lines
    return samples, report


def _encode(item, tokenizer, data_cfg, stops):
    """((tokens, mask), messages, system prompt added?) for a line's text or conversation."""
    if isinstance(item, str):
        return _guard(encode_text, tokenizer, item), [], 0
    messages, added = item.messages, 0
    if data_cfg.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": data_cfg.system_prompt, "weight": 0}] + messages
        added = 1
    return _guard(encode_chat, tokenizer, messages, stops, item.tools), messages, added


def _count(report: Report, messages, added: int, tokens, mask) -> None:
    report.system_added += added
    for m in messages:
        if m["role"] in report.roles:
            report.roles[m["role"]] += 1
        report.tool_results += m["role"] == F.TOOL
        report.tool_calls += len(m.get("tool_calls") or ())
        report.weighted_out += m["role"] == "assistant" and not m["weight"]
    report.total_tokens += len(tokens)
    report.loss_tokens += sum(mask[1:])
    report.longest = max(report.longest, len(tokens))


def _guard(fn, *args):
    """Template and tokenizer failures on one line become that line's problem."""
    try:
        return fn(*args)
    except LineProblem:
        raise
    except Exception as e:  # the template is the model's code; the tokenizer is Rust
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if isinstance(e, TemplateError):
            raise LineProblem(f"the chat template refused this conversation: {msg}") from None
        raise LineProblem(f"cannot be tokenized: {type(e).__name__}: {msg}") from None
