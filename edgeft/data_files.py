"""A data file read whole: every line checked and encoded, over-long samples truncated or
dropped, then the samples and a Report, or DataError listing the file's bad lines.

Every line is checked before any training. load_samples refuses a file with bad lines (the
error's text lists each one as "file:line: what is wrong") unless data.skip_bad_lines;
check_file reports the same without raising.
"""

from __future__ import annotations

from collections import Counter

from edgeft import chat_formats as F
from edgeft.chat_encode import encode_chat, encode_text, specials_pattern, token_strings
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
from edgeft.tokenizer import TemplateError


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
    specials = specials_pattern(tokenizer)
    stops = token_strings(tokenizer, tokenizer.stop_ids)
    samples = []
    for lineno, obj, fmt in parsed:
        try:
            if fmt != report.format:
                raise LineProblem(
                    f"a {fmt} line in a {report.format} file ({counts[report.format]} {report.format} lines); "
                    "use one format per file"
                )
            sample, messages, added = _encode_line(obj, fmt, tokenizer, data_cfg, specials, stops)
        except LineProblem as e:
            report.problems.append(Problem(lineno, str(e)))
            continue
        tokens, mask = sample
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
        report.system_added += added
        for m in messages:
            report.roles[m["role"]] += 1
        report.total_tokens += len(tokens)
        report.loss_tokens += sum(mask[1:])
        report.longest = max(report.longest, len(tokens))
    report.problems.sort(key=lambda p: p.line)
    report.samples = len(samples)
    if report.skip_bad_lines:
        report.skipped = report.bad_lines
    return samples, report


def _encode_line(obj, fmt, tokenizer, data_cfg, specials, stops):
    """((tokens, mask), messages, system prompt added?) for one valid-format object."""
    if fmt == F.TEXT:
        return _guard(encode_text, tokenizer, F.text_of(obj)), [], 0
    if fmt == F.CHAT:
        messages = F.chat_messages(obj, specials)
    else:
        messages = F.prompt_completion_messages(obj, specials)
    added = 0
    if data_cfg.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": data_cfg.system_prompt, "weight": 0}] + messages
        added = 1
    return _guard(encode_chat, tokenizer, messages, stops), messages, added


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
