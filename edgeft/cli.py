"""The `edgeft` command: a thin layer over edgeft.tune, edgeft.runs and friends.

One function per command, each turning flags into a call and the result into lines. It is
past ~400 lines because every command's docstring is its --help, worked examples included;
the tune flags themselves are made from the config dataclasses in edgeft/flags.py.
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import click

from edgeft import config as cfgmod
from edgeft.config import ConfigError, RunConfig
from edgeft.errors import UserError
from edgeft.flags import (
    EVAL_DEFAULT,
    EXPORT_DEFAULT,
    build_config,
    config_options,
    resume_config,
)


def resume_command(run_dir: Path) -> str:
    """The exact command that continues the run in `run_dir`."""
    run_dir = Path(run_dir)
    return shlex.join(["edgeft", "tune", "--resume", "--name", run_dir.name, "--runs-dir", str(run_dir.parent)])


def _fail(e: Exception):
    text = str(e) or e.__class__.__name__
    multiline = isinstance(e, UserError) and e.multiline
    raise click.ClickException(text if multiline else text.splitlines()[0])


# The errors that are the user's to fix: shown as one line (or a report), never a traceback.
USER_ERRORS = (UserError, FileNotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgeft")
def main():
    """edgeft: fine-tune a small language model on your own conversations, on a laptop,
    and ship it as a GGUF file for llama.cpp, Ollama or LM Studio.

    \b
    Start here:
      edgeft tune --data examples/brand_voice.jsonl
      edgeft chat runs/<name> --prompt "Do you ship to Canada?"
    """


@main.command()
@click.option("--data", "data", type=click.Path(),
              help="training JSONL, or a folder of train.jsonl [valid.jsonl test.jsonl] as mlx-lm's [data.train]")
@click.option("--recipe", default=None, help=f"recipe name or YAML file (default: {cfgmod.DEFAULT_RECIPE})")
@click.option("--name", default=None, help="run name: the run goes to RUNS_DIR/NAME (default: model + time)")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False), help="where runs go")
@click.option("--resume", is_flag=True, help="continue the run --name from its last checkpoint")
@click.option("--export/--no-export", "export", default=None,
              help=f"write the GGUF at the end [export.enabled]  [default: {EXPORT_DEFAULT}]")
@click.option("--eval/--no-eval", "evaluate", default=None,
              help="answer held-out prompts with base and tuned model, write report.html "
                   f"[eval.enabled]  [default: {EVAL_DEFAULT}]")
@config_options
def tune(data, recipe, name, runs_dir, resume, export, evaluate, **flags):
    """Fine-tune a model (LoRA) on a JSONL file of conversations, or a folder of them.

    Each line is {"messages": [{"role": "user", "content": ...}, {"role": "assistant",
    "content": ...}]} (tool calls and "weight" allowed), or ShareGPT's {"conversations": [...]},
    or {"prompt": ..., "completion": ...}, or {"text": ...}; a folder holds train.jsonl (and
    valid.jsonl). Loss is taken on every assistant turn. Without --model, the built-in
    SmolLM2-135M-Instruct is used.

    \b
    Example:
      edgeft tune --data examples/brand_voice.jsonl
      edgeft tune --data chats.jsonl --model ./qwen2.5-0.5b-instruct-q8_0.gguf --steps 300
      edgeft tune --resume --name my-run          # after an interruption
      edgeft tune --resume --name my-run --steps 120   # go on for longer

    The defaults shown are edgeft's own, which the default recipe keeps; a --recipe replaces
    them and flags replace both. A resumed run keeps its settings but for --steps,
    --eval-every, --save-every, --export/--no-export and --eval/--no-eval.
    """
    from edgeft import runs, trainer
    from edgeft.tune import tune as tune_run

    try:
        if name:
            runs.check_run_name(name)  # before the name is used as a path, even to read
        if resume:
            if not name:
                raise ConfigError("--resume needs --name (the run to continue)")
            cfg = resume_config(runs.read_run_config(Path(runs_dir) / name), recipe, data, flags)
        else:
            cfg = build_config(recipe, data, flags)
        if export is not None:
            cfg.export.enabled = export
        if evaluate is not None:
            cfg.eval.enabled = evaluate
        result = tune_run(cfg, Path(runs_dir), name=name, resume=resume, log=click.echo)
    except USER_ERRORS as e:
        _fail(e)
    except trainer.Interrupted as e:
        run_dir = e.run_dir or Path(runs_dir) / (name or "")
        saved = f"checkpoint {e.checkpoint} saved" if e.checkpoint else "no checkpoint saved"
        click.echo(f"\n{e.signame}: stopped after step {e.step}; {saved}.", err=True)
        click.echo(f"resume with: {resume_command(run_dir)}", err=True)
        sys.exit(128 + getattr(signal, e.signame, signal.SIGINT))
    except OSError as e:  # e.g. the disk filled while writing the config, report or adapters
        where = f"{e.filename}: " if e.filename else ""
        again = (f"; then {resume_command(Path(runs_dir) / name)}"
                 if name and runs.is_run(Path(runs_dir) / name) else "")
        raise click.ClickException(f"{where}{e.strerror or e}; free some disk space{again}") from None
    except KeyboardInterrupt:
        click.echo("\nstopped at once.", err=True)
        if name and runs.is_run(Path(runs_dir) / name):
            click.echo(f"resume from its last checkpoint with: {resume_command(Path(runs_dir) / name)}", err=True)
        sys.exit(130)
    st = result.state
    click.echo("")
    click.echo(f"done: {st.step} steps, {st.tokens} tokens in {st.elapsed_s:.0f} s ({st.tokens / max(st.elapsed_s, 1e-9):.0f} tok/s)")
    if result.first_val is not None and st.history:
        line = f"validation loss: {result.first_val:.4f} -> {st.history[-1][1]:.4f}"
        if st.kept_step not in (None, st.step):
            line += f" (its adapters: step {st.kept_step}'s, {dict(st.history)[st.kept_step]:.4f})"
        click.echo(line)
    click.echo(f"run folder: {result.run_dir}")
    click.echo(f"adapters:   {result.adapters}")
    click.echo(f'try it:     edgeft chat {result.run_dir} --prompt "Hello!"')
    if result.export:
        ex = result.export
        click.echo(f"GGUF:       {ex.gguf}")
        click.echo(f"llama.cpp:  llama-cli -m {ex.gguf} -cnv")
        click.echo(f"Ollama:     ollama create {result.run_dir.name} -f {ex.modelfile} && ollama run {result.run_dir.name}")
    if result.report_html:
        click.echo(f"report:     {result.report_html}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "-p", default=None, help="one prompt; without it, an interactive chat")
@click.option("--system", default=None, help="system message (default: the run's system prompt)")
@click.option("--max-tokens", type=click.INT, default=None,
              help=f"new tokens per reply [generate.max_tokens]  [default: the run's, else {RunConfig().generate.max_tokens}]")
@click.option("--repeat-penalty", type=click.FLOAT, default=None,
              help=f"1 is off [generate.repeat_penalty]  [default: the run's, else {RunConfig().generate.repeat_penalty}]")
@click.option("--temperature", type=click.FLOAT, default=None,
              help=f"0 is greedy [generate.temperature]  [default: the run's, else {RunConfig().generate.temperature}]")
@click.option("--base", is_flag=True, help="answer with the base model, without the adapters")
def chat(run_dir, prompt, system, max_tokens, repeat_penalty, temperature, base):
    """Talk to a tuned model (its base plus the run's adapters).

    \b
    Example:
      edgeft chat runs/brand-voice --prompt "Do you ship to Canada?"
      edgeft chat runs/brand-voice            # interactive; empty line or Ctrl-D quits
    """
    from edgeft import generate, runs

    try:
        given = {"max_tokens": max_tokens, "temperature": temperature, "repeat_penalty": repeat_penalty}
        cfg = cfgmod.apply_overrides(runs.read_run_config(Path(run_dir)),
                                     {"generate": {k: v for k, v in given.items() if v is not None}}, "command line")
        if base:
            loaded = runs.load_base(cfg, inference=True)
        else:
            loaded, _ = runs.load_tuned(Path(run_dir), inference=True)
    except USER_ERRORS as e:
        _fail(e)
    system = system if system is not None else cfg.data.system_prompt
    history = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        try:  # the model's chat template runs here: a refusal is one line, not a traceback
            g = cfg.generate
            answer = generate.chat(loaded.model, loaded.tokenizer, history, max_tokens=g.max_tokens,
                                   temperature=g.temperature, repeat_penalty=g.repeat_penalty,
                                   repeat_last_n=g.repeat_last_n)
        except USER_ERRORS as e:
            _fail(e)
        history.append({"role": "assistant", "content": answer})
        return answer

    if prompt is not None:
        click.echo(reply(prompt))
        return
    while True:
        try:
            text = click.prompt("you", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not text.strip():
            break
        click.echo(f"model: {reply(text)}")


@main.command("plan")
@click.option("--data", "data", type=click.Path(),
              help="training JSONL or data folder: size batches from its longest samples")
@click.option("--recipe", default=None, help=f"recipe name or YAML file (default: {cfgmod.DEFAULT_RECIPE})")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="where the run would go: its free disk is checked")
@click.option("--export/--no-export", "export", default=None,
              help=f"count the GGUF export's disk [export.enabled]  [default: {EXPORT_DEFAULT}]")
@config_options
def plan_cmd(data, recipe, runs_dir, export, **flags):
    """Estimate a run's peak memory and disk without training (or loading the weights).

    Takes the same options as `edgeft tune`. Exits with status 1 when tune would refuse to
    start (set train.auto_fit / --auto-fit to let tune lower the batch instead).

    \b
    Example:
      edgeft plan --data chats.jsonl
      edgeft plan --model ./qwen2.5-0.5b-instruct-q8_0.gguf --batch-size 8 --max-seq-len 1024
    """
    from edgeft import plan

    try:
        cfg = build_config(recipe, data, flags)
        if export is not None:
            cfg.export.enabled = export
        lines, ok = plan.plan_run(cfg, Path(runs_dir))
    except USER_ERRORS as e:
        _fail(e)
    click.echo("\n".join(lines))
    if not ok:
        sys.exit(1)


@main.command()
def models():
    """List the built-in models and whether each is in the cache.

    \b
    Example:
      edgeft models
      edgeft tune --data chats.jsonl --model qwen2.5-0.5b-instruct
    """
    from edgeft import hub

    rows = hub.list_models()
    click.echo(f"cache: {hub.cache_dir()}")
    for row in rows:
        mark = "*" if row.name == cfgmod.DEFAULT_MODEL else " "
        where = str(row.cached) if row.cached else "not cached"
        click.echo(f"{mark} {row.name:28} {row.description}\n    {where}")
    click.echo("* default")


@main.group()
def data():
    """Inspect training data."""


@data.command("check")
@click.argument("file", type=click.Path())
@click.option("--model", default=None, help="tokenize with this model's tokenizer (default: the recipe's)")
@click.option("--chat-template", default=None,
              help="render chats with this template: a built-in name or FILE.jinja [data.chat_template]  "
                   "[default: the recipe's, else the model's own]")
@click.option("--recipe", default=None, help="recipe whose max_seq_len, data and train settings apply")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="past runs whose measured speed estimates the training time")
def data_check(file, model, chat_template, recipe, runs_dir):
    """Validate a training file, or a data folder (train.jsonl, and optionally valid.jsonl and
    test.jsonl, as mlx-lm's): per file the format detected, problems by line, counts of
    messages, tool calls, tool results and weighted-out turns, a token-length histogram
    (against max_seq_len and the model's context), exact and near duplicates; and how long the
    recipe's training would take (at the speed measured by your recent runs of the model, or a
    default).

    Exits with status 1 when a line has a problem or a file gives no usable sample.

    \b
    Example:
      edgeft data check chats.jsonl
      edgeft data check chats.jsonl --model qwen2.5-0.5b-instruct --recipe brand-voice
      edgeft data check data/            # train.jsonl, valid.jsonl, test.jsonl
    """
    from edgeft import data_files, data_stats, hub, plan, runs, timing

    try:
        cfg = cfgmod.load_recipe(recipe)
        if model:
            cfg.model.name = model
        if chat_template:
            cfg.data.chat_template = chat_template
        if not Path(file).exists():
            raise ConfigError(f"{file}: no such file or folder")
        files = data_files.folder_files(file) if Path(file).is_dir() else [file]
        say = lambda m: click.echo(m, err=True)  # noqa: E731
        loaded = runs.load_model(hub.resolve(cfg.model.name, log=say), chat_template=cfg.data.chat_template,
                                 log=say, tokenizer_only=True)
        reports = [data_files.check_file(f, loaded.tokenizer, cfg.data, cfg.model.max_seq_len) for f in files]
    except USER_ERRORS as e:
        _fail(e)
    context = loaded.config.get("max_position_embeddings")
    for report in reports:
        click.echo(report.summary())
        for line in data_stats.length_histogram(report.lengths, cfg.model.max_seq_len, context):
            click.echo(line)
        for line in data_stats.duplicate_lines(report):
            click.echo(line)
    speed = timing.measured_speed(runs_dir, cfg.model.name)
    if speed is None:
        import mlx.core as mx

        speed = timing.default_speed(plan.base_parameters(loaded.config), "cpu" if mx.default_device() == mx.cpu else "gpu")
    click.echo(timing.training_time_line(reports[0], cfg.train, *speed))
    if any(r.problems or not r.samples for r in reports):
        sys.exit(1)


@main.command()
def doctor():
    """Show what edgeft runs on: device, BLAS, versions, and a quick matmul speed.

    \b
    Example:
      edgeft doctor
    """
    import platform
    import time

    import mlx.core as mx

    from edgeft import _blas, backend

    name, path = _blas.ensure()
    click.echo(f"python   {platform.python_version()} on {platform.system()} {platform.machine()}")
    click.echo(f"mlx      {mx.__version__}, device {mx.default_device()}")
    click.echo(f"BLAS     {name}{f' ({path})' if path else ''}")
    click.echo(f"split    {_blas.SPLIT}")
    a = mx.random.normal((1024, 1024))
    with _blas.split(0):  # MKL's own speed (the bench's ceiling), as before the split existed
        mx.eval(a @ a)
        tic = time.perf_counter()
        for _ in range(5):
            mx.eval(a @ a)
        dt = (time.perf_counter() - tic) / 5
    click.echo(f"matmul   fp32 1024^3: {2 * 1024**3 / dt / 1e9:.0f} GFLOP/s")
    speed = _blas.bf16_speedup()
    click.echo("bf16     " + (f"{speed:.2f}x fp32's speed at one thread (train.matmul auto takes it from "
                              f"{backend.BF16_MIN_SPEEDUP}x)" if speed else "no bfloat16 path (needs MKL and edgeft._sgemm)"))
    for mod in ("mlx_lm", "gguf", "llama_cpp"):
        try:
            m = __import__(mod)
            click.echo(f"{mod:8} {getattr(m, '__version__', 'installed')}")
        except ImportError:
            click.echo(f"{mod:8} not installed" + ("  (pip install 'edgeft[llama]' for export checks)" if mod == "llama_cpp" else ""))


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--quant", default=None,
              help="f16, bf16, q8_0, q4_0, q4_1 (written by gguf-py) or q4_k_m, q5_k_m, q6_k (llama.cpp)"
                   "  [default: the run's export.quant]")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="output .gguf (default: RUN_DIR/export/<run>-<quant>.gguf, or <run>-lora.gguf)")
@click.option("--adapter", is_flag=True, help="write a llama.cpp LoRA adapter GGUF instead of a merged model")
@click.option("--no-verify", is_flag=True, help="skip the llama.cpp parity check")
def export_cmd(run_dir, quant, out, adapter, no_verify):
    """Write a run as a GGUF for llama.cpp, Ollama and LM Studio, plus an Ollama Modelfile.

    The merged model (base + LoRA) is checked in llama.cpp against the MLX model before it
    is kept: top-1 next-token agreement must reach 99% (f16/bf16) or 95% (q8_0).

    \b
    Example:
      edgeft export runs/brand                      # runs/brand/export/brand-q8_0.gguf
      edgeft export runs/brand --quant q4_k_m
      edgeft export runs/brand --adapter            # llama-cli -m BASE.gguf --lora brand-lora.gguf
      ollama create brand -f runs/brand/export/brand-q8_0.Modelfile && ollama run brand
    """
    from edgeft.export import export_run

    try:
        result = export_run(Path(run_dir), quant=quant, out=out, adapter=adapter,
                            verify=not no_verify, log=click.echo)
    except USER_ERRORS as e:
        _fail(e)
    click.echo("")
    click.echo(result.summary())
    click.echo(f"{'run it':11}llama-cli -m {result.base or result.gguf}"
               + (f" --lora {result.gguf}" if result.adapter else "") + " -cnv")
    click.echo(f"{'Ollama':11}ollama create {Path(run_dir).resolve().name} -f {result.modelfile}")


@main.command("verify")
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="the run the file came from (default: found from RUN/export/FILE)")
@click.option("--base", type=click.Path(exists=True, dir_okay=False), default=None,
              help="for an adapter: the base GGUF it applies to (default: the run's base)")
def verify_cmd(gguf, run_dir, base):
    """Run a GGUF made by `edgeft export` in llama.cpp and compare it with the MLX model.

    Prints top-1 next-token agreement and the largest logit difference over fixed chats;
    exits with status 1 when a f16/bf16 (99%) or q8_0 (95%) file falls below its bar.

    \b
    Example:
      edgeft verify runs/brand/export/brand-q8_0.gguf
      edgeft verify runs/brand/export/brand-lora.gguf --base ./SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from edgeft.verify import verify_file

    try:
        parity = verify_file(Path(gguf), run_dir=run_dir, base=base, log=click.echo)
    except USER_ERRORS as e:
        _fail(e)
    click.echo(parity.table())
    if parity.fatal and not parity.passed:
        raise click.ClickException(f"{Path(gguf).name} does not answer like the MLX model")


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of prompts or chats (default: the run's validation split) [eval.prompts]")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="the GGUF to evaluate (default: the run's newest export; none: MLX)")
@click.option("--max-tokens", type=int, default=None, help="new tokens per answer [generate.max_tokens]")
@click.option("--repeat-penalty", type=float, default=None,
              help="try another repeat penalty than the run's [generate.repeat_penalty]")
@click.option("--repeat-last-n", type=int, default=None,
              help="try another penalty window than the run's [generate.repeat_last_n]")
def eval_cmd(run_dir, prompts, gguf, max_tokens, repeat_penalty, repeat_last_n):
    """Answer held-out prompts with the base and the tuned model, score both, write the report.

    Scores: the openings and sign-offs mined from the training answers and the share of
    answers using each, loops, length, the token limit, ROUGE-L, validation loss, and the
    general-knowledge questions the tuning lost.

    \b
    Example:
      edgeft eval runs/brand
      edgeft eval runs/brand --prompts questions.jsonl --max-tokens 120
    """
    from edgeft import evaluate, report

    try:
        overrides = {k: v for k, v in (("repeat_penalty", repeat_penalty), ("repeat_last_n", repeat_last_n))
                     if v is not None}
        evaluate.evaluate_run(Path(run_dir), prompts=prompts, gguf=gguf, max_tokens=max_tokens,
                              generate_overrides=overrides, log=click.echo)
        report.build(Path(run_dir), log=click.echo)
    except USER_ERRORS as e:
        _fail(e)


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="for two runs: the comparison's HTML file (default: RUN_A/compare-RUN_B.html)")
def report_cmd(run_dirs, out):
    """Rebuild a run's report.html and report.md, or compare two runs.

    \b
    Example:
      edgeft report runs/brand
      edgeft report runs/brand runs/brand-rank16
    """
    from edgeft import report

    if len(run_dirs) > 2:
        raise click.UsageError("give one run (its report) or two (a comparison)")
    try:
        if len(run_dirs) == 1:
            report.build(Path(run_dirs[0]), log=click.echo)
        else:
            report.compare(Path(run_dirs[0]), Path(run_dirs[1]), out=out, log=click.echo)
    except USER_ERRORS as e:
        _fail(e)


if __name__ == "__main__":
    main()
