"""Chats and helpers shared by the data tests: a tokenizer of the tiny vocabulary, a file
writer, and the text of each run of loss-carrying tokens."""

import json
from pathlib import Path

from tiny import tiny_tokenizer_metadata

from edgeft.tokenizer import Tokenizer

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


def tiny_tok() -> Tokenizer:
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
