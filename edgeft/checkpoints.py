"""Training checkpoints on disk: a run's checkpoints/step_NNNNNN/ folders (adapters, optimizer
state, state.json with the loop's counters and the files' checksums), written whole or not
at all, pruned to the newest few, and read back for --resume only when their checksums pass.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from edgeft.errors import UserError
from edgeft.files import (
    atomic_save_safetensors,
    atomic_write_text,
    fsync_dir,
    sha256_file,
)
from edgeft.lora import adapter_parameters

ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


class CheckpointError(UserError, RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # input tokens seen
    elapsed_s: float = 0.0  # training time, excluding evaluation
    best_val: float | None = None
    best_step: int | None = None  # the trained step (>= 1) of the lowest validation loss
    history: list = field(default_factory=list)  # validation results [(step, loss)]
    ranks: int = 1  # processes the steps were shared over (edgeft.distributed)
    kept_step: int | None = None  # a finished run: the step whose adapters it ends with (not saved)


def folder_of(folder: Path, step: int) -> Path:
    """Where checkpoint `step` lives under `folder`."""
    return Path(folder) / f"step_{step:06d}"


def save(folder: Path, model, optimizer, state: TrainState, keep: int) -> Path:
    """Write checkpoints/step_NNNNNN/ (adapters, optimizer, state.json with checksums) and
    prune to the `keep` newest. The folder appears only when complete (rename). A write that
    fails (a full disk) leaves no partial folder and raises CheckpointError."""
    try:
        return _save(Path(folder), model, optimizer, state, keep)
    except OSError as e:
        shutil.rmtree(Path(folder) / f".step_{state.step:06d}.tmp", ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint step {state.step} in {folder} ({e.strerror or e}); free some "
            "disk space, then resume: the checkpoints already written are whole"
        ) from e


def _save(folder: Path, model, optimizer, state: TrainState, keep: int) -> Path:
    final = folder_of(folder, state.step)
    tmp = folder / f".step_{state.step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    atomic_save_safetensors(tmp / ADAPTERS, adapter_parameters(model))
    atomic_save_safetensors(tmp / OPTIMIZER, dict(tree_flatten(optimizer.state)))
    meta = {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed_s": state.elapsed_s,
        "best_val": state.best_val,
        "best_step": state.best_step,
        "history": state.history,
        "ranks": state.ranks,
        "sha256": {n: sha256_file(tmp / n) for n in (ADAPTERS, OPTIMIZER)},
    }
    atomic_write_text(tmp / STATE, json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(folder)
    for old in sorted(folder.glob("step_*"))[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step_*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None if it is whole."""
    try:
        meta = json.loads((ckpt / STATE).read_text())
        for name, digest in meta["sha256"].items():
            if sha256_file(ckpt / name) != digest:
                return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e.__class__.__name__}: {e})"
    return None


def latest(folder: Path, *, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that passes its checksums; broken ones are reported and skipped."""
    for ckpt in sorted(Path(folder).glob("step_*"), reverse=True):
        why = problem(ckpt)
        if why is None:
            return ckpt
        warn(f"skipping checkpoint {ckpt}: {why}")
    return None


def load(ckpt: Path, model, optimizer) -> TrainState:
    """Put checkpoint `ckpt`'s adapters into `model` and its state into `optimizer`; return
    the loop's counters as they were when it was written."""
    meta = json.loads((ckpt / STATE).read_text())
    model.load_weights(list(mx.load(str(ckpt / ADAPTERS)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / OPTIMIZER)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return TrainState(
        step=meta["step"],
        tokens=meta["tokens"],
        elapsed_s=meta["elapsed_s"],
        best_val=meta.get("best_val"),
        best_step=meta.get("best_step"),
        history=meta.get("history", []),
        ranks=meta.get("ranks", 1),
    )


def save_best(path: Path, model) -> None:
    """Keep the adapters as they are now at `path`, the run's best so far (atomic; replaces
    the last)."""
    atomic_save_safetensors(Path(path), adapter_parameters(model))


def load_best(path: Path, model) -> bool:
    """Put the best adapters save_best kept at `path` into `model`; False if there are none."""
    if not Path(path).is_file():
        return False
    model.load_weights(list(mx.load(str(path)).items()), strict=False)
    mx.eval(model.parameters())
    return True
