"""The edgeft command through click's CliRunner, on tiny models, with a temporary home."""

import json
import re

import pytest
from click.testing import CliRunner
from tiny import make_tiny

from edgeft.cli import main


@pytest.fixture()
def tiny_gguf(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path, "q8_0")
    return path


def write_chats(path, n=12):
    lines = []
    for i in range(n):
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {i} about tea"},
                    {"role": "assistant", "content": f"answer {i}: the tea is good."},
                ]
            }
        )
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


def tune(args, home):
    return CliRunner().invoke(main, ["tune", *args, "--runs-dir", str(home / "runs")])


def test_tune_writes_a_complete_run_folder(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    r = tune(["--data", str(data), "--model", str(tiny_gguf), "--steps", "4", "--batch-size", "2",
              "--eval-every", "2", "--save-every", "2", "--no-export", "--name", "t"], home)
    assert r.exit_code == 0, r.output
    run = home / "runs" / "t"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "adapters", "checkpoints", "data_report.txt"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["train"]["batch_size"] == 2 and cfg["data"]["train"] == str(data)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in train)
    assert [r["step"] for r in recs if r["kind"] == "valid"] == [0, 2, 4]
    adapter_cfg = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["fine_tune_type"] == "lora" and adapter_cfg["num_layers"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert "run folder:" in r.output and "edgeft chat" in r.output


def test_recipe_then_flags_override_defaults(home, tiny_gguf):
    recipe = home / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n  batch_size: 3\nlora:\n  rank: 2\n")
    data = write_chats(home / "chats.jsonl")
    r = tune(["--data", str(data), "--model", str(tiny_gguf), "--recipe", str(recipe), "--batch-size", "2",
              "--eval-every", "0", "--no-export", "--name", "r"], home)
    assert r.exit_code == 0, r.output
    cfg = json.loads((home / "runs" / "r" / "config.json").read_text())
    assert (cfg["train"]["steps"], cfg["train"]["batch_size"], cfg["lora"]["rank"]) == (3, 2, 2)


def test_resume_continues_a_stopped_run(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    args = ["--data", str(data), "--model", str(tiny_gguf), "--batch-size", "2", "--eval-every", "0",
            "--save-every", "2", "--no-export", "--name", "res"]
    assert tune([*args, "--steps", "2"], home).exit_code == 0
    # Pretend the run was meant to go on: raise its step budget, then resume it.
    cfg_path = home / "runs" / "res" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["train"]["steps"] = 4
    cfg_path.write_text(json.dumps(cfg))
    r = tune(["--resume", "--name", "res"], home)
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output
    recs = [json.loads(l) for l in (home / "runs" / "res" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "train.steps must be at least 1"),
        (["--lora-rank", "0"], "lora.rank must be at least 1"),
        (["--targets", "qkv"], "LoRA target 'qkv' is not a linear layer"),
        (["--name", "../evil"], "run name '../evil'"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
    ],
)
def test_user_mistakes_are_one_line_errors(home, tiny_gguf, args, message):
    data = write_chats(home / "chats.jsonl")
    r = tune(["--data", str(data), "--model", str(tiny_gguf), "--no-export", *args], home)
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0]
    assert r.output.rstrip().endswith(errors[0])


def test_missing_data_and_bad_recipe_key(home, tiny_gguf):
    r = tune(["--model", str(tiny_gguf)], home)
    assert r.exit_code != 0 and "pass --data" in r.output
    recipe = home / "r.yaml"
    recipe.write_text("train:\n  stepz: 3\n")
    r = tune(["--data", "x.jsonl", "--recipe", str(recipe)], home)
    assert r.exit_code != 0 and "unknown key 'train.stepz'" in r.output


def test_bad_data_is_reported_by_line_before_training(home, tiny_gguf):
    data = home / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text(good + "\n{not json\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    r = tune(["--data", str(data), "--model", str(tiny_gguf), "--no-export", "--name", "bad"], home)
    assert r.exit_code != 0
    assert "bad.jsonl" in r.output and "--skip-bad-lines" in r.output
    assert not (home / "runs" / "bad" / "checkpoints").exists()
    r = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(tiny_gguf)])
    assert r.exit_code == 1
    assert "bad.jsonl:2" in r.output and "bad.jsonl:3" in r.output


