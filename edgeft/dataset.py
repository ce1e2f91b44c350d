"""Training data: JSONL lines in, token ids with loss masks out, then batches.

Formats, detected per line (one per file; lines in a minority format are problems):
  chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                     (OpenAI's optional assistant "weight": 0 excludes that turn from the loss)
  prompt/completion  {"prompt": "...", "completion": "..."}   -> one user turn, one assistant turn
  text               {"text": "..."}                           -> every token carries loss

Every line is checked before any training: the file is read as bytes and each line decoded on
its own, so no input raises anything but DataError. load_samples refuses a file with bad lines
(the error's text lists each one as "file:line: what is wrong") unless data.skip_bad_lines.

Chats are rendered with the model's own chat template. The loss falls on every assistant turn:
its content and the end-of-turn token the template writes after it (ChatML's "<|im_end|>"),
nothing else. Where a turn starts and ends is found by rendering prefixes of the conversation:
messages[:i] with the generation prompt ends where assistant turn i begins, messages[:i+1] ends
just after it. A template for which these are not prefixes of the whole rendering (some drop
past reasoning, or add a default system message only to non-empty chats) falls back to finding
each message's text in order in the rendering. The rendering is tokenized in one piece when each
cut is a token boundary of it (the tokens the model sees at inference); otherwise the pieces are
tokenized separately so the mask stays exact.
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from edgeft.errors import UserError
from edgeft.tokenizer import TemplateError

ROLES = ("system", "user", "assistant")
CHAT, PROMPT_COMPLETION, TEXT = "chat", "prompt/completion", "text"
MAX_LINE_BYTES = 16 * 2**20  # a longer line is a problem, not a memory spike
SHOW_PROBLEMS = 50  # problem lines a summary lists before "... and N more"
PAD_ID = 0
PAD_MULTIPLE = 8
_SPLIT_STREAM, _EPOCH_STREAM = 1, 2  # keep split and epoch orders independent for one seed


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
    overlong: str = "truncate"
    skip_bad_lines: bool = False
    format: str | None = None  # chat, prompt/completion or text (the file's majority)
    lines: int = 0  # non-empty lines
    samples: int = 0  # samples kept
    skipped: int = 0  # lines left out for a problem (skip_bad_lines)
    truncated: int = 0  # samples cut to max_seq_len tokens (kept)
    dropped: int = 0  # over-long samples left out, including dropped_no_loss
    dropped_no_loss: int = 0  # truncation left no token carrying loss
    system_added: int = 0  # chats that got data.system_prompt
    roles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
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
        """The report as text: a one-line summary, one line per problem, then the counts."""
        out = [self._headline()]
        for p in self.problems[:SHOW_PROBLEMS]:
            out.append(f"{self.path}:{p.line}: {p.message}" if p.line else f"{self.path}: {p.message}")
        if len(self.problems) > SHOW_PROBLEMS:
            out.append(f"... and {len(self.problems) - SHOW_PROBLEMS} more problems")
        if self.samples:
            roles = ", ".join(f"{r} {n}" for r, n in self.roles.items())
            added = f" ({self.system_added} from data.system_prompt)" if self.system_added else ""
            out.append(f"  format {self.format}; messages: {roles}{added}")
            totals = (f"{self.total_tokens:,} in {_n(self.samples, 'sample')} "
                      f"({self.loss_tokens:,} carry loss); " if self.bad_lines and not self.skip_bad_lines else "")
            out.append(
                f"  tokens: {totals}per sample mean {self.total_tokens / self.samples:.0f}, "
                f"longest {self.longest} (max_seq_len {self.max_seq_len})"
            )
        if self.truncated or self.dropped:
            out.append(f"  over max_seq_len: {self._overlong_text()}")
        return "\n".join(out)

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
        file_problems = [p for p in self.problems if p.line == 0]
        if file_problems:
            return f"{name}: {file_problems[0].message}"
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
            f"{head}{_n(self.samples, self.format + ' sample')} from {_n(self.lines, 'line')}, "
            f"{self.total_tokens:,} tokens ({self.loss_tokens:,} carry loss){extra}"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ---------------------------------------------------------------------------------------------
# Reading and checking lines


class _LineProblem(Exception):
    pass


def _kind(v) -> str:
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


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    return _kind(v)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
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


def _parse(raw: bytes | None, lineno: int) -> dict | None:
    """The line's JSON object, None for a blank line; _LineProblem for anything else."""
    if raw is None:
        raise _LineProblem(f"line is longer than {MAX_LINE_BYTES // 2**20} MiB; shorten or split it")
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineProblem(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save the file as UTF-8"
        ) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _LineProblem("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise _LineProblem(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise _LineProblem(f"not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise _LineProblem(f"not a JSON object (got {_kind(obj)}); each line must be one object")
    return obj


def _format_of(obj: dict) -> str:
    if "messages" in obj:
        return CHAT
    if "prompt" in obj or "completion" in obj:
        return PROMPT_COMPLETION
    if "text" in obj:
        return TEXT
    keys = ", ".join(_show(k) for k in list(obj)[:5]) or "none"
    raise _LineProblem(
        f"no 'messages', 'prompt'/'completion' or 'text' key (keys: {keys}); see examples/README.md"
    )


def _check_text(s: str, where: str, specials: re.Pattern | None) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _LineProblem(f"{where} contains an unpaired surrogate escape (\\ud800-\\udfff)") from None
    if specials is not None and (m := specials.search(s)):
        raise _LineProblem(
            f"{where} contains the control token {m.group(0)!r}, which would be read as chat "
            "markup; remove it"
        )


def _string_field(obj: dict, key: str, where: str, specials) -> str:
    where = f"{where}: '{key}'" if where else f"'{key}'"
    if key not in obj:
        raise _LineProblem(f"{where} is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise _LineProblem(f"{where} is {_kind(v)}, expected a string")
    if not v.strip():
        raise _LineProblem(f"{where} is empty")
    _check_text(v, where, specials)
    return v


def _chat_messages(obj: dict, specials) -> list[dict]:
    """The conversation as [{"role", "content", "weight"}]; _LineProblem when malformed."""
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise _LineProblem(f"'messages' is {_kind(msgs)}, expected a list of messages")
    if not msgs:
        raise _LineProblem("'messages' is empty")
    out = []
    for k, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            raise _LineProblem(f"message {k} is {_kind(m)}, expected an object with 'role' and 'content'")
        if "role" not in m:
            raise _LineProblem(f"message {k}: 'role' is missing")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise _LineProblem(f"message {k}: unknown role {_show(role)} (expected system, user or assistant)")
        content = _string_field(m, "content", f"message {k} ({role})", specials)
        weight = m.get("weight", 1)
        if role == "assistant" and (isinstance(weight, bool) or weight not in (0, 1)):
            raise _LineProblem(f"message {k} (assistant): 'weight' must be 0 or 1, not {_show(weight)}")
        out.append({"role": role, "content": content, "weight": weight if role == "assistant" else 0})
    if not any(m["role"] == "assistant" for m in out):
        raise _LineProblem("no assistant message: nothing to learn from")
    if not any(m["weight"] for m in out):
        raise _LineProblem("every assistant message has weight 0: nothing to learn from")
    return out


# ---------------------------------------------------------------------------------------------
# Rendering, loss masks


class _NotPrefix(Exception):
    pass


def _token_strings(tokenizer, ids) -> list[str]:
    out = []
    for i in sorted(i for i in ids if i is not None):
        s = tokenizer.decode([i], skip_special=False)
        if s:
            out.append(s)
    return out


def _specials_pattern(tokenizer) -> re.Pattern | None:
    ids = set(getattr(tokenizer, "special_ids", ())) | set(tokenizer.stop_ids)
    strings = sorted(set(_token_strings(tokenizer, ids)), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def _end_of_turn(text: str, pos: int, limit: int, stops: list[str], adjacent: bool) -> int:
    """Where assistant text ending at `pos` ends with its end-of-turn token (searching up to
    `limit`); `pos` itself when there is none (or, if `adjacent`, none after only whitespace)."""
    best = None
    for s in stops:
        j = text.find(s, pos, limit)
        if j >= 0 and (best is None or j < best[0]):
            best = (j, j + len(s))
    if best is None or (adjacent and text[pos:best[0]].strip()):
        return pos
    return best[1]


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prefix_spans(tokenizer, messages, full, stops) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if not m["weight"]:
            continue
        start = tokenizer.render(_clean(messages[:i]), add_generation_prompt=True)
        end = tokenizer.render(_clean(messages[: i + 1]))
        if not (end.startswith(start) and full.startswith(end)):
            raise _NotPrefix
        body = m["content"].strip()
        at = full.find(body, len(start), len(end))
        if at < 0:
            raise _NotPrefix
        stop = _end_of_turn(full, at + len(body), len(end), stops, adjacent=False)
        # no end-of-turn token in the template: the whole turn, trailing text included
        spans.append((len(start), stop if stop > at + len(body) else len(end)))
    return spans


def _search_spans(messages, full, stops) -> list[tuple[int, int]]:
    """Fallback: each message's text, found in order in the rendering."""
    spans, pos = [], 0
    for k, m in enumerate(messages, 1):
        body = m["content"].strip()
        at = full.find(body, pos)
        if at < 0:
            if m["role"] == "assistant":
                raise _LineProblem(
                    f"the chat template does not reproduce the text of message {k}, so its loss "
                    "cannot be placed; check the model's chat template"
                )
            continue  # templates may rewrite or drop system text
        pos = at + len(body)
        lead = m["content"][: len(m["content"]) - len(m["content"].lstrip())]
        if lead and full[at - len(lead) : at] == lead:
            at -= len(lead)
        if m["weight"]:
            pos = _end_of_turn(full, pos, len(full), stops, adjacent=True)
            spans.append((at, pos))
    return spans


def _tokenize_spans(tokenizer, full: str, spans) -> tuple[list[int], list[bool]]:
    cuts = [0] + [c for span in spans for c in span] + [len(full)]
    ids = tokenizer.encode(full)
    bounds = []
    for c in cuts[1:-1]:
        p = tokenizer.encode(full[:c])
        if ids[: len(p)] != p:
            break
        bounds.append(len(p))
    else:  # every cut is a token boundary of the whole text: use its own tokens
        mask = [False] * len(ids)
        for a, b in zip(bounds[::2], bounds[1::2]):
            mask[a:b] = [True] * (b - a)
        return ids, mask
    ids, mask = [], []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        seg = tokenizer.encode(full[a:b]) if b > a else []
        ids += seg
        mask += [k % 2 == 1] * len(seg)
    return ids, mask


def encode_chat(tokenizer, messages: list[dict], stops: list[str] | None = None) -> tuple[list[int], list[bool]]:
    """Tokens and loss mask of a conversation [{"role", "content"[, "weight"]}] (assumed valid)."""
    messages = [{**m, "weight": m.get("weight", 1) if m["role"] == "assistant" else 0} for m in messages]
    if stops is None:
        stops = _token_strings(tokenizer, tokenizer.stop_ids)
    full = tokenizer.render(_clean(messages))
    try:
        spans = _prefix_spans(tokenizer, messages, full, stops)
    except (_NotPrefix, TemplateError):  # TemplateError: e.g. a template that needs a user turn
        spans = _search_spans(messages, full, stops)
    ids, mask = _tokenize_spans(tokenizer, full, spans)
    return _with_bos(tokenizer, ids, mask)


def encode_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A plain document: BOS (if the tokenizer adds one) + text + EOS, every token a target."""
    ids = tokenizer.encode(text)
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    ids, _ = _with_bos(tokenizer, ids, [])
    return ids, [True] * len(ids)


def _with_bos(tokenizer, ids, mask):
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        return [tokenizer.bos_id] + ids, [False] + mask
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Whole files


def _build(path, tokenizer, data_cfg, max_seq_len: int) -> tuple[list[Sample], Report]:
    report = Report(str(path), max_seq_len, data_cfg.overlong, bool(data_cfg.skip_bad_lines))
    try:
        parsed = []  # (line, object, format)
        for lineno, raw in _read_lines(Path(path)):
            try:
                obj = _parse(raw, lineno)
                if obj is None:
                    continue
                parsed.append((lineno, obj, _format_of(obj)))
            except _LineProblem as e:
                report.problems.append(Problem(lineno, str(e)))
            report.lines += 1
    except OSError as e:
        report.problems = [Problem(0, f"cannot be read ({e.strerror or e})")]
        return [], report

    counts = Counter(fmt for _, _, fmt in parsed)
    report.format = max(counts, key=counts.get) if counts else None  # ties: first seen
    specials = _specials_pattern(tokenizer)
    stops = _token_strings(tokenizer, tokenizer.stop_ids)
    samples = []
    for lineno, obj, fmt in parsed:
        try:
            if fmt != report.format:
                raise _LineProblem(
                    f"a {fmt} line in a {report.format} file ({counts[report.format]} {report.format} lines); "
                    "use one format per file"
                )
            sample, messages, added = _encode_line(obj, fmt, tokenizer, data_cfg, specials, stops)
        except _LineProblem as e:
            report.problems.append(Problem(lineno, str(e)))
            continue
        tokens, mask = sample
        report.lengths.append(len(tokens))
        report.texts.append((lineno, _sample_text(obj, messages)))
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
    if fmt == TEXT:
        text = _string_field(obj, "text", "", None)
        return _guard(encode_text, tokenizer, text), [], 0
    if fmt == CHAT:
        messages = _chat_messages(obj, specials)
    else:
        prompt = _string_field(obj, "prompt", "", specials)
        completion = _string_field(obj, "completion", "", specials)
        messages = [{"role": "user", "content": prompt, "weight": 0},
                    {"role": "assistant", "content": completion, "weight": 1}]
    added = 0
    if data_cfg.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": data_cfg.system_prompt, "weight": 0}] + messages
        added = 1
    return _guard(encode_chat, tokenizer, messages, stops), messages, added


def _guard(fn, *args):
    """Template and tokenizer failures on one line become that line's problem."""
    try:
        return fn(*args)
    except _LineProblem:
        raise
    except Exception as e:  # the template is the model's code; the tokenizer is Rust
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if isinstance(e, TemplateError):
            raise _LineProblem(f"the chat template refused this conversation: {msg}") from None
        raise _LineProblem(f"cannot be tokenized: {type(e).__name__}: {msg}") from None


def check_file(path, tokenizer, data_cfg, max_seq_len: int) -> Report:
    """Everything load_samples would find, as a Report; never raises on bad data."""
    return _build(path, tokenizer, data_cfg, max_seq_len)[1]


# ---------------------------------------------------------------------------------------------
# The fuller report of `edgeft data check`: lengths, duplicates


def _sample_text(obj: dict, messages: list[dict]) -> str:
    if messages:
        return "\n".join(f"{m['role']}: {m['content'].strip()}" for m in messages)
    return str(obj.get("text", ""))


def length_histogram(lengths: list[int], max_seq_len: int, context: int | None = None, width: int = 30) -> list[str]:
    """Lines of a histogram of token lengths: power-of-two bins up to max_seq_len, then the
    samples over max_seq_len and (if known) over the model's context."""
    if not lengths:
        return []
    edges = [0]
    while edges[-1] * 2 < max_seq_len:
        edges.append(max(32, edges[-1] * 2))
    edges.append(max_seq_len)
    bins = [(f"{a}-{b - 1}", sum(a <= n < b for n in lengths)) for a, b in zip(edges, edges[1:])]
    bins = [(label, n) for label, n in bins if n] or bins[:1]
    over = sum(n > max_seq_len for n in lengths)
    if over:
        bins.append((f"over {max_seq_len}", over))
    peak = max(n for _, n in bins) or 1
    out = [f"  token lengths (max_seq_len {max_seq_len}"
           + (f", model context {context}" if context else "") + "):"]
    for label, n in bins:
        out.append(f"    {label:>14} {'#' * max(1, round(width * n / peak)) if n else '':{width}} {n}")
    if over:
        out.append(f"    {over} sample{'s' if over != 1 else ''} over max_seq_len will be "
                   f"truncated or dropped (data.overlong); raise --max-seq-len to keep them whole")
    if context and (beyond := sum(n > context for n in lengths)):
        out.append(f"    {_n(beyond, 'sample')} over the model's context of {context} tokens")
    return out


def _normalize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def find_duplicates(texts: list[tuple[int, str]], threshold: float = 0.9, shingle: int = 3
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """(exact, near): exact = [(line, earlier line with the same text)]; near = [(line, other
    line, Jaccard similarity of word 3-grams)] for pairs at or above `threshold` that are not
    exact copies. MinHash (64 hashes, 16 bands of 4) finds candidates, each one checked exactly."""
    import zlib

    exact, near, first = [], [], {}
    shingles = {}
    for line, text in texts:
        key = " ".join(_normalize(text))
        if key in first:
            exact.append((line, first[key]))
            continue
        first[key] = line
        words = key.split()
        grams = {" ".join(words[i:i + shingle]) for i in range(max(1, len(words) - shingle + 1))}
        shingles[line] = grams
    if len(shingles) < 2:
        return exact, near
    rng = np.random.default_rng(0)
    prime = np.uint64(4294967311)  # > 2**32; a < 2**31 keeps a*h + b inside 64 bits
    a = rng.integers(1, 2**31, (64, 1)).astype(np.uint64)
    b = rng.integers(0, 2**31, (64, 1)).astype(np.uint64)
    buckets: dict = {}
    for line, grams in shingles.items():
        hashes = np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64)[None, :]
        sig = ((a * hashes + b) % prime).min(axis=1).tolist()
        for band in range(16):
            buckets.setdefault((band, tuple(sig[band * 4:band * 4 + 4])), []).append(line)
    seen = set()
    for lines in buckets.values():
        for i, x in enumerate(lines):
            for y in lines[i + 1:]:
                if (x, y) in seen:
                    continue
                seen.add((x, y))
                gx, gy = shingles[x], shingles[y]
                sim = len(gx & gy) / len(gx | gy)
                if sim >= threshold:
                    near.append((y, x, sim))
    return exact, sorted(near)


def duplicate_lines(report: Report, show: int = 10) -> list[str]:
    """The duplicate section of `edgeft data check`."""
    exact, near = find_duplicates(report.texts)
    out = []
    if exact:
        shown = ", ".join(f"{a} = {b}" for a, b in exact[:show])
        out.append(f"  duplicates (same words, ignoring case and punctuation): {_n(len(exact), 'line')} "
                   f"repeat an earlier one ({shown}"
                   f"{', ...' if len(exact) > show else ''}); each copy weighs that example more")
    if near:
        shown = ", ".join(f"{a} ~ {b} ({sim:.0%})" for a, b, sim in near[:show])
        out.append(f"  near duplicates (90%+ of word 3-grams shared): {_n(len(near), 'pair')} "
                   f"({shown}{', ...' if len(near) > show else ''})")
    if not out and report.texts:
        out.append("  duplicates: none (exact or 90%+ similar)")
    return out


def load_samples(path, tokenizer, data_cfg, max_seq_len: int) -> tuple[list[Sample], Report]:
    """Samples of a JSONL file, or DataError listing its bad lines.

    With data_cfg.skip_bad_lines the good lines are used and the report counts the rest.
    """
    samples, report = _build(path, tokenizer, data_cfg, max_seq_len)
    file_problem = any(p.line == 0 for p in report.problems)
    if file_problem or (report.problems and not data_cfg.skip_bad_lines) or not samples:
        raise DataError(report)
    return samples, report


# ---------------------------------------------------------------------------------------------
# Split and batches


def _seed(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *stream])


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, valid): a seeded share `fraction` held out; at least one validation sample when
    fraction > 0 and there are two or more samples; train never empty. Both keep file order."""
    n = len(samples)
    if fraction <= 0 or n < 2:
        return list(samples), []
    n_valid = min(max(1, round(n * fraction)), n - 1)
    held = set(_seed(seed, _SPLIT_STREAM).permutation(n)[:n_valid].tolist())
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def collate(batch: list[Sample]) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, loss_mask) [B, T]: T the longest input rounded up to a multiple of 8,
    padding id 0 with loss 0."""
    longest = max(len(s.tokens) - 1 for s in batch)
    width = max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    inputs = np.full((len(batch), width), PAD_ID, dtype=np.int32)
    targets = np.full((len(batch), width), PAD_ID, dtype=np.int32)
    loss_mask = np.zeros((len(batch), width), dtype=np.float32)
    for b, s in enumerate(batch):
        n = len(s.tokens) - 1
        inputs[b, :n] = s.tokens[:-1]
        targets[b, :n] = s.tokens[1:]
        loss_mask[b, :n] = s.mask[1:]
    return mx.array(inputs), mx.array(targets), mx.array(loss_mask)


def pack(inputs, targets, loss_mask) -> tuple[mx.array, mx.array, mx.array, tuple[int, ...]]:
    """A padded batch as one row [1, N] with no padding: each sequence cut after its last loss
    position (what follows cannot change the loss: attention is causal), sequences without
    loss dropped, the rest laid end to end. Returns the row's inputs, targets, loss mask and
    the sequence lengths (for edgeft.backend.Packing). N is what collate's batch counts as
    input tokens; the loss positions keep their order."""
    m = np.asarray(loss_mask) > 0
    keep = m.any(axis=1)
    ends = np.where(keep, m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)
    rows = [(b, int(ends[b])) for b in range(m.shape[0]) if keep[b]]
    x, y, w = np.asarray(inputs), np.asarray(targets), np.asarray(loss_mask)

    def row(a):
        return mx.array(np.concatenate([a[b, :n] for b, n in rows] or [a[0, :0]])[None])

    return row(x), row(y), row(w), tuple(n for _, n in rows)


def iterate_batches(samples: list[Sample], batch_size: int, seed: int, start_step: int = 0):
    """Batches forever, a pure function of (seed, step).

    The samples form one endless stream, epoch e in an order seeded by (seed, e); batch k is
    stream items k*B .. k*B+B-1 (a batch may span two epochs), so starting at `start_step`
    yields exactly what continuing from step 0 would have.
    """
    if not samples:
        raise ValueError("iterate_batches: no samples")
    if batch_size < 1:
        raise ValueError("iterate_batches: batch_size must be at least 1")
    n, orders = len(samples), {}
    step = start_step
    while True:
        batch = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(p, n)
            if epoch not in orders:
                orders = {e: o for e, o in orders.items() if e >= epoch - 1}
                orders[epoch] = _seed(seed, _EPOCH_STREAM, epoch).permutation(n)
            batch.append(samples[orders[epoch][i]])
        yield collate(batch)
        step += 1


def eval_batches(samples: list[Sample], batch_size: int):
    """One pass over `samples` (sorted by length, so batches pad little); the last batch may
    be smaller."""
    ordered = sorted(samples, key=lambda s: len(s.tokens))
    for i in range(0, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size])
