"""ShareGPT, OpenAI tool calls and weights, and data folders: what each shape trains on.

The tool-calling tests use the tiny vocabulary with a chat template in the manner of Qwen 2.5's
(tests/chats.py TOOLS_TEMPLATE); the ChatML one of the tiny models has no tool support, nor has
the real SmolLM2's.
"""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from chats import CHAT3, TOOLS_TEMPLATE, loss_runs, tiny_tok, tools_tok, write
from click.testing import CliRunner
from gguf import Keys
from tiny import gguf_config, gguf_tensors, tiny_config, tiny_weights, write_gguf

from edgeft import chat_formats
from edgeft.chat_encode import encode_chat, tools_problem
from edgeft.cli import main
from edgeft.config import DataConfig
from edgeft.data_files import check_file, folder_files, load_samples, training_files
from edgeft.records import DataError
from edgeft.tokenizer import Tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "An order's status.",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def call(order_id, call_id="call_1", name="lookup_order"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"order_id": order_id})}}


def tool_chat(order_id="FH-1042", answer_weight=1, call_weight=1):
    return {"messages": [
        {"role": "system", "content": "You help Fernhollow's customers."},
        {"role": "user", "content": f"Where is my order {order_id}?"},
        {"role": "assistant", "content": None, "tool_calls": [call(order_id)], "weight": call_weight},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "secret": "TOOLRESULT"}'},
        {"role": "assistant", "content": "It shipped on Monday.", "weight": answer_weight},
    ], "tools": TOOLS}


def as_sharegpt(chat):
    """The same conversation in ShareGPT's shape (the OpenAI one must be system, then turns)."""
    system, *msgs = chat["messages"]
    turns = []
    for m in msgs:
        if m.get("tool_calls"):
            value = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            turns.append({"from": "function_call", "value": json.dumps(value[0] if len(value) == 1 else value)})
        else:
            turns.append({"from": {"user": "human", "assistant": "gpt", "tool": "observation"}[m["role"]],
                          "value": m["content"]})
        if "weight" in m:
            turns[-1]["weight"] = m["weight"]
    out = {"system": system["content"], "conversations": turns}
    if "tools" in chat:
        out["tools"] = json.dumps(chat["tools"])  # as LLaMA-Factory writes it
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tok()


@pytest.fixture(scope="module")
def ttok():
    return tools_tok()


def rest_of(tok, tokens, mask):
    return tok.decode([t for t, m in zip(tokens, mask) if not m], skip_special=False)


# --- the template ---------------------------------------------------------------------------------
def test_the_tools_template_renders_a_tool_chat_as_qwen_does(ttok):
    conversation = chat_formats.conversation(tool_chat(), chat_formats.CHAT, None)
    assert conversation.tools == TOOLS
    assert conversation.messages[2]["tool_calls"] == [{"type": "function", "id": "call_1", "function": {
        "name": "lookup_order", "arguments": {"order_id": "FH-1042"}}}]  # arguments parsed, as templates take them
    text = ttok.render([{k: v for k, v in m.items() if k != "weight"} for m in conversation.messages], tools=TOOLS)
    assert text == (
        "<|im_start|>system\nYou help Fernhollow's customers.\n\n# Tools\n\n<tools>\n" + json.dumps(TOOLS[0])
        + "\n</tools>\n\nCall a function with <tool_call></tool_call> XML tags.<|im_end|>\n"
        "<|im_start|>user\nWhere is my order FH-1042?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"lookup_order\", \"arguments\": {\"order_id\": \"FH-1042\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"status\": \"shipped\", \"secret\": \"TOOLRESULT\"}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt shipped on Monday.<|im_end|>\n"
    )
    assert tools_problem(ttok) is None
    assert "no tool support" in tools_problem(tiny_tok())


