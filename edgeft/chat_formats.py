"""The shapes a data line may take, and each one read into a conversation.

Formats, detected per line (one per file; lines in a minority format are problems):
  chat               OpenAI's chat format, as its fine-tuning files allow:
                     {"messages": [{"role": "system" | "user" | "assistant" | "tool", ...}, ...],
                      "tools": [...]}   (top-level "tools" optional)
                     an assistant message has "content", or "tool_calls" (content null or
                     absent) or both; "weight": 0 takes it out of the loss. A tool message
                     answers a call ("tool_call_id", or the oldest unanswered call).
  ShareGPT           {"conversations": [{"from": "human" | "gpt" | ..., "value": "..."}, ...],
                      "system": "...", "tools": [...]}   (top-level system and tools optional)
                     a "function_call" turn's value is the JSON of {"name", "arguments"} (or a
                     list of them); "observation" and "tool" turns are its results.
  prompt/completion  {"prompt": "...", "completion": "..."}   -> one user turn, one assistant turn
  text               {"text": "..."}                           -> every token carries loss

Every chat format becomes a Conversation: messages as chat templates take them
({"role", "content"} plus "tool_calls" [{"type": "function", "function": {"name", "arguments":
{...}}}] on assistant turns and "tool_call_id" on tool results), each with a "weight" (1 on the
assistant turns that carry loss, 0 elsewhere), and the tool definitions. Anything malformed is
a LineProblem naming the message and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgeft.records import ROLES, LineProblem, kind, show

CHAT, SHAREGPT, PROMPT_COMPLETION, TEXT = "chat", "ShareGPT", "prompt/completion", "text"
FORMAT_NAMES = {
    CHAT: "OpenAI chat messages",
    SHAREGPT: "conversations of from/value turns",
    PROMPT_COMPLETION: "a prompt and a completion per line",
    TEXT: "plain text, every token trained",
}
TOOL = "tool"
TOOL_CALL = "tool call"  # a ShareGPT function_call turn: an assistant turn that only calls
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
    "function_call": TOOL_CALL, "observation": TOOL, "tool": TOOL,
}


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None  # tool definitions, {"type": "function", "function": {...}}

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == TOOL for m in self.messages)


def format_of(obj: dict) -> str:
    if "messages" in obj:
        return CHAT
    if "conversations" in obj:
        return SHAREGPT
    if "prompt" in obj or "completion" in obj:
        return PROMPT_COMPLETION
    if "text" in obj:
        return TEXT
    keys = ", ".join(show(k) for k in list(obj)[:5]) or "none"
    raise LineProblem(
        f"no 'messages', 'prompt'/'completion' or 'text' key, nor ShareGPT's 'conversations' "
        f"(keys: {keys}); see examples/README.md"
    )


def conversation(obj: dict, fmt: str, specials: re.Pattern | None) -> Conversation:
    """The conversation of a line in a chat format (chat, ShareGPT, prompt/completion), with
    something to train on."""
    conv = turns(obj, fmt, specials)
    if fmt == PROMPT_COMPLETION and "completion" not in obj:
        string_field(obj, "completion", "", specials)  # says it is missing
    _checked(conv.messages)
    return conv


def turns(obj: dict, fmt: str, specials: re.Pattern | None) -> Conversation:
    """The turns of a line in a chat format, checked one by one, whether or not any is an
    answer to train on (a prompt for the evaluation may end before its answer)."""
    if fmt == CHAT:
        return Conversation(_chat_messages(obj, specials), _tools(obj, specials))
    if fmt == SHAREGPT:
        return Conversation(_sharegpt_messages(obj, specials), _tools(obj, specials))
    messages = [{"role": "user", "content": string_field(obj, "prompt", "", specials), "weight": 0}]
    if "completion" in obj:
        messages.append({"role": "assistant", "content": string_field(obj, "completion", "", specials), "weight": 1})
    return Conversation(messages)


def text_of(obj: dict) -> str:
    return string_field(obj, "text", "", None)


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


def string_field(obj: dict, key: str, where: str, specials, empty_ok: bool = False) -> str:
    where = f"{where}: '{key}'" if where else f"'{key}'"
    if key not in obj:
        raise LineProblem(f"{where} is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise LineProblem(f"{where} is {kind(v)}, expected a string")
    if not empty_ok and not v.strip():
        raise LineProblem(f"{where} is empty")
    check_text(v, where, specials)
    return v


def _weight(m: dict, where: str) -> int:
    weight = m.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise LineProblem(f"{where}: 'weight' must be 0 or 1, not {show(weight)}")
    return int(weight)


def _checked(out: list[dict]) -> list[dict]:
    if not out:
        raise LineProblem("the conversation is empty")
    if not any(m["role"] == "assistant" for m in out):
        raise LineProblem("no assistant message: nothing to learn from")
    if not any(m["weight"] for m in out):
        raise LineProblem("every assistant message has weight 0: nothing to learn from")
    return out


class _Calls:
    """The tool calls of a conversation not answered yet, so each tool result finds its call."""

    def __init__(self):
        self.open: list[dict] = []

    def add(self, calls: list[dict]) -> None:
        self.open += calls

    def answer(self, call_id, where: str) -> None:
        if call_id is not None:
            if not isinstance(call_id, str):
                raise LineProblem(f"{where}: 'tool_call_id' is {kind(call_id)}, expected a string")
            for c in self.open:
                if c.get("id") == call_id:
                    self.open.remove(c)
                    return
            raise LineProblem(f"{where}: 'tool_call_id' {show(call_id)} matches no earlier unanswered "
                              "tool call; a tool message answers a call of an assistant message before it")
        if not self.open:
            raise LineProblem(f"{where}: no tool call to answer; a tool result must follow an assistant "
                              "message with 'tool_calls'")
        self.open.pop(0)


def _chat_messages(obj: dict, specials) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise LineProblem(f"'messages' is {kind(msgs)}, expected a list of messages")
    if not msgs:
        raise LineProblem("'messages' is empty")
    out, calls = [], _Calls()
    for k, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            raise LineProblem(f"message {k} is {kind(m)}, expected an object with 'role' and 'content'")
        if "role" not in m:
            raise LineProblem(f"message {k}: 'role' is missing")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES + (TOOL,):
            raise LineProblem(f"message {k}: unknown role {show(role)} (expected system, user or assistant), "
                              "or tool for a tool's result")
        where = f"message {k} ({role})"
        if role == TOOL:
            calls.answer(m.get("tool_call_id"), where)
            msg = {"role": TOOL, "content": string_field(m, "content", where, specials, empty_ok=True), "weight": 0}
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
        elif role == "assistant" and m.get("tool_calls") not in (None, []):
            tool_calls = m["tool_calls"]
            if not isinstance(tool_calls, list):
                raise LineProblem(f"{where}: 'tool_calls' is {kind(tool_calls)}, expected a list of calls")
            parsed = [_openai_call(c, f"{where}: tool call {j}", specials) for j, c in enumerate(tool_calls, 1)]
            calls.add(parsed)
            content = m.get("content")
            if content is not None:
                content = string_field(m, "content", where, specials, empty_ok=True)
            out.append({"role": role, "content": content or "", "tool_calls": parsed, "weight": _weight(m, where)})
        else:
            content = string_field(m, "content", where, specials)
            weight = _weight(m, where) if role == "assistant" else 0
            out.append({"role": role, "content": content, "weight": weight})
    return out


def _openai_call(c, where: str, specials) -> dict:
    """One entry of an assistant's tool_calls: {"id", "type": "function", "function": {"name",
    "arguments": "<JSON string>"}}, with the arguments parsed."""
    if not isinstance(c, dict):
        raise LineProblem(f"{where} is {kind(c)}, expected an object with 'function'")
    if c.get("type", "function") != "function":
        raise LineProblem(f"{where}: 'type' is {show(c['type'])}; only 'function' calls are supported")
    fn = c.get("function")
    if not isinstance(fn, dict):
        raise LineProblem(f"{where}: 'function' is {'missing' if fn is None else kind(fn)}, expected an "
                          "object with 'name' and 'arguments'")
    if "arguments" not in fn:
        raise LineProblem(f"{where}: 'function.arguments' is missing (a JSON string, e.g. \"{{}}\")")
    raw = fn["arguments"]
    if not isinstance(raw, str):
        raise LineProblem(f"{where}: 'function.arguments' is {kind(raw)}, expected a JSON string such as "
                          "\"{\\\"order_id\\\": \\\"A123\\\"}\" (OpenAI's format)")
    call = _call(fn.get("name"), _json_arguments(raw, where), where, specials)
    if "id" in c:
        if not isinstance(c["id"], str):
            raise LineProblem(f"{where}: 'id' is {kind(c['id'])}, expected a string")
        call["id"] = c["id"]
    return call


def _json_arguments(raw: str, where: str) -> dict:
    try:
        args = json.loads(raw)
    except RecursionError:
        raise LineProblem(f"{where}: 'arguments' is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)[:80]
        raise LineProblem(f"{where}: 'arguments' is not valid JSON ({msg})") from None
    if not isinstance(args, dict):
        raise LineProblem(f"{where}: 'arguments' holds {kind(args)}, expected a JSON object")
    return args


def _call(name, args: dict, where: str, specials) -> dict:
    if name is None:
        raise LineProblem(f"{where} has no function name; each call names the function it calls")
    if not isinstance(name, str) or not name.strip():
        raise LineProblem(f"{where}: the function name is {kind(name) if name != '' else 'empty'}, "
                          "expected a non-empty string")
    check_text(name, f"{where}: the function name", specials)
    check_text(_dumps(args, f"{where}: 'arguments'"), f"{where}: 'arguments'", specials)
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _tools(obj: dict, specials) -> list[dict] | None:
    """The top-level tool definitions, each as {"type": "function", "function": {...}}; a
    ShareGPT file may give them as a JSON string, or unwrapped ({"name", ...})."""
    tools = obj.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise LineProblem("'tools' is a string that is not a JSON list of tool definitions") from None
    if not isinstance(tools, list):
        raise LineProblem(f"'tools' is {kind(tools)}, expected a list of tool definitions")
    out = []
    for j, t in enumerate(tools, 1):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise LineProblem(f"tool {j} of 'tools' has no function name; expected "
                              "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
        out.append({"type": "function", "function": fn})
    check_text(_dumps(out, "'tools'"), "'tools'", specials)
    return out or None


def _dumps(v, where: str) -> str:
    try:
        return json.dumps(v, ensure_ascii=False)
    except (RecursionError, ValueError):
        raise LineProblem(f"{where} is nested too deeply") from None


def _sharegpt_messages(obj: dict, specials) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise LineProblem(f"'conversations' is {kind(turns)}, expected a list of turns")
    if not turns:
        raise LineProblem("'conversations' is empty")
    out, calls = [], _Calls()
    top_system = obj.get("system") not in (None, "")
    if top_system:
        out.append({"role": "system", "content": string_field(obj, "system", "", specials), "weight": 0})
    for k, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise LineProblem(f"message {k} is {kind(t)}, expected an object with 'from' and 'value'")
        if "from" not in t:
            raise LineProblem(f"message {k}: 'from' is missing")
        who = t["from"]
        role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise LineProblem(f"message {k}: unknown 'from' value {show(who)} (known: {', '.join(SHAREGPT_ROLES)})")
        where = f"message {k} ({who})"
        if role == "system" and top_system:
            raise LineProblem(f"{where}: the line has a top-level 'system' too; keep one of them")
        if role == TOOL_CALL:
            value = string_field(t, "value", where, specials)
            parsed = [_sharegpt_call(c, f"{where}: call {j}", specials) for j, c in enumerate(_json_calls(value, where), 1)]
            calls.add(parsed)
            out.append({"role": "assistant", "content": "", "tool_calls": parsed, "weight": _weight(t, where)})
        elif role == TOOL:
            calls.answer(None, where)
            out.append({"role": TOOL, "content": string_field(t, "value", where, specials, empty_ok=True), "weight": 0})
        else:
            value = string_field(t, "value", where, specials)
            out.append({"role": role, "content": value, "weight": _weight(t, where) if role == "assistant" else 0})
    return out


def _json_calls(value: str, where: str) -> list:
    try:
        calls = json.loads(value)
    except (ValueError, RecursionError):
        raise LineProblem(f"{where}: 'value' is not the JSON of a call ({{\"name\": ..., \"arguments\": {{...}}}})") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise LineProblem(f"{where}: 'value' holds no call")
    return calls


def _sharegpt_call(c, where: str, specials) -> dict:
    if not isinstance(c, dict):
        raise LineProblem(f"{where} is {kind(c)}, expected an object with 'name' and 'arguments'")
    args = c.get("arguments", {})
    if isinstance(args, str):
        args = _json_arguments(args, where)
    elif not isinstance(args, dict):
        raise LineProblem(f"{where}: 'arguments' is {kind(args)}, expected a JSON object")
    return _call(c.get("name"), args, where, specials)
