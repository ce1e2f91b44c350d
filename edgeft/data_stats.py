"""The statistics `edgeft data check` adds to a file's report: a histogram of token lengths
and the lines that repeat (exactly, or nearly: MinHash over word 3-grams)."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np

from edgeft.records import Report, plural


def sample_text(obj: dict, messages: list[dict]) -> str:
    """How a sample reads for finding duplicates: its messages (tool calls included), or its
    text."""
    if messages:
        return "\n".join(f"{m['role']}: {m['content'].strip()}" + "".join(
            f" {c['function']['name']}{json.dumps(c['function']['arguments'], sort_keys=True)}"
            for c in m.get("tool_calls") or ()) for m in messages)
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
        out.append(f"    {plural(beyond, 'sample')} over the model's context of {context} tokens")
    return out


def _normalize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def find_duplicates(texts: list[tuple[int, str]], threshold: float = 0.9, shingle: int = 3
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """(exact, near): exact = [(line, earlier line with the same text)]; near = [(line, other
    line, Jaccard similarity of word 3-grams)] for pairs at or above `threshold` that are not
    exact copies. MinHash (64 hashes, 16 bands of 4) finds candidates, each one checked exactly."""
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
        out.append(f"  duplicates (same words, ignoring case and punctuation): {plural(len(exact), 'line')} "
                   f"repeat an earlier one ({shown}"
                   f"{', ...' if len(exact) > show else ''}); each copy weighs that example more")
    if near:
        shown = ", ".join(f"{a} ~ {b} ({sim:.0%})" for a, b, sim in near[:show])
        out.append(f"  near duplicates (90%+ of word 3-grams shared): {plural(len(near), 'pair')} "
                   f"({shown}{', ...' if len(near) > show else ''})")
    if not out and report.texts:
        out.append("  duplicates: none (exact or 90%+ similar)")
    return out
