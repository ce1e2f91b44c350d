"""Every knob of a run, with its default and its meaning, in one place.

Precedence: these dataclass defaults < a YAML recipe (``recipes/*.yaml``) < command-line flags.
A recipe is a mapping with the sections ``model``, ``lora``, ``data``, ``train``, ``export``
whose keys are the field names below; unknown keys are an error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeft.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "brand-voice"
DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    """A recipe or flag value that cannot be used; the message says which and why."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f(DEFAULT_MODEL, "built-in name, Hub repo id, GGUF file or MLX/HF folder")
    quantize_bits: int | None = _f(None, "quantize an unquantized folder on load to 4 or 8 bits")
    max_seq_len: int = _f(512, "longer samples are truncated (or dropped, see data.overlong)")


@dataclass
class LoRAConfig:
    rank: int = _f(8, "adapter rank: higher, more capacity and memory")
    alpha: float = _f(16.0, "adapter output is scaled by alpha / rank")
    dropout: float = _f(0.0, "dropout on the adapter input during training")
    targets: list[str] = _f(ALL_LINEAR, "projection names to adapt in each layer")
    layers: int | None = _f(None, "adapt only the last N layers (None: all)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class DataConfig:
    train: str | None = _f(None, "training JSONL (chat, prompt/completion or text)")
    valid: str | None = _f(None, "validation JSONL; default: split off valid_fraction of train")
    valid_fraction: float = _f(0.1, "share of train held out when no valid file is given")
    system_prompt: str | None = _f(None, "system message added to chats that have none")
    skip_bad_lines: bool = _f(False, "train on the good lines of a file that has bad ones")
    overlong: str = _f("truncate", "samples over max_seq_len: 'truncate' or 'drop'")


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps")
    batch_size: int = _f(4, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(2e-4, "peak learning rate")
    warmup_steps: int = _f(10, "linear warm-up from 0 to the peak")
    min_lr_ratio: float = _f(0.1, "cosine decay ends at learning_rate * min_lr_ratio")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float | None = _f(1.0, "clip the global gradient norm (None: off)")
    grad_checkpoint: bool = _f(False, "recompute layer activations in backward: less memory")
    auto_fit: bool = _f(
        False,
        "when the memory estimate exceeds what is free, lower batch_size (raising grad_accum: "
        "the same samples per step) instead of refusing to start",
    )
    seed: int = _f(0, "seeds data order, LoRA init and dropout")
    eval_every: int = _f(50, "validation loss every N steps (and at the end)")
    eval_batches: int | None = _f(None, "validation batches per evaluation (None: all)")
    save_every: int = _f(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    log_every: int = _f(1, "metrics line every N steps")
    peer_timeout_s: float = _f(
        300.0, "several ranks (mlx.launch): a rank that waits this long for the others in one exchange stops the run"
    )


@dataclass
class ExportConfig:
    quant: str = _f("q8_0", "GGUF type of the merged model written at the end of tune")
    enabled: bool = _f(True, "export a GGUF at the end of tune")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        cfg = cls()
        apply_overrides(cfg, d, where)
        return cfg


def _coerce(value: Any, current: Any, typ: str, where: str) -> Any:
    """Accept YAML/CLI values of the right type; ints where floats are expected."""
    if value is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if "float" in typ and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "float" in typ and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expected = {"int": int, "float": float, "bool": bool, "str": str, "list": list}
    for name, t in expected.items():
        if typ.startswith(name) or f"| {name}" in typ or typ.startswith(f"{name}["):
            if isinstance(value, t) and not (t is int and isinstance(value, bool)):
                return value
    raise ConfigError(f"{where}: expected {typ}, got {value!r}")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], where: str) -> RunConfig:
    """Overlay a nested mapping {section: {key: value}} onto cfg, rejecting unknown keys."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(overrides).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sname, values in overrides.items():
        if sname not in sections:
            raise ConfigError(f"{where}: unknown section '{sname}'; known: {', '.join(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{sname}' must be a mapping")
        section = getattr(cfg, sname)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{where}: unknown key '{sname}.{key}'; known: {', '.join(fields)}"
                )
            typ = str(fields[key].type)
            setattr(section, key, _coerce(value, getattr(section, key), typ, f"{where}: {sname}.{key}"))
    validate(cfg, where)
    return cfg


def validate(cfg: RunConfig, where: str = "config") -> None:
    checks = [
        (cfg.lora.rank >= 1, "lora.rank must be at least 1"),
        (0.0 <= cfg.lora.dropout < 1.0, "lora.dropout must be in [0, 1)"),
        (bool(cfg.lora.targets), "lora.targets must name at least one projection"),
        (cfg.train.steps >= 1, "train.steps must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (cfg.train.learning_rate > 0, "train.learning_rate must be positive"),
        (cfg.model.max_seq_len >= 8, "model.max_seq_len must be at least 8"),
        (cfg.model.quantize_bits in (None, 4, 8), "model.quantize_bits must be 4, 8 or empty"),
        (0.0 <= cfg.data.valid_fraction < 1.0, "data.valid_fraction must be in [0, 1)"),
        (cfg.data.overlong in ("truncate", "drop"), "data.overlong must be 'truncate' or 'drop'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe {p}: no such file")
        return p
    p = RECIPES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown recipe '{name_or_path}'; built-in recipes: {known}")
    return p


def load_recipe(name_or_path: str | None = None) -> RunConfig:
    """Defaults overlaid with a recipe (the built-in default recipe when none is named)."""
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({e.__class__.__name__})") from None
    return RunConfig.from_dict(raw, where=f"recipe {path}")
