"""The lines of a JSONL data file, read one by one, and the report on them.

The file is read as bytes and each line decoded and parsed on its own, so no input raises
anything but a LineProblem for that line (a line over MAX_LINE_BYTES included). A Report counts
what a file gave (samples, tokens, over-long ones) and lists its problems by line; DataError
carries a Report to the user, its first line a one-line summary.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Iterator

from edgeft.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 16 * 2**20  # a longer line is a problem, not a memory spike
SHOW_PROBLEMS = 50  # problem lines a summary lists before "... and N more"


class LineProblem(Exception):
    """What is wrong with one line, in a sentence (the report adds file and line)."""


class DataError(UserError, ValueError):
    """Unusable training data; str() is the report, its first line a one-line summary."""

    multiline = True

    def __init__(self, report: "Report"):
        super().__init__(report.summary())
        self.report = report


@dataclass
class Sample:
    tokens: list[int]  # the whole rendered conversation
    mask: list[bool]  # True: tokens[i] is a target that carries loss
    line: int  # 1-based line in the source file


@dataclass
class Problem:
    line: int  # 1-based; 0 for the file as a whole
    message: str


@dataclass
class Report:
    path: str
    max_seq_len: int
    skip_bad_lines: bool = False
    format: str | None = None  # chat, ShareGPT, prompt/completion or text (the file's majority)
    format_name: str | None = None  # the format said in full, e.g. "OpenAI chat messages"
    lines: int = 0  # non-empty lines
    samples: int = 0  # samples kept
    skipped: int = 0  # lines left out for a problem (skip_bad_lines)
    truncated: int = 0  # samples cut to max_seq_len tokens (kept)
    dropped: int = 0  # over-long samples left out, including dropped_no_loss
    dropped_no_loss: int = 0  # truncation left no token carrying loss
    system_added: int = 0  # chats that got data.system_prompt
    roles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    tool_calls: int = 0  # calls made by the assistant turns of the kept samples
    tool_results: int = 0  # tool messages (a call's result) of the kept samples
    weighted_out: int = 0  # assistant turns of weight 0 (no loss) of the kept samples
    total_tokens: int = 0  # tokens of the kept samples
    loss_tokens: int = 0  # of them, targets that carry loss
    longest: int = 0  # tokens of the longest kept sample
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list, repr=False)  # tokens per sample, before truncation
    texts: list[tuple[int, str]] = field(default_factory=list, repr=False)  # (line, text) per sample

    @property
    def bad_lines(self) -> int:
        return sum(1 for p in self.problems if p.line > 0)

    def summary(self) -> str:
        """The report as text: a one-line summary, one line per problem, then the counts. A
        problem of the whole file is all the summary says: nothing else counts until it is fixed."""
        if file_problems := [f"{self.path}: {p.message}" for p in self.problems if p.line == 0]:
            return "\n".join(file_problems)
        out = [self._headline()]
        for p in self.problems[:SHOW_PROBLEMS]:
            out.append(f"{self.path}:{p.line}: {p.message}")
        if len(self.problems) > SHOW_PROBLEMS:
            out.append(f"... and {len(self.problems) - SHOW_PROBLEMS} more problems")
        if self.samples:
            out.append(f"  format {self.format}" + (f" ({self.format_name})" if self.format_name else ""))
            if any(self.roles.values()):  # (text samples have no messages)
                out.append(self._messages_text())
            totals = (f"{self.total_tokens:,} in {plural(self.samples, 'sample')} "
                      f"({self.loss_tokens:,} carry loss); " if self.bad_lines and not self.skip_bad_lines else "")
            out.append(
                f"  tokens: {totals}per sample mean {self.total_tokens / self.samples:.0f}, "
                f"longest {self.longest} (max_seq_len {self.max_seq_len})"
            )
        if self.truncated or self.dropped:
            out.append(f"  over max_seq_len: {self._overlong_text()}")
        return "\n".join(out)

    def _messages_text(self) -> str:
        roles = ", ".join(f"{r} {n}" for r, n in self.roles.items())
        added = f" ({self.system_added} from data.system_prompt)" if self.system_added else ""
        return (f"  messages: {roles}{added}; tool calls {self.tool_calls}, tool results "
                f"{self.tool_results}; assistant turns weighted out (weight 0) {self.weighted_out}")

    def _overlong_text(self) -> str:
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_seq_len} tokens")
        if self.dropped - self.dropped_no_loss:
            parts.append(f"{self.dropped - self.dropped_no_loss} dropped")
        if self.dropped_no_loss:
            parts.append(f"{self.dropped_no_loss} dropped (no loss token left after truncation)")
        return ", ".join(parts)

    def _headline(self) -> str:
        name, bad = self.path, self.bad_lines
        if bad and not self.skip_bad_lines:
            return f"{name}: {bad} of {self.lines} lines have problems; fix them or pass --skip-bad-lines"
        head = f"{name}: skipped {bad} of {self.lines} lines with problems; " if bad else f"{name}: "
        if not self.lines:
            return head + "no samples: the file has no non-empty lines"
        if not self.samples:
            why = f" ({self._overlong_text()})" if self.dropped else ""
            return head + f"no usable samples{why}"
        extra = f"; {self._overlong_text()}" if self.truncated or self.dropped else ""
        return (
            f"{head}{plural(self.samples, self.format + ' sample')} from {plural(self.lines, 'line')}, "
            f"{self.total_tokens:,} tokens ({self.loss_tokens:,} carry loss){extra}"
        )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def kind(v) -> str:
    """A value described by its JSON type, never by repr (it may be huge or deeply nested)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def show(v) -> str:
    """A value for an error message: a short string quoted, a short number as it is, anything
    else by its JSON type."""
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**15):
        return repr(v)
    return kind(v)


def read_lines(path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) per line; None for a line over MAX_LINE_BYTES."""
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                    pass
                yield n, None
            else:
                yield n, raw


def parse(raw: bytes | None, lineno: int) -> dict | None:
    """The line's JSON object, None for a blank line; LineProblem for anything else."""
    if raw is None:
        raise LineProblem(f"line is longer than {MAX_LINE_BYTES // 2**20} MiB; shorten or split it")
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineProblem(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save the file as UTF-8"
        ) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise LineProblem("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise LineProblem(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise LineProblem(f"not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise LineProblem(f"not a JSON object (got {kind(obj)}); each line must be one object")
    return obj