def test_existing_run_is_not_overwritten(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    args = ["--data", str(data), "--model", str(tiny_gguf), "--steps", "1", "--eval-every", "0", "--no-export", "--name", "once"]
    assert tune(args, home).exit_code == 0
    r = tune(args, home)
    assert r.exit_code != 0 and "already holds a run" in r.output


def test_chat_answers_with_the_tuned_adapters(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    assert tune(["--data", str(data), "--model", str(tiny_gguf), "--steps", "2", "--eval-every", "0",
                 "--no-export", "--name", "c"], home).exit_code == 0
    r = CliRunner().invoke(main, ["chat", str(home / "runs" / "c"), "--prompt", "hello", "--max-tokens", "5"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["chat", str(home / "runs" / "c")], input="hello\n\n")
    assert r.exit_code == 0 and "model:" in r.output


def test_models_and_doctor(home):
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "smollm2-135m-instruct" in r.output
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0 and "BLAS" in r.output and "GFLOP/s" in r.output and "split    " in r.output
    assert re.search(r"^bf16     \d+\.\d\dx fp32.s speed at one thread", r.output, re.M), r.output


def test_tune_help_shows_every_default(home):
    from edgeft.config import RunConfig
    from edgeft.flags import TUNE_FLAGS, shown

    r = CliRunner().invoke(main, ["tune", "--help"])
    assert r.exit_code == 0
    text = "".join(r.output.split())  # help lines wrap anywhere, even inside a long default
    defaults = RunConfig()
    for flag, section, name in TUNE_FLAGS:
        default = shown(getattr(getattr(defaults, section), name))
        assert f"[{section}.{name}][default:{default}]" in text, flag
    assert "[default:60]" in text and "[default:0.0002]" in text and "[default:export]" in text


def test_unknown_quant_is_refused_before_any_work(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    r = tune(["--data", str(data), "--model", str(tiny_gguf), "--quant", "q3_xyz", "--name", "q"], home)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.startswith("Error: command line: export.quant 'q3_xyz'")  # before the model loads
    assert not (home / "runs" / "q").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--targets", "foo_proj"], "LoRA target 'foo_proj' is not a linear layer"),
        (["--max-seq-len", "8", "--skip-bad-lines"], "no usable samples"),
        (["--data", "bad.jsonl"], "1 of 2 lines have problems"),  # the last --data wins
    ],
)
def test_a_failed_start_leaves_no_run_folder_and_the_name_stays_free(home, tiny_gguf, bad, message):
    data = write_chats(home / "chats.jsonl")
    (home / "bad.jsonl").write_text(data.read_text().splitlines()[0] + "\n{not json\n")
    args = ["--data", str(data), "--model", str(tiny_gguf), "--steps", "1", "--eval-every", "0",
            "--no-export", "--name", "again"]
    r = tune([*args, *bad], home)
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (home / "runs" / "again").exists()
    r = tune(args, home)
    assert r.exit_code == 0, r.output
    assert (home / "runs" / "again" / "adapters").is_dir()


def test_export_takes_the_runs_quant_unless_told(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    assert tune(["--data", str(data), "--model", str(tiny_gguf), "--steps", "1", "--eval-every", "0",
                 "--quant", "f16", "--no-export", "--name", "x"], home).exit_code == 0
    run = home / "runs" / "x"
    r = CliRunner().invoke(main, ["export", str(run), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert (run / "export" / "x-f16.gguf").is_file() and not (run / "export" / "x-q8_0.gguf").exists()
    r = CliRunner().invoke(main, ["export", str(run), "--no-verify", "--quant", "q8_0"])
    assert r.exit_code == 0 and (run / "export" / "x-q8_0.gguf").is_file(), r.output


def test_chat_reply_length_has_one_default(home, tiny_gguf, monkeypatch):
    import inspect

    from edgeft import generate
    from edgeft.config import RunConfig

    assert inspect.signature(generate.generate_ids).parameters["max_tokens"].default == RunConfig().generate.max_tokens
    recipe = home / "r.yaml"
    recipe.write_text("generate:\n  max_tokens: 7\n")
    data = write_chats(home / "chats.jsonl")
    for name, extra in (("plain", []), ("short", ["--recipe", str(recipe)])):
        assert tune(["--data", str(data), "--model", str(tiny_gguf), "--steps", "1", "--eval-every", "0",
                     "--no-export", "--name", name, *extra], home).exit_code == 0
    seen = []
    monkeypatch.setattr(generate, "chat", lambda model, tok, messages, **kw: seen.append(kw) or "ok")
    for name, extra in (("plain", []), ("short", []), ("short", ["--max-tokens", "3", "--temperature", "0.5"])):
        r = CliRunner().invoke(main, ["chat", str(home / "runs" / name), "--prompt", "hi", *extra])
        assert r.exit_code == 0, r.output
    penalty = {"repeat_penalty": RunConfig().generate.repeat_penalty, "repeat_last_n": RunConfig().generate.repeat_last_n}
    assert seen == [{"max_tokens": 200, "temperature": 0.0, **penalty}, {"max_tokens": 7, "temperature": 0.0, **penalty},
                    {"max_tokens": 3, "temperature": 0.5, **penalty}]
    r = CliRunner().invoke(main, ["chat", str(home / "runs" / "plain"), "--prompt", "hi", "--max-tokens", "0"])
    assert r.exit_code != 0 and "generate.max_tokens must be at least 1" in r.output


def test_resume_takes_the_safe_flags_and_refuses_the_rest(home, tiny_gguf):
    data = write_chats(home / "chats.jsonl")
    args = ["--data", str(data), "--model", str(tiny_gguf), "--batch-size", "2", "--eval-every", "0",
            "--save-every", "2", "--no-export", "--name", "res"]
    assert tune([*args, "--steps", "2"], home).exit_code == 0
    run = home / "runs" / "res"
    for bad, flag in ((["--lora-rank", "4"], "--lora-rank"), (["--learning-rate", "0.1"], "--learning-rate"),
                      (["--data", str(home / "other.jsonl")], "--data"), (["--recipe", "brand-voice"], "--recipe")):
        r = tune(["--resume", "--name", "res", *bad], home)
        assert r.exit_code != 0 and r.output.startswith(f"Error: {flag}: a resumed run keeps"), r.output
    r = tune(["--resume", "--name", "res", "--steps", "4", "--save-every", "1", "--lora-rank", "8", *args[:4]], home)
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["train"]["steps"], cfg["train"]["save_every"], cfg["lora"]["rank"]) == (4, 1, 8)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


HOSTILE = "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}"


def test_a_chat_template_the_sandbox_refuses_is_blamed_on_the_model(home, tiny_gguf):
    import tiny
    from gguf import Keys
    from tiny import gguf_config, gguf_tensors, tiny_config, tiny_weights

    cfg = gguf_config(tiny_config("llama"))
    model = home / "hostile.gguf"
    tiny.write_gguf(model, cfg, gguf_tensors(cfg, tiny_weights(tiny_config("llama"))), "q8_0",
                    extra_metadata={Keys.Tokenizer.CHAT_TEMPLATE: HOSTILE})
    data = write_chats(home / "chats.jsonl")
    r = tune(["--data", str(data), "--model", str(model), "--no-export", "--name", "h"], home)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.count("\n") == 1 and "lines have problems" not in r.output, r.output
    assert r.output.startswith(f"Error: chat template of {model}: the sandbox blocked it (")
    assert "'__init__'" in r.output and "use a model whose chat template is standard" in r.output
    assert not (home / "runs" / "h").exists() and not (home / "PWNED").exists()
    r = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(model)])
    assert r.exit_code != 0 and r.output.startswith(f"Error: chat template of {model}: the sandbox blocked it")
