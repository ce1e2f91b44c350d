"""The command line's reach into the config: which flag sets which field, the click options
made from the dataclasses (their help and defaults shown), and the config that a new run and a
resumed run get from the recipe and the flags."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import click

from edgeft import config as cfgmod
from edgeft.chat_template import BUILTINS
from edgeft.config import ConfigError, RunConfig

# CLI flag -> (section, field). Help texts and defaults come from edgeft/config.py: a flag
# left out keeps the recipe's value, which keeps the dataclass default.
TUNE_FLAGS = [
    ("--model", "model", "name"),
    ("--max-seq-len", "model", "max_seq_len"),
    ("--quantize-bits", "model", "quantize_bits"),
    ("--lora-rank", "lora", "rank"),
    ("--lora-alpha", "lora", "alpha"),
    ("--lora-dropout", "lora", "dropout"),
    ("--lora-layers", "lora", "layers"),
    ("--targets", "lora", "targets"),
    ("--valid", "data", "valid"),
    ("--valid-fraction", "data", "valid_fraction"),
    ("--system-prompt", "data", "system_prompt"),
    ("--chat-template", "data", "chat_template"),
    ("--skip-bad-lines", "data", "skip_bad_lines"),
    ("--steps", "train", "steps"),
    ("--batch-size", "train", "batch_size"),
    ("--grad-accum", "train", "grad_accum"),
    ("--learning-rate", "train", "learning_rate"),
    ("--warmup-steps", "train", "warmup_steps"),
    ("--seed", "train", "seed"),
    ("--eval-every", "train", "eval_every"),
    ("--save-every", "train", "save_every"),
    ("--grad-checkpoint", "train", "grad_checkpoint"),
    ("--auto-fit", "train", "auto_fit"),
    ("--matmul", "train", "matmul"),
    ("--quant", "export", "quant"),
]


# What a resumed run may change: how far it goes and how often it looks. Anything else would
# make it a different run than its checkpoints were made by.
# (--export/--no-export, not a config flag, may change too.)
RESUMABLE = [("train", "steps"), ("train", "eval_every"), ("train", "save_every")]
EXPORT_DEFAULT = "export" if RunConfig().export.enabled else "no-export"  # as --help shows it
EVAL_DEFAULT = "eval" if RunConfig().eval.enabled else "no-eval"


def _field(section: str, name: str) -> dataclasses.Field:
    cls = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}[section]
    return {f.name: f for f in dataclasses.fields(cls())}[name]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def shown(value) -> str:
    """A value as the flag takes it (a default in `--help`, a setting in an error)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value)
    return "none" if value is None else str(value)


def config_options(fn):
    """Add one option per TUNE_FLAGS entry, typed and documented from the dataclass, its
    default shown. The option's own default stays None: a flag left out keeps the recipe's.
    (click's show_default would print a string default in parentheses, so it is written here.)"""
    defaults = RunConfig()
    for flag, section, name in reversed(TUNE_FLAGS):
        f = _field(section, name)
        typ = str(f.type)
        default = shown(getattr(getattr(defaults, section), name))
        help_text = f"{f.metadata['help']} [{section}.{name}]  [default: {default}]"
        if typ == "bool":
            fn = click.option(flag, _dest(flag), is_flag=True, default=None, help=help_text)(fn)
            continue
        ptype = click.INT if typ.startswith("int") else click.FLOAT if typ.startswith("float") else click.STRING
        fn = click.option(flag, _dest(flag), type=ptype, default=None, help=help_text)(fn)
    return fn


def flag_overrides(data: str | None, flags: dict) -> dict:
    """The flags given (and --data) as {section: {field: value}}."""
    overrides: dict = {}
    for flag, section, name in TUNE_FLAGS:
        value = flags.get(_dest(flag))
        if value is None:
            continue
        if name == "targets":
            value = [t.strip() for t in value.split(",") if t.strip()]
        if name == "chat_template" and value not in BUILTINS and Path(value).is_file():
            value = str(Path(value).resolve())  # so the run's export, chat and eval find it from anywhere
        overrides.setdefault(section, {})[name] = value
    if data is not None:
        overrides.setdefault("data", {})["train"] = data
    return overrides


def build_config(recipe: str | None, data: str | None, flags: dict) -> RunConfig:
    cfg = cfgmod.load_recipe(recipe)
    return cfgmod.apply_overrides(cfg, flag_overrides(data, flags), "command line")


def resume_config(run_cfg: RunConfig, recipe: str | None, data: str | None, flags: dict) -> RunConfig:
    """The config a resumed run continues with: its own, with the RESUMABLE flags applied. A
    flag that would change anything else is refused (one that repeats the run's value is not)."""
    if recipe is not None:
        raise ConfigError("--recipe: a resumed run keeps the settings in its config.json; leave --recipe out")
    names = {(section, name): flag for flag, section, name in TUNE_FLAGS}
    names["data", "train"] = "--data"
    overrides = flag_overrides(data, flags)
    cfg = cfgmod.apply_overrides(copy.deepcopy(run_cfg), overrides, "command line")
    for section, values in overrides.items():
        for name in values:
            old, new = getattr(getattr(run_cfg, section), name), getattr(getattr(cfg, section), name)
            if old != new and (section, name) not in RESUMABLE:
                allowed = ", ".join(names[k] for k in RESUMABLE)
                raise ConfigError(
                    f"{names[section, name]}: a resumed run keeps its {section}.{name} ({shown(old)}); "
                    f"only {allowed} and --export/--no-export may change on --resume: start a new "
                    "run (another --name) to change it"
                )
    return cfg

