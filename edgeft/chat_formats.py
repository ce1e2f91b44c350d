"""The shapes a data line may take, and each one read into a conversation.

Formats, detected per line (one per file; lines in a minority format are problems):
  chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                     (OpenAI's optional assistant "weight": 0 excludes that turn from the loss)
  prompt/completion  {"prompt": "...", "completion": "..."}   -> one user turn, one assistant turn
  text               {"text": "..."}                           -> every token carries loss

A conversation is a list of {"role", "content", "weight"} (weight 1 on the assistant turns
that carry loss, 0 elsewhere). Anything malformed is a LineProblem naming the message and field.
"""

from __future__ import annotations

import re

from edgeft.records import ROLES, LineProblem, kind, show

CHAT, PROMPT_COMPLETION, TEXT = "chat", "prompt/completion", "text"


def format_of(obj: dict) -> str:
    if "messages" in obj:
        return CHAT
    if "prompt" in obj or "completion" in obj:
        return PROMPT_COMPLETION
    if "text" in obj:
        return TEXT
    keys = ", ".join(show(k) for k in list(obj)[:5]) or "none"
    raise LineProblem(
        f"no 'messages', 'prompt'/'completion' or 'text' key (keys: {keys}); see examples/README.md"
    )


def check_text(s: str, where: str, specials: re.Pattern | None) -> None:
    """LineProblem if `s` cannot be encoded or holds a control token (chat markup) of the model."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise LineProblem(f"{where} contains an unpaired surrogate escape (\\ud800-\\udfff)") from None
    if specials is not None and (m := specials.search(s)):
        raise LineProblem(
            f"{where} contains the control token {m.group(0)!r}, which would be read as chat "
            "markup; remove it"
        )


def string_field(obj: dict, key: str, where: str, specials) -> str:
    where = f"{where}: '{key}'" if where else f"'{key}'"
    if key not in obj:
        raise LineProblem(f"{where} is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise LineProblem(f"{where} is {kind(v)}, expected a string")
    if not v.strip():
        raise LineProblem(f"{where} is empty")
    check_text(v, where, specials)
    return v


def chat_messages(obj: dict, specials) -> list[dict]:
    """The conversation of a chat line; LineProblem when malformed."""
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise LineProblem(f"'messages' is {kind(msgs)}, expected a list of messages")
    if not msgs:
        raise LineProblem("'messages' is empty")
    out = []
    for k, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            raise LineProblem(f"message {k} is {kind(m)}, expected an object with 'role' and 'content'")
        if "role" not in m:
            raise LineProblem(f"message {k}: 'role' is missing")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise LineProblem(f"message {k}: unknown role {show(role)} (expected system, user or assistant)")
        content = string_field(m, "content", f"message {k} ({role})", specials)
        weight = m.get("weight", 1)
        if role == "assistant" and (isinstance(weight, bool) or weight not in (0, 1)):
            raise LineProblem(f"message {k} (assistant): 'weight' must be 0 or 1, not {show(weight)}")
        out.append({"role": role, "content": content, "weight": weight if role == "assistant" else 0})
    if not any(m["role"] == "assistant" for m in out):
        raise LineProblem("no assistant message: nothing to learn from")
    if not any(m["weight"] for m in out):
        raise LineProblem("every assistant message has weight 0: nothing to learn from")
    return out


def prompt_completion_messages(obj: dict, specials) -> list[dict]:
    prompt = string_field(obj, "prompt", "", specials)
    completion = string_field(obj, "completion", "", specials)
    return [{"role": "user", "content": prompt, "weight": 0},
            {"role": "assistant", "content": completion, "weight": 1}]


def text_of(obj: dict) -> str:
    return string_field(obj, "text", "", None)
