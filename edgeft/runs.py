"""The run folder: its layout, its name, its config, and the models it holds.

Everything a run produces lives in one folder::

    runs/<name>/
      config.json        the resolved configuration (defaults < recipe < flags)
      data_report.txt    what the data check found
      memory_plan.json   the preflight's estimate
      metrics.jsonl      one JSON object per training step and per validation
      checkpoints/       step_NNNNNN/ folders for --resume
      adapters/          adapters.safetensors + adapter_config.json (mlx-lm layout)
      export/            the shippable GGUF (and Ollama Modelfile)
      eval.json          base and tuned answers to held-out prompts (edgeft eval)
      report.html        loss curves, scores, samples side by side (and report.md)
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from typing import Callable

from jinja2.exceptions import SecurityError

from edgeft import backend, hub, lora
from edgeft.chat_template import (
    TemplateError,
    builtin_names,
    default_builtin,
    read_template,
    written_end_of_turn,
)
from edgeft.config import ConfigError, RunConfig
from edgeft.families import family
from edgeft.loader import Loaded, ModelLoadError, load

CONFIG = "config.json"
DATA_REPORT = "data_report.txt"
MEMORY_PLAN = "memory_plan.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters"
BEST_ADAPTERS = "best_adapters.safetensors"  # the adapters of the lowest validation loss so far
EXPORT = "export"
EVAL = "eval.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_name(name: str) -> str:
    """Run names become folder names: no separators, no '..', nothing hidden."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting with '.')"
        )
    return name


def default_run_name(cfg: RunConfig) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.model.name).stem)[:40].strip("-.") or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a started run (its config is written once training starts)."""
    return (Path(folder) / CONFIG).is_file()


def find_run(path: Path) -> Path | None:
    """The run folder of a file exported to its default place, runs/<name>/export/FILE."""
    folder = Path(path).resolve().parent.parent
    if is_run(folder) and (folder / ADAPTERS).is_dir():
        return folder
    return None


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg})") from None
    return RunConfig.from_dict(raw, where=str(path))


_PROBE_CHATS = (
    ([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}], False),
    ([{"role": "user", "content": "Hello!"}], True),
)


def check_chat_template(loaded: Loaded) -> None:
    """Render a plain chat with the chat template (in the sandbox) and refuse, in one line
    naming the model (or the template given for it), a template that cannot render it, so that
    its failure is not taken for a problem of every line of the data."""
    tok = loaded.tokenizer
    if tok.chat_template is None:
        raise TemplateError(
            f"{loaded.path} has no chat template, and its vocabulary lacks the tokens of every "
            f"built-in one ({builtin_names()}): give one with --chat-template NAME or FILE.jinja")
    for messages, generation_prompt in _PROBE_CHATS:
        try:
            tok.render(messages, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            if isinstance(e.__cause__, SecurityError):
                what = f"the sandbox blocked it ({e.__cause__}), so none of it ran"
            else:
                what = f"it cannot render a plain chat ({str(e).splitlines()[0][:200]})"
            if tok.chat_template_name is not None:
                raise TemplateError(f"chat template {tok.chat_template_name}: {what}; fix it or give "
                                    f"another with --chat-template") from None
            raise TemplateError(
                f"chat template of {loaded.path}: {what}; use a model whose chat template is "
                "standard (e.g. the publisher's own GGUF or Hugging Face folder)"
            ) from None


def choose_chat_template(loaded: Loaded, spec: str | None, log: Callable[[str], None] | None = None) -> None:
    """Give the model's tokenizer its chat template: `spec` (a built-in name or a .jinja file,
    the run's data.chat_template) when set, else the model's own, else the built-in that fits
    its family and vocabulary (said to `log` in one line). With none of these the tokenizer
    keeps no template: plain text trains without one, chats are refused (check_chat_template)."""
    tok = loaded.tokenizer
    if spec is not None:
        text, end_of_turn = read_template(spec)
        if end_of_turn is None:
            try:
                end_of_turn = written_end_of_turn(text, tok.is_token, **tok.template_context())
            except TemplateError:
                pass  # check_chat_template names the file; data lines would each fail on it
        elif not tok.is_token(end_of_turn):
            raise TemplateError(
                f"chat template {spec}: it ends assistant turns with {end_of_turn}, which is not a token "
                f"of {loaded.path}, so the model could not learn to stop; choose another of "
                f"{builtin_names()} or a FILE.jinja")
        tok.use_chat_template(text, spec, end_of_turn)
    elif tok.chat_template is None:
        builtin = default_builtin(family(loaded.config["model_type"]).arch, tok.is_token)
        if builtin is not None:
            tok.use_chat_template(builtin.text, builtin.name, builtin.end_of_turn)
            if log:
                log(f"the model has no chat template; using the built-in {builtin.name} template "
                    "(--chat-template to choose)")


def load_model(path, check_template: bool = True, chat_template: str | None = None,
               log: Callable[[str], None] | None = None, **kw) -> Loaded:
    """loader.load, where any failure to parse the file is a ModelLoadError: a model file is
    untrusted input, so even a parser gap ends in one line that names the file, not a traceback.
    The tokenizer gets its chat template (choose_chat_template: `chat_template`, else the
    model's own, else a built-in, said to `log`). With check_template, a chat template that
    cannot render a plain chat is refused too."""
    try:
        loaded = load(path, **kw)
    except ModelLoadError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError,
            MemoryError, UnicodeError, struct.error) as e:
        why = (str(e).splitlines() or [""])[0][:160]
        raise ModelLoadError(
            f"{path}: cannot be read as a model ({type(e).__name__}: {why}); the file is damaged "
            "or its metadata is invalid: download or convert it again"
        ) from e
    choose_chat_template(loaded, chat_template, log)
    if check_template:
        check_chat_template(loaded)
    return loaded


def load_base(cfg: RunConfig, log: Callable[[str], None] | None = None, inference: bool = False,
              check_template: bool = True) -> Loaded:
    """Resolve the model spec to a local file or folder and load it for this device, for
    training or (inference=True) for generating. `log` hears about a download.
    check_template=False leaves the chat template to whoever renders it (plain-text training
    never does: see check_chat_template). The template is the run's data.chat_template, else
    the model's own, else a built-in (choose_chat_template)."""
    path = hub.resolve(cfg.model.name, log=log)
    loaded = load_model(path, check_template, cfg.data.chat_template, log, quantize_bits=cfg.model.quantize_bits)
    backend.prepare(loaded.model)
    if inference:
        backend.prepare_inference(loaded.model)
    return loaded


def load_tuned(run_dir: Path, inference: bool = False) -> tuple[Loaded, RunConfig]:
    """The base model of a run with the run's final adapters applied (merged, for generating,
    with inference=True)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if not (run_dir / ADAPTERS / lora.ADAPTER_WEIGHTS).exists():
        raise ConfigError(f"{run_dir}: no adapters yet (did the run finish? try `edgeft tune --resume`)")
    loaded = load_base(cfg)
    lora.load_adapters(loaded.model, run_dir / ADAPTERS)
    loaded.model.eval()  # a tuned model is evaluated, compared and exported: no LoRA dropout
    if inference:
        lora.merge(loaded.model)
        backend.prepare_inference(loaded.model)
    return loaded, cfg
