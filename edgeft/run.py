"""A run from start to finish: resolve and load the model, read the data, add LoRA, train,
save the adapters, export. Everything a run produces lives in one folder::

    runs/<name>/
      config.json        the resolved configuration (defaults < recipe < flags)
      data_report.txt    what the data check found
      metrics.jsonl      one JSON object per training step and per validation
      checkpoints/       step_NNNNNN/ folders for --resume
      adapters/          adapters.safetensors + adapter_config.json (mlx-lm layout)
      export/            the shippable GGUF (and Ollama Modelfile)
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from edgeft import backend, dataset, hub, lora, plan, trainer
from edgeft.config import ConfigError, RunConfig
from edgeft.io import atomic_write_text
from edgeft.loader import Loaded, ModelLoadError, load

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


@dataclass
class TuneResult:
    run_dir: Path
    state: trainer.TrainState
    adapters: Path
    report: "dataset.Report"
    export: "export.ExportResult | None" = None
    first_val: float | None = None


def load_model(path, **kw) -> Loaded:
    """loader.load, where any failure to parse the file is a ModelLoadError: a model file is
    untrusted input, so even a parser gap ends in one line that names the file, not a traceback."""
    try:
        return load(path, **kw)
    except ModelLoadError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError,
            MemoryError, UnicodeError, struct.error) as e:
        why = (str(e).splitlines() or [""])[0][:160]
        raise ModelLoadError(
            f"{path}: cannot be read as a model ({type(e).__name__}: {why}); the file is damaged "
            "or its metadata is invalid: download or convert it again"
        ) from e


def load_base(cfg: RunConfig, quiet: bool = False, inference: bool = False) -> Loaded:
    """Resolve the model spec to a local file or folder and load it for this device, for
    training or (inference=True) for generating."""
    path = hub.resolve(cfg.model.name, quiet=quiet)
    loaded = load_model(path, quantize_bits=cfg.model.quantize_bits)
    backend.prepare(loaded.model)
    if inference:
        backend.prepare_inference(loaded.model)
    return loaded


def tune(
    cfg: RunConfig,
    runs_dir: Path = Path("runs"),
    name: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: trainer.Progress | None = None,
) -> TuneResult:
    if not cfg.data.train:
        raise ConfigError("no training data: pass --data FILE.jsonl")
    name = check_run_name(name or default_run_name(cfg))
    run_dir = Path(runs_dir) / name
    if resume:
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"nothing to resume at {run_dir}: no config.json there")
    elif (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        # (a folder a failed start left with only data_report.txt is reused, not a trap)
        raise ConfigError(f"{run_dir} already holds a run; pick another --name or pass --resume")
    run_dir.mkdir(parents=True, exist_ok=True)

    loaded = load_base(cfg)
    tok = loaded.tokenizer
    max_len = cfg.model.max_seq_len
    samples, report = dataset.load_samples(cfg.data.train, tok, cfg.data, max_len)
    if cfg.data.valid:
        train_set = samples
        valid_set, _ = dataset.load_samples(cfg.data.valid, tok, cfg.data, max_len)
    else:
        train_set, valid_set = dataset.split(samples, cfg.data.valid_fraction, cfg.train.seed)
    if not train_set:
        raise ConfigError(f"{cfg.data.train}: no usable training samples")
    atomic_write_text(run_dir / "data_report.txt", report.summary() + "\n")
    log(report.summary().splitlines()[0])
    mem = plan.preflight(cfg, loaded, train_set, run_dir, resume=resume, log=log)
    log(f"memory: about {plan.gb(mem.total)} at peak (estimate; `edgeft plan` shows the breakdown)")
    atomic_write_text(run_dir / "memory_plan.json", json.dumps(mem.to_dict(), indent=2) + "\n")

    if not resume:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    mx.random.seed(cfg.train.seed)
    lora.apply_lora(loaded.model, cfg.lora)
    n_train, n_total = lora.count_parameters(loaded.model)
    log(
        f"model {loaded.path.name}: {n_total / 1e6:.1f}M parameters, LoRA rank {cfg.lora.rank} "
        f"on {len(lora.lora_layers(loaded.model))} projections: {n_train / 1e6:.2f}M trainable "
        f"({100 * n_train / max(n_total, 1):.2f}%)"
    )
    log(f"data: {len(train_set)} train / {len(valid_set)} valid samples; run folder {run_dir}")

    bs = cfg.train.batch_size

    def train_batches(start):
        return dataset.iterate_batches(train_set, bs, cfg.train.seed, start_step=start)

    def valid_batches():
        return dataset.eval_batches(valid_set, bs) if valid_set else iter(())

    try:
        with trainer.stop_requests() as stop:  # Ctrl-C: checkpoint, then trainer.Interrupted
            state = trainer.train(
                loaded.model,
                cfg.train,
                train_batches,
                valid_batches if valid_set else None,
                run_dir=run_dir,
                resume=resume,
                progress=progress,
                stop=stop,
            )
    except trainer.Interrupted as e:
        e.run_dir = run_dir
        raise
    trainer.pause_for_test("adapters", state.step)
    adapters = lora.save_adapters(
        loaded.model, run_dir / "adapters", lora.adapter_config(loaded.model, cfg.lora, str(loaded.path))
    )
    first_val = state.history[0][1] if state.history else None
    result = TuneResult(run_dir, state, adapters, report, first_val=first_val)
    if cfg.export.enabled:
        from edgeft import export

        log(f"exporting {cfg.export.quant} GGUF...")
        result.export = export.export_run(run_dir, cfg.export.quant, log=log)
    return result


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg})") from None
    return RunConfig.from_dict(raw, where=str(path))


def load_tuned(run_dir: Path, quiet: bool = True, inference: bool = False) -> tuple[Loaded, RunConfig]:
    """The base model of a run with the run's final adapters applied (merged, for generating,
    with inference=True)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if not (run_dir / "adapters" / lora.ADAPTER_WEIGHTS).exists():
        raise ConfigError(f"{run_dir}: no adapters yet (did the run finish? try `edgeft tune --resume`)")
    loaded = load_base(cfg, quiet=quiet)
    lora.load_adapters(loaded.model, run_dir / "adapters")
    if inference:
        backend.prepare_inference(loaded.model)
    return loaded, cfg