# --- masks ----------------------------------------------------------------------------------------
def test_tool_chat_mask_is_the_calls_and_the_answers_never_the_results(tmp_path, ttok):
    chat = tool_chat()
    chat["messages"][2]["content"] = "One moment."  # content and calls in one turn
    (sample,), report = load_samples(write(tmp_path, [chat]), ttok, DataConfig(), 1024)
    call_text = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "FH-1042"}}\n</tool_call><|im_end|>'
    assert loss_runs(ttok, sample.tokens, sample.mask) == [
        "One moment.\n" + call_text, "It shipped on Monday.<|im_end|>"]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in chat["messages"]]
    messages[2]["tool_calls"] = [{"type": "function", "id": "call_1", "function": {
        "name": "lookup_order", "arguments": {"order_id": "FH-1042"}}}]
    full = ttok.render(messages, tools=TOOLS)
    assert sample.tokens == ttok.encode(full)  # the template's rendering, tokenized whole
    rest = rest_of(ttok, sample.tokens, sample.mask)
    assert rest == full.replace("One moment.\n" + call_text, "", 1).replace("It shipped on Monday.<|im_end|>", "", 1)
    assert "TOOLRESULT" in rest and "lookup_order" in rest  # the result and the tool list: prompt
    assert (report.tool_calls, report.tool_results, report.weighted_out) == (1, 1, 0)


def test_sharegpt_mask_is_exactly_the_gpt_turns(tmp_path, tok):
    line = {"system": CHAT3[0]["content"], "conversations": [
        {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT3[1:]]}
    (sample,), report = load_samples(write(tmp_path, [line]), tok, DataConfig(), 1024)
    answers = [m["content"] + "<|im_end|>" for m in CHAT3 if m["role"] == "assistant"]
    assert loss_runs(tok, sample.tokens, sample.mask) == answers
    full = tok.render(CHAT3)
    assert sample.tokens == tok.encode(full)
    for a in answers:
        full = full.replace(a, "", 1)
    assert rest_of(tok, sample.tokens, sample.mask) == full
    assert report.format == "ShareGPT" and report.roles == {"system": 1, "user": 3, "assistant": 3}


@pytest.mark.parametrize("which", ["call", "answer"])
def test_weight_zero_takes_out_exactly_that_turn(ttok, which):
    full = tool_chat()
    out = tool_chat(**{f"{which}_weight": 0})
    tokens, mask = encode_chat(ttok, full["messages"], tools=TOOLS)
    tokens0, mask0 = encode_chat(ttok, out["messages"], tools=TOOLS)
    assert tokens0 == tokens
    runs = loss_runs(ttok, tokens, mask)
    assert len(runs) == 2
    assert loss_runs(ttok, tokens0, mask0) == [runs[1] if which == "call" else runs[0]]
    assert sum(mask) - sum(mask0) == len(ttok.encode(runs[0] if which == "call" else runs[1]))


def test_sharegpt_and_openai_messages_give_the_same_tokens_and_mask(tmp_path, tok, ttok):
    chats = [tool_chat(f"FH-{n}") for n in (7, 1234)]
    chats[1]["messages"][4]["weight"] = 0
    chats[1]["messages"].append({"role": "user", "content": "And the other one, FH-99?"})
    chats[1]["messages"].append({"role": "assistant", "content": None,
                                 "tool_calls": [call("FH-99", "call_2"), call("FH-98", "call_3")]})
    chats[1]["messages"].append({"role": "tool", "tool_call_id": "call_2", "content": "lost"})
    chats[1]["messages"].append({"role": "tool", "tool_call_id": "call_3", "content": "found"})
    chats[1]["messages"].append({"role": "assistant", "content": "One is lost, sorry; the other is found."})
    openai, _ = load_samples(write(tmp_path, chats, "openai.jsonl"), ttok, DataConfig(), 1024)
    sharegpt, report = load_samples(write(tmp_path, [as_sharegpt(c) for c in chats], "sharegpt.jsonl"),
                                    ttok, DataConfig(), 1024)
    assert [(s.tokens, s.mask) for s in sharegpt] == [(s.tokens, s.mask) for s in openai]
    assert (report.format, report.tool_calls, report.tool_results, report.weighted_out) == ("ShareGPT", 4, 4, 1)
    plain = {"messages": CHAT3}
    a, _ = load_samples(write(tmp_path, [plain], "a.jsonl"), tok, DataConfig(), 1024)
    b, _ = load_samples(write(tmp_path, [{**as_sharegpt(plain)}], "b.jsonl"), tok, DataConfig(), 1024)
    assert (a[0].tokens, a[0].mask) == (b[0].tokens, b[0].mask)


# --- bad input ------------------------------------------------------------------------------------
def bad_call(**fn):
    chat = tool_chat()
    chat["messages"][2]["tool_calls"] = [{"id": "call_1", "type": "function", "function": fn}]
    return chat


def with_message(k, **changes):
    chat = tool_chat()
    chat["messages"][k] = {**chat["messages"][k], **changes}
    return chat


def sharegpt_with(turn):
    chat = as_sharegpt(tool_chat())
    chat["conversations"][1] = turn
    return chat


BAD = [
    ("call without a name", bad_call(arguments="{}"), "message 3 (assistant): tool call 1 has no function name"),
    ("arguments an object", bad_call(name="lookup_order", arguments={"order_id": "FH-1"}),
     "message 3 (assistant): tool call 1: 'function.arguments' is an object, expected a JSON string"),
    ("arguments not JSON", bad_call(name="lookup_order", arguments="{order_id: FH-1}"),
     "message 3 (assistant): tool call 1: 'arguments' is not valid JSON"),
    ("result without its call", with_message(3, tool_call_id="call_9"),
     "message 4 (tool): 'tool_call_id' 'call_9' matches no earlier unanswered tool call"),
    ("result with no call at all", {"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "tool", "content": "sunny"},
                                                 {"role": "assistant", "content": "It is sunny."}]},
     "message 2 (tool): no tool call to answer"),
    ("weight 2", with_message(4, weight=2), "message 5 (assistant): 'weight' must be 0 or 1, not 2"),
    ("unknown ShareGPT role", sharegpt_with({"from": "bot", "value": "hi"}),
     "message 2: unknown 'from' value 'bot' (known: human, user, gpt, assistant, model, system, "
     "function_call, observation, tool)"),
    ("ShareGPT call not JSON", sharegpt_with({"from": "function_call", "value": "lookup_order(FH-1)"}),
     "message 2 (function_call): 'value' is not the JSON of a call"),
    ("tools not a list", {**tool_chat(), "tools": {"name": "lookup_order"}}, "'tools' is an object, expected a list"),
]


