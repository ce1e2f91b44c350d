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


# A chat template in the manner of Qwen 2.5's: tool definitions in the system turn, each call as
# <tool_call>{"name", "arguments"}</tool_call> in the assistant turn, results as
# <tool_response> blocks in a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall a function with <tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tools_tok() -> Tokenizer:
    """The tiny vocabulary with TOOLS_TEMPLATE as its chat template."""
    return Tokenizer.from_gguf_metadata({**tiny_tokenizer_metadata(), "tokenizer.chat_template": TOOLS_TEMPLATE})
