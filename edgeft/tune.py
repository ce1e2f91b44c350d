"""A run from start to finish: resolve and load the model, read the data, add LoRA, train,
save the adapters, export. The folder it fills is described in edgeft/runs.py."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from edgeft import (
    backend,
    batches,
    data_files,
    distributed,
    evaluate,
    lora,
    plan,
    runs,
    trainer,
)
from edgeft.chat_formats import TEXT
from edgeft.config import ConfigError, RunConfig
from edgeft.errors import UserError
from edgeft.files import atomic_write_text
from edgeft.records import DataError, Report
from edgeft.report import build as build_report


@dataclass
class TuneResult:
    run_dir: Path
    state: trainer.TrainState
    adapters: Path
    report: Report
    export: "export.ExportResult | None" = None
    first_val: float | None = None
    report_html: Path | None = None


def tune(
    cfg: RunConfig,
    runs_dir: Path = Path("runs"),
    name: str | None = None,
    resume: bool = False,
    *,
    log: Callable[[str], None],
    progress: trainer.Progress | None = None,
) -> TuneResult:
    if not cfg.data.train:
        raise ConfigError("no training data: pass --data FILE.jsonl (or a folder holding train.jsonl)")
    train_file, valid_file = data_files.training_files(cfg.data.train, cfg.data.valid)
    tic = time.perf_counter()
    name = runs.check_run_name(name or runs.default_run_name(cfg))
    run_dir = Path(runs_dir) / name
    world = distributed.init()  # several ranks under mlx.launch: rank 0 alone touches run_dir
    if not world.main:  # its lines would repeat rank 0's; errors still go to stderr
        sys.stdout = open(os.devnull, "w")
        log, progress = (lambda _: None), trainer.Progress(cfg.train.steps, stream=sys.stdout)
    if world.size > 1:
        backend.CPU_CORES = world.cores()
        log(f"{world.size} ranks ({world.local_ranks} on this machine, {world.cores()} core(s) each); "
            f"each step's {cfg.train.batch_size} x {cfg.train.grad_accum} samples are shared between them")
    if world.main and resume:
        if not (run_dir / runs.CONFIG).exists():
            raise ConfigError(f"nothing to resume at {run_dir}: no {runs.CONFIG} there")
    elif world.main and ((run_dir / runs.CONFIG).exists() or (run_dir / runs.CHECKPOINTS).exists()):
        raise ConfigError(f"{run_dir} already holds a run; pick another --name or pass --resume")

    # Every check comes before the run folder is made, so a start that fails leaves nothing.
    loaded = runs.load_base(cfg, log=log, check_template=False)  # checked below, if the data are chats
    lora.layer_keys(loaded.model, cfg.lora.targets)  # an unknown target is refused here
    tok = loaded.tokenizer
    if cfg.data.chat_template is None and tok.chat_template_name is not None:
        cfg.data.chat_template = tok.chat_template_name  # the built-in default, kept for export and chat
    max_len = cfg.model.max_seq_len
    try:
        samples, report = data_files.load_samples(train_file, tok, cfg.data, max_len)
        if valid_file:
            train_set = samples
            valid_set, _ = data_files.load_samples(valid_file, tok, cfg.data, max_len)
        else:
            train_set, valid_set = batches.split(samples, cfg.data.valid_fraction, cfg.train.seed)
    except DataError as e:
        if e.report.format != TEXT:  # chats: is the model's template to blame, not the lines?
            runs.check_chat_template(loaded)
        raise
    if not train_set:
        raise ConfigError(f"{cfg.data.train}: no usable training samples")
    distributed.check_same_start(world, {
        "data file": distributed.files_digest([train_file, valid_file]),
        "config": distributed.config_digest(cfg.to_dict()),
        "model": distributed.files_digest([loaded.path]),
    })
    log(report.summary().splitlines()[0])
    # A rank holds at most one micro-batch of batch_size rows, so each plans its own memory.
    mem = plan.preflight(cfg, loaded, train_set, run_dir, resume=resume, log=log, share=world.local_ranks)

    worst = f"; {plan.gb(mem.worst_case)} for the largest batch the data could form" if mem.worst_case > mem.total else ""
    log(f"memory: about {plan.gb(mem.total)} at peak{' per rank' if world.size > 1 else ''} on the batches "
        f"this run draws (estimate{worst}; `edgeft plan` shows the breakdown)")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / runs.DATA_REPORT, report.summary() + "\n")
        atomic_write_text(run_dir / runs.MEMORY_PLAN, json.dumps(mem.to_dict(), indent=2) + "\n")
        # On resume too: the safe changes a resume may make (more steps, say) are kept for the next.
        atomic_write_text(run_dir / runs.CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    mx.random.seed(cfg.train.seed)
    lora.apply_lora(loaded.model, cfg.lora)
    n_train, n_total = lora.count_parameters(loaded.model)
    log(
        f"model {loaded.path.name}: {n_total / 1e6:.1f}M parameters, LoRA rank {cfg.lora.rank} "
        f"on {len(lora.lora_layers(loaded.model))} projections: {n_train / 1e6:.2f}M trainable "
        f"({100 * n_train / max(n_total, 1):.2f}%)"
    )
    log(f"data: {len(train_set)} train / {len(valid_set)} valid samples; run folder {run_dir}")
    if note := backend.fast_path_note(loaded.model):
        log(note)

    bs = cfg.train.batch_size

    def train_batches(start):
        return batches.iterate_batches(train_set, bs, cfg.train.seed, start_step=start)

    def valid_batches():
        return batches.eval_batches(valid_set, bs) if valid_set else iter(())

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
                world=world,
            )
    except trainer.Interrupted as e:
        e.run_dir = run_dir
        raise
    if not world.main:
        return TuneResult(run_dir, state, run_dir / runs.ADAPTERS, report)
    adapters = lora.save_adapters(
        loaded.model, run_dir / runs.ADAPTERS, lora.adapter_config(loaded.model, cfg.lora, str(loaded.path))
    )
    first_val = state.history[0][1] if state.history else None
    result = TuneResult(run_dir, state, adapters, report, first_val=first_val)
    if cfg.export.enabled:
        from edgeft import export

        log(f"exporting {cfg.export.quant} GGUF...")
        result.export = export.export_run(run_dir, cfg.export.quant, log=log)
    if cfg.eval.enabled:
        try:
            ev = evaluate.evaluate_run(run_dir, log=log)
        except UserError as e:  # the run is trained and saved: a failed look at it does not undo that
            log(f"eval skipped: {str(e).splitlines()[0]} (try `edgeft eval {run_dir}` when it is fixed)")
            return result
        log(f"eval took {ev['seconds']:.0f} s, {ev['seconds'] / (time.perf_counter() - tic):.0%} of this run "
            "(skip it with --no-eval or eval.enabled: false)")
        result.report_html = build_report(run_dir, log=log)
    return result


