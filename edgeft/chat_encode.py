"""Conversations rendered with the model's chat template, as token ids with a loss mask.

The loss falls on every assistant turn of weight 1: its content, its tool calls as the template
writes them, and the end-of-turn token after it (ChatML's "<|im_end|>"); nothing else, never a
tool's result. Tool definitions go to the template as `tools`, calls as each assistant
message's `tool_calls`; tools_problem says when a template cannot render them.

Where a turn starts and ends is found by rendering prefixes of the conversation: messages[:i]
with the generation prompt ends where assistant turn i begins, messages[:i+1] ends just after
it. A template for which these are not prefixes of the whole rendering (some drop past
reasoning, or add a default system message only to non-empty chats) falls back to finding each
message's text (a call by its function's name) in order in the rendering. The rendering is
tokenized in one piece when each cut is a token boundary of it (the tokens the model sees at
inference); otherwise the pieces are tokenized separately so the mask stays exact.

The BOS rule (with_bos) lives here too: every sequence edgeft trains on or measures starts
with BOS when the tokenizer adds one, never with two.
"""

from __future__ import annotations

import re

from edgeft.chat_template import TemplateError
from edgeft.records import LineProblem


class _NotPrefix(Exception):
    pass


def token_strings(tokenizer, ids) -> list[str]:
    """The text of each token id (specials included), in id order; empty ones left out."""
    out = []
    for i in sorted(i for i in ids if i is not None):
        s = tokenizer.decode([i], skip_special=False)
        if s:
            out.append(s)
    return out