@pytest.mark.parametrize("line, expected", [(b, e) for _, b, e in BAD], ids=[n for n, _, _ in BAD])
def test_malformed_tool_data_is_a_line_numbered_error(tmp_path, ttok, line, expected):
    good = tool_chat() if "messages" in line else as_sharegpt(tool_chat())
    path = write(tmp_path, [good, line, good])
    with pytest.raises(DataError) as err:
        load_samples(path, ttok, DataConfig(), 1024)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 1 of 3 lines have problems; fix them or pass --skip-bad-lines"
    assert lines[1].startswith(f"{path}:2: ") and expected in lines[1], lines[1]


def test_a_template_without_tools_refuses_the_file_in_one_line(tmp_path, tok):
    path = write(tmp_path, [tool_chat(), {"messages": CHAT3}, tool_chat("FH-2")])
    report = check_file(path, tok, DataConfig(), 1024)
    assert [p.line for p in report.problems] == [0]
    assert report.summary() == (
        f"{path}: 2 of 3 lines use tools, but the model's chat template does not render tool calls "
        "(it has no tool support); train them on a model whose template renders tools (e.g. Qwen 2.5, "
        "Qwen 3, Llama 3.1 and later) or leave those lines out")
    with pytest.raises(DataError) as err:
        load_samples(path, tok, DataConfig(skip_bad_lines=True), 1024)
    assert str(err.value) == report.summary()


@pytest.mark.real
def test_real_smollm2_refuses_tool_calls_in_one_line(smollm2_path):
    _, md = mx.load(str(smollm2_path), return_metadata=True)
    real = Tokenizer.from_gguf_metadata(md)
    path = EXAMPLES / "support_tools.jsonl"
    with pytest.raises(DataError) as err:
        load_samples(path, real, DataConfig(), 1024)
    assert str(err.value).count("\n") == 0
    assert str(err.value).startswith(f"{path}: 12 of 12 lines use tools, but the model's chat template "
                                     "does not render tool calls")


