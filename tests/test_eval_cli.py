"""`edgeft eval` and the evaluation at the end of `edgeft tune`, on a tiny model (MLX path)."""

import json

from click.testing import CliRunner
from test_cli import tiny_gguf, write_chats  # noqa: F401  (fixtures)

from edgeft import runs
from edgeft.cli import main


def _tune(home, *extra):
    data = write_chats(home / "chats.jsonl")
    return CliRunner().invoke(main, ["tune", "--data", str(data), "--model", str(home / "tiny.gguf"), "--steps", "2",
                                     "--batch-size", "2", "--eval-every", "2", "--no-export", "--name", "t",
                                     "--runs-dir", str(home / "runs"), *extra])


def test_tune_evaluates_at_the_end_and_says_what_it_cost(home, tiny_gguf):
    tiny_gguf.rename(home / "tiny.gguf")
    r = _tune(home)
    assert r.exit_code == 0, r.output
    run = home / "runs" / "t"
    assert "eval: 1 held-out prompts" in r.output and "of this run" in r.output
    assert f"report:     {run / runs.REPORT_HTML}" in r.output
    ev = json.loads((run / runs.EVAL).read_text())
    assert ev["engine"].startswith("MLX") and ev["prompts_from"] == "the validation split"
    (item,) = ev["prompts"]
    line = int(item["source"].split(":")[1])
    chat = json.loads((home / "chats.jsonl").read_text().splitlines()[line - 1])
    assert item["reference"] == chat["messages"][-1]["content"]  # the held-out line's own answer
    assert {"text", "tokens", "hit_limit"} <= set(item["tuned"])
    assert len(ev["knowledge"]) == 12
    # the 11 training answers all end with "the tea is good": mined, not told
    assert any(p["where"] == "sign-off" and "the tea is good" in p["text"] for p in ev["phrases"])


def test_eval_command_with_a_prompts_file_and_no_eval_flag(home, tiny_gguf):
    tiny_gguf.rename(home / "tiny.gguf")
    r = _tune(home, "--no-eval")
    assert r.exit_code == 0, r.output
    run = home / "runs" / "t"
    assert not (run / runs.EVAL).exists() and "report:" not in r.output
    prompts = home / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = CliRunner().invoke(main, ["eval", str(run), "--prompts", str(prompts), "--max-tokens", "5"])
    assert r.exit_code == 0, r.output
    ev = json.loads((run / runs.EVAL).read_text())
    assert [p["source"] for p in ev["prompts"]] == ["p.jsonl:1", "p.jsonl:2"]
    assert all(p["tuned"]["tokens"] <= 5 for p in ev["prompts"])
    assert (run / runs.REPORT_HTML).exists() and (run / runs.REPORT_MD).exists()

    prompts.write_text('{"prompt": "hello"}\n{"oops": 1}\n')
    r = CliRunner().invoke(main, ["eval", str(run), "--prompts", str(prompts)])
    assert r.exit_code == 1 and "p.jsonl:2: no 'messages', 'prompt'/'completion'" in r.output
    assert len(r.output.strip().splitlines()) == 1