def specials_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any control or stop token of the tokenizer (None: none)."""
    ids = tokenizer.special_ids | tokenizer.stop_ids
    strings = sorted(set(token_strings(tokenizer, ids)), key=len, reverse=True)
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


_TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id")


def _clean(messages: list[dict]) -> list[dict]:
    """The messages as the template gets them (no weights)."""
    return [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]


def _prefix_spans(render, messages, full, stops) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if not m["weight"]:
            continue
        start = render(messages[:i], True)
        end = render(messages[: i + 1])
        if not (end.startswith(start) and full.startswith(end)):
            raise _NotPrefix
        if m.get("tool_calls"):
            # the turn is the template's rendering of content and calls: all of it, up to and
            # including its end-of-turn token (neither content nor calls may hold one)
            if not all(c["function"]["name"] in full[len(start):len(end)] for c in m["tool_calls"]):
                raise _NotPrefix
            stop = _end_of_turn(full, len(start), len(end), stops, adjacent=False)
            spans.append((len(start), stop if stop > len(start) else len(end)))
            continue
        body = m["content"].strip()
        at = full.find(body, len(start), len(end))
        if at < 0:
            raise _NotPrefix
        stop = _end_of_turn(full, at + len(body), len(end), stops, adjacent=False)
        # no end-of-turn token in the template: the whole turn, trailing text included
        spans.append((len(start), stop if stop > at + len(body) else len(end)))
    return spans


def _search_spans(render, messages, full, stops) -> list[tuple[int, int]]:
    """Fallback: each message's text, found in order in the rendering."""
    spans, pos = [], 0
    for k, m in enumerate(messages, 1):
        if m.get("tool_calls"):
            at, pos = _search_calls(render, m, k, full, pos, stops)
            if m["weight"]:
                spans.append((at, pos))
            continue
        body = m["content"].strip()
        at = full.find(body, pos)
        if at < 0:
            if m["role"] == "assistant":
                raise LineProblem(
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


def _search_calls(render, m, k, full, pos, stops) -> tuple[int, int]:
    """Where an assistant turn with tool calls lies in the rendering, found from `pos`: from
    the end of the generation prompt before it (else from its first text) to the end-of-turn
    token after its last call's name."""
    anchors = [c["function"]["name"] for c in m["tool_calls"]]
    if m["content"].strip():
        anchors.insert(0, m["content"].strip())
    first, end = None, pos
    for text in anchors:
        j = full.find(text, end)
        if j < 0:
            raise LineProblem(f"the chat template does not render the tool calls of message {k}, so "
                              "their loss cannot be placed; check the model's chat template")
        first = j if first is None else first
        end = j + len(text)
    stop = _end_of_turn(full, end, len(full), stops, adjacent=False)
    if stop == end:
        raise LineProblem(f"the chat template writes no end-of-turn token after the tool calls of "
                          f"message {k}, so their loss cannot be placed")
    header = _generation_prompt(render)
    h = full.rfind(header, pos, first) if header else -1
    return (h + len(header) if h >= 0 else first), stop


def _generation_prompt(render) -> str:
    """What the template writes to open an assistant turn ("<|im_start|>assistant\n"); "" when
    that cannot be told."""
    probe = [{"role": "user", "content": "Hello."}]
    try:
        bare, opened = render(probe), render(probe, True)
    except TemplateError:
        return ""
    return opened[len(bare):] if opened.startswith(bare) else ""


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


def encode_chat(tokenizer, messages: list[dict], stops: list[str] | None = None,
                tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """Tokens and loss mask of a conversation [{"role", "content"[, "weight"][, "tool_calls"]
    [, "tool_call_id"]}] (assumed valid, as chat_formats gives it), rendered with `tools`."""
    messages = [{**m, "weight": m.get("weight", 1) if m["role"] == "assistant" else 0} for m in messages]
    if stops is None:
        stops = token_strings(tokenizer, tokenizer.stop_ids)
    context = {"tools": tools} if tools else {}

    def render(msgs, add_generation_prompt=False):
        return tokenizer.render(_clean(msgs), add_generation_prompt=add_generation_prompt, **context)

    full = render(messages)
    try:
        spans = _prefix_spans(render, messages, full, stops)
    except (_NotPrefix, TemplateError):  # TemplateError: e.g. a template that needs a user turn
        spans = _search_spans(render, messages, full, stops)
    ids, mask = _tokenize_spans(tokenizer, full, spans)
    return with_bos(tokenizer, ids, mask)


def encode_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A plain document: BOS (if the tokenizer adds one) + text + EOS, every token a target."""
    ids = tokenizer.encode(text)
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    ids = with_bos(tokenizer, ids)
    return ids, [True] * len(ids)


def with_bos(tokenizer, ids: list[int], mask: list[bool] | None = None):
    """`ids` with BOS in front when the tokenizer adds one and it is not there already; with
    `mask`, (ids, mask) where the added BOS carries no loss."""
    add = tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]
    if add:
        ids = [tokenizer.bos_id] + ids
    if mask is None:
        return ids
    return ids, ([False] + mask if add else mask)


_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "edgeft_probe_lookup", "description": "Look a thing up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
_PROBE_CHAT = [
    {"role": "user", "content": "Look up the probe."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "probe0001", "function": {
        "name": "edgeft_probe_lookup", "arguments": {"query": "probe-argument-7"}}}]},
    {"role": "tool", "tool_call_id": "probe0001", "content": "probe-result-7"},
    {"role": "assistant", "content": "Found it."},
]


def tools_problem(tokenizer) -> str | None:
    """Why the model's chat template cannot train tool calls (None: it can): rendering a probe
    conversation with `tools`, its call (name and arguments) and its result must appear."""
    try:
        text = tokenizer.render(_PROBE_CHAT, tools=_PROBE_TOOLS)
    except TemplateError as e:
        return f"the model's chat template fails on a conversation with tool calls ({str(e).splitlines()[0][:120]})"
    missing = [what for what, marks in (("tool calls", ("edgeft_probe_lookup", "probe-argument-7")),
                                        ("tool results", ("probe-result-7",))) if not all(m in text for m in marks)]
    if missing:
        return f"the model's chat template does not render {' or '.join(missing)} (it has no tool support)"
    return None