# --- data folders and the examples ------------------------------------------------------------------
def test_a_data_folder_is_train_valid_and_test(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError, match="no train.jsonl in this folder"):
        training_files(str(folder), None)
    for name in ("test.jsonl", "valid.jsonl", "train.jsonl"):
        (folder / name).write_text("")
    assert folder_files(folder) == [folder / "train.jsonl", folder / "valid.jsonl", folder / "test.jsonl"]
    assert training_files(str(folder), None) == (str(folder / "train.jsonl"), str(folder / "valid.jsonl"))
    assert training_files(str(folder), "other.jsonl") == (str(folder / "train.jsonl"), "other.jsonl")
    (folder / "valid.jsonl").unlink()
    assert training_files(str(folder), None) == (str(folder / "train.jsonl"), None)
    assert training_files("chats.jsonl", None) == ("chats.jsonl", None)


@pytest.mark.parametrize("name, fmt", [("brand_voice.jsonl", "chat"), ("support_tools.jsonl", "chat"),
                                       ("sharegpt.jsonl", "ShareGPT"), ("prompt_completion.jsonl", "prompt/completion"),
                                       ("text.jsonl", "text"), ("folder/train.jsonl", "chat"),
                                       ("folder/valid.jsonl", "chat")])
def test_every_example_is_clean_in_its_format(ttok, name, fmt):
    # (the tiny vocabulary has few merges: the tool definitions alone take ~700 of its tokens)
    _, report = load_samples(EXAMPLES / name, ttok, DataConfig(), 4096)
    assert report.format == fmt and not report.problems and not report.truncated and report.samples == report.lines
    if name == "support_tools.jsonl":
        assert report.tool_calls == report.tool_results >= 12 and report.weighted_out == 1
    assert name.split("/")[0] in (EXAMPLES / "README.md").read_text()


# --- a tiny model that renders tools: checked, then tuned ---------------------------------------------
@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-tools.gguf"
    cfg = tiny_config("llama")
    write_gguf(path, gguf_config(cfg), gguf_tensors(gguf_config(cfg), tiny_weights(cfg)),
               extra_metadata={Keys.Tokenizer.CHAT_TEMPLATE: TOOLS_TEMPLATE})
    return path


def test_data_check_reports_format_and_tool_counts_per_file_of_a_folder(tmp_path, tools_model, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder, [tool_chat(), tool_chat("FH-2", answer_weight=0)], "train.jsonl")
    write(folder, [as_sharegpt(tool_chat("FH-3"))], "test.jsonl")
    r = CliRunner().invoke(main, ["data", "check", str(folder), "--model", str(tools_model)])
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    assert out[0].startswith(f"{folder / 'train.jsonl'}: 2 chat samples from 2 lines")
    assert "  format chat (OpenAI chat messages)" in out
    assert ("  messages: system 2, user 2, assistant 4; tool calls 2, tool results 2; "
            "assistant turns weighted out (weight 0) 1") in out
    assert any(line.startswith(f"{folder / 'test.jsonl'}: 1 ShareGPT sample from 1 line") for line in out)
    assert "  format ShareGPT (conversations of from/value turns)" in out


def test_a_short_tune_lowers_the_loss_on_held_out_tool_calls(tmp_path, tools_model, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    ids = [f"FH-{1000 + 37 * i}" for i in range(30)]
    write(folder, [tool_chat(i) for i in ids[:24]], "train.jsonl")
    # held out: only the tool call carries loss
    write(folder, [tool_chat(i, answer_weight=0) for i in ids[24:]], "valid.jsonl")
    r = CliRunner().invoke(main, ["tune", "--data", str(folder), "--model", str(tools_model), "--steps", "30",
                                  "--batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps", "3",
                                  "--eval-every", "15", "--save-every", "0", "--max-seq-len", "512",
                                  "--no-export", "--name", "tools", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "24 train / 6 valid samples" in r.output
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "tools" / "metrics.jsonl").read_text().splitlines()]
    valid = [m["val_loss"] for m in metrics if m["kind"] == "valid"]
    assert len(valid) == 3 and valid[2] < valid[1] < 0.7 * valid[0], valid
