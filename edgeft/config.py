"""Every knob of a run, with its default and its meaning, in one place.

Precedence: these dataclass defaults < a YAML recipe (``recipes/*.yaml``) < command-line flags.
The defaults are the default recipe's (brand voice: a small chat model learns a tone from ~50
conversations), so that recipe states nothing. A recipe is a mapping with the sections
``model``, ``lora``, ``data``, ``train``, ``export``, ``generate``, ``eval`` whose keys are the field names
below; unknown keys are an error, not a silent no-op. Every value is checked when the config
is built (``validate``), before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeft.errors import UserError

DEFAULT_RECIPE = "brand-voice"
DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The GGUF types an export writes (edgeft/export.py), named here so that a config naming any
# other fails when it is built, not after training.
GGUF_PY_QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_1")  # written by gguf-py itself
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # through llama.cpp's quantizer
QUANTS = GGUF_PY_QUANTS + LLAMA_CPP_QUANTS


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
    max_seq_len: int = _f(384, "longer samples are truncated (or dropped, see data.overlong)")


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
    chat_template: str | None = _f(
        None, "chat template for the chats: chatml, gemma, llama3, mistral, phi3 or a FILE.jinja "
        "(None: the model's own; a model without one gets the built-in its vocabulary fits)"
    )
    skip_bad_lines: bool = _f(False, "train on the good lines of a file that has bad ones")
    overlong: str = _f("truncate", "samples over max_seq_len: 'truncate' or 'drop'")


@dataclass
class TrainConfig:
    # 60: a voice sticks after a few passes over ~50 conversations.
    steps: int = _f(60, "optimizer steps")
    batch_size: int = _f(4, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    # 2e-4: on the brand-voice chats both SmolLM2-135M and Gemma 3 270M learn the sign-off (5 of
    # 5 unseen prompts) and keep every plain fact their base completes; 3e-4 and 5e-4 cost
    # Gemma 1 and 2 of its 3 facts.
    learning_rate: float = _f(2e-4, "peak learning rate (LoRA tolerates higher rates than full fine-tuning)")
    warmup_steps: int = _f(5, "linear warm-up from 0 to the peak")
    min_lr_ratio: float = _f(0.1, "cosine decay ends at learning_rate * min_lr_ratio")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float | None = _f(1.0, "clip the global gradient norm (None: off)")
    grad_checkpoint: bool = _f(False, "recompute layer activations in backward: less memory")
    matmul: str = _f(
        "auto",
        "CPU matrix products of a step: 'fp32', 'bf16' (inputs rounded to bfloat16, sums in fp32: 3-4x a "
        "product with AMX) or 'auto' (bf16 where a start-up measurement finds it 1.3x faster)",
    )
    auto_fit: bool = _f(
        False,
        "when the memory estimate exceeds what is free, lower batch_size (raising grad_accum: "
        "the same samples per step) instead of refusing to start",
    )
    seed: int = _f(0, "seeds data order, LoRA init and dropout")
    eval_every: int = _f(20, "validation loss at the start, every N steps and at the end (0: only at the end)")
    eval_batches: int | None = _f(None, "validation batches per evaluation (None: all)")
    save_every: int = _f(20, "checkpoint every N steps for --resume (0: only at the end)")
    keep_best: bool = _f(True, "end with the adapters of the lowest validation loss, not the last step's, "
                               "when the last is more than keep_best_margin above it")
    # 0.25: on the brand-voice chats SmolLM2's last adapters (validation loss 4% above its lowest,
    # at step 20) signed off on 100% of held-out prompts and answered 8 of 12 knowledge
    # questions, step 20's 83% and 6; Gemma 3 270M's ended 41% above (over-fitting), and its
    # lowest-loss adapters kept every fact.
    keep_best_margin: float = _f(0.25, "how far (a fraction) the last validation loss may rise above the lowest "
                                       "before keep_best takes the lowest's adapters")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    log_every: int = _f(1, "metrics line every N steps")
    peer_timeout_s: float = _f(
        300.0, "several ranks (mlx.launch): a rank that waits this long for the others in one exchange stops the run"
    )


@dataclass
class ExportConfig:
    quant: str = _f("q8_0", f"GGUF type of the merged model (tune's and `edgeft export`'s): {', '.join(QUANTS)}")
    enabled: bool = _f(True, "export a GGUF at the end of tune")


@dataclass
class GenerateConfig:
    # Measured with edgeft eval on the example brand-voice run: a repeat penalty of 1.15 took the
    # base's loops on unseen prompts from 25% to 0% and kept the tuned sign-off (92%) and its
    # knowledge; 1.5 cost sign-offs (75%). Tuned answers never came near 200 tokens.
    max_tokens: int = _f(200, "new tokens per reply (chat, eval, and num_predict in the Modelfile)")
    temperature: float = _f(0.0, "sampling temperature (0: greedy)")
    repeat_penalty: float = _f(1.15, "divide the logits of recently generated tokens by this (1: off)")
    repeat_last_n: int = _f(64, "how many recent generated tokens repeat_penalty looks at")


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "at the end of tune, answer held-out prompts with base and tuned model and write report.html")
    prompts: str | None = _f(None, "JSONL of prompts or chats to answer (None: the validation split)")
    max_prompts: int = _f(12, "answer at most this many prompts of the validation split (a prompts file: all)")
    knowledge: bool = _f(True, "also ask the built-in general-knowledge questions (knowledge kept)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        cfg = cls()
        apply_overrides(cfg, d, where)
        return cfg


def _coerce(value: Any, typ: str, where: str) -> Any:
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
            setattr(section, key, _coerce(value, typ, f"{where}: {sname}.{key}"))
    validate(cfg, where)
    return cfg


def validate(cfg: RunConfig, where: str = "config") -> None:
    """Refuse any value a run could not use, naming the first: a bad value costs nothing here,
    while at use (a wrong quant after training) it would cost the whole run."""
    m, lo, d, t, e, g = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.export, cfg.generate
    checks = [
        (bool(m.name.strip()), "model.name must name a model"),
        (m.quantize_bits in (None, 4, 8), "model.quantize_bits must be 4, 8 or empty"),
        (m.max_seq_len >= 8, "model.max_seq_len must be at least 8"),
        (lo.rank >= 1, "lora.rank must be at least 1"),
        (math.isfinite(lo.alpha) and lo.alpha > 0, "lora.alpha must be positive"),
        (0.0 <= lo.dropout < 1.0, "lora.dropout must be in [0, 1)"),
        (bool(lo.targets), "lora.targets must name at least one projection"),
        (all(isinstance(x, str) and x.strip() for x in lo.targets), "lora.targets must be projection names"),
        (lo.layers is None or lo.layers >= 1, "lora.layers must be at least 1 or empty (all)"),
        (d.train is None or bool(d.train.strip()), "data.train must name a file or be empty"),
        (d.valid is None or bool(d.valid.strip()), "data.valid must name a file or be empty"),
        (0.0 <= d.valid_fraction < 1.0, "data.valid_fraction must be in [0, 1)"),
        (d.overlong in ("truncate", "drop"), "data.overlong must be 'truncate' or 'drop'"),
        (d.chat_template is None or bool(d.chat_template.strip()),
         "data.chat_template must name a built-in template or a .jinja file, or be empty"),
        (t.steps >= 1, "train.steps must be at least 1"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (t.matmul in ("auto", "fp32", "bf16"), f"train.matmul {t.matmul!r} must be 'auto', 'fp32' or 'bf16'"),
        (math.isfinite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate must be positive"),
        (t.warmup_steps >= 0, "train.warmup_steps must be 0 or more"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay must be 0 or more"),
        (t.max_grad_norm is None or (math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0),
         "train.max_grad_norm must be positive or empty (no clipping)"),
        (0 <= t.seed < 2**63, "train.seed must be in [0, 2**63)"),
        (t.eval_every >= 0, "train.eval_every must be 0 or more"),
        (t.eval_batches is None or t.eval_batches >= 1, "train.eval_batches must be at least 1 or empty (all)"),
        (t.save_every >= 0, "train.save_every must be 0 or more"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (math.isfinite(t.keep_best_margin) and t.keep_best_margin >= 0,
         "train.keep_best_margin must be 0 or more (a fraction: 0.25 is 25%)"),
        (t.log_every >= 1, "train.log_every must be at least 1"),
        (math.isfinite(t.peer_timeout_s) and t.peer_timeout_s > 0, "train.peer_timeout_s must be a positive number of seconds"),
        (e.quant.lower() in QUANTS, f"export.quant {e.quant!r} is not a type edgeft writes; choose one of {', '.join(QUANTS)}"),
        (g.max_tokens >= 1, "generate.max_tokens must be at least 1"),
        (math.isfinite(g.temperature) and g.temperature >= 0, "generate.temperature must be 0 or more"),
        (math.isfinite(g.repeat_penalty) and g.repeat_penalty > 0, "generate.repeat_penalty must be positive (1: off)"),
        (g.repeat_last_n >= 0, "generate.repeat_last_n must be 0 or more"),
        (cfg.eval.max_prompts >= 1, "eval.max_prompts must be at least 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")


def recipes_dir() -> Path:
    """The built-in recipes: the top-level recipes/ folder of a source checkout (or an editable
    install), which a wheel ships as the package data edgeft/recipes (see pyproject.toml)."""
    here = Path(__file__).resolve().parent
    packaged = here / "recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe {p}: no such file")
        return p
    p = recipes_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in recipes_dir().glob("*.yaml")))
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
