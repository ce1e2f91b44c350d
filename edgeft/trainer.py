"""The training loop: AdamW with warm-up + cosine decay, gradient accumulation and clipping,
validation (edgeft.loss), checkpoints that resume exactly (edgeft.checkpoints), the run's
metrics.jsonl, a progress line, and Ctrl-C as a request to stop after a checkpoint.

The loop takes its loss and its batches as arguments (as mlx-lm's trainer does), so it is
tested on tiny models. Randomness is a pure function of (seed, step): the batch order comes
from edgeft.batches.iterate_batches(seed, start_step) and mx.random is reseeded from
(seed, step) before every step, so a resumed run replays exactly what the first would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from edgeft import backend, checkpoints, dequant, distributed, runs, system
from edgeft.checkpoints import TrainState
from edgeft.config import TrainConfig
from edgeft.errors import UserError
from edgeft.files import atomic_write_text
from edgeft.loss import (
    Batch,
    evaluate,
    lm_loss,
    loss_inputs,
    loss_sums,
    summed_loss_and_grad,
    tree_add,
    tree_map_scale,
)
from edgeft.timing import duration


class TrainingError(UserError, RuntimeError):
    pass


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step; `checkpoint` holds that step (None
    without a run folder). `run_dir` is filled in by whoever knows the run (edgeft.tune)."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        super().__init__(f"{signame} at step {step}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        self.run_dir: Path | None = None


@contextlib.contextmanager
def stop_requests(enabled: bool = True):
    """While active, SIGINT (Ctrl-C) and SIGTERM only set flag["signal"]: the loop saves a
    checkpoint after the current step and raises Interrupted. A second signal stops at once
    (checkpoints are written atomically, so that loses nothing already saved)."""
    flag: dict = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        # os.write, not print: a signal may land while the progress line is being written
        os.write(2, f"\n{flag['signal']}: saving a checkpoint after this step "
                    "(press Ctrl-C again to stop at once)\n".encode())

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s in sigs:
            signal.signal(s, old[s])


# ---------------------------------------------------------------------------------------------
# Schedule


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warm-up to the peak, then cosine decay to peak * min_lr_ratio at the last step."""
    peak = cfg.learning_rate
    warm = min(cfg.warmup_steps, cfg.steps)
    decay = optim.cosine_decay(peak, max(cfg.steps - warm, 1), end=peak * cfg.min_lr_ratio)
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warm), decay], [warm])


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:4], "little")


def peak_memory_gb() -> float:
    """Peak of MLX's allocator and of the process RSS, whichever is larger, in GB."""
    return max(mx.get_peak_memory(), system.peak_rss()) / 1e9


def compiled_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float | None = None):
    """update(grads_sum, scale) -> the gradients' norm: the optimizer's step on `model` with the
    gradients grads_sum * scale (summed over a step's loss tokens, scale = 1 / their count),
    clipped to max_grad_norm when set (the norm returned is the one before), as one compiled
    function. As separate ops, the scale, the norm and AdamW's steps were ~4,000 small
    elementwise ops a step for SmolLM2's 420 adapter matrices, each paying MLX's per-op cost;
    compiled, the same values (SmolLM2, interleaved, `scripts/profile_step.py ab base
    update-ops`: 1.04x at 4 x 256 when it came, 1.07x with the LoRA primitive (438.7 against
    411.5 tokens/s); 1.00x at 1024 tokens). Made after the optimizer's state is loaded (its
    arrays are captured)."""
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads_sum: dict, scale: mx.array) -> mx.array:
        grads = tree_map_scale(grads_sum, scale)
        if max_grad_norm:
            grads, gnorm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            gnorm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return gnorm

    return update


# ---------------------------------------------------------------------------------------------
# The loop


class Progress:
    """One status line: step, loss, tokens/s, ETA, peak memory (redrawn on a terminal)."""

    def __init__(self, total: int, stream=None, every: int = 1):
        stream = stream or sys.stderr  # looked up now: CliRunner swaps sys.stderr
        self.total, self.stream, self.every = total, stream, max(every, 1)
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.ranks = 1  # > 1: tokens/s is the total over this many ranks, and the line says so

    def step(self, step: int, loss: float, tps: float, eta_s: float, peak_gb: float):
        if not self.tty and step % self.every and step != self.total:
            return
        width = 20
        done = int(width * step / self.total)
        line = (
            f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} "
            f"loss {loss:.3f} | {tps:.0f} tok/s{f' on {self.ranks} ranks' if self.ranks > 1 else ''} | eta {duration(eta_s)} | peak {peak_gb:.2f} GB"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str):
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_batches: Callable[[int], Iterator[Batch]],
    valid_batches: Callable[[], Iterable[Batch]] | None = None,
    run_dir: Path | None = None,
    loss_fn=lm_loss,
    resume: bool = False,
    progress: Progress | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    stop: dict | None = None,
    world: distributed.World = distributed.SINGLE,
) -> TrainState:
    """Train the trainable (adapter) parameters of `model`.

    train_batches(start_step) yields batches from that step on; valid_batches() yields the
    validation set. With run_dir: metrics.jsonl and checkpoints/ go there, and resume=True
    continues from its newest whole checkpoint. `stop` is the flag of stop_requests(): once
    set, the loop checkpoints after the current step and raises Interrupted. The model trains
    in training mode (LoRA dropout on) and is evaluated in eval mode (loss.evaluate).

    With a `world` of several ranks (edgeft.distributed), every rank draws the same batches,
    computes its rows of each step and the ranks add their gradients, losses and token counts
    in one exchange per step; rank 0 alone reads and writes the run folder.
    """
    model.train()
    progress = progress or Progress(cfg.steps, every=cfg.log_every)
    progress.ranks = world.size
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)
    state = TrainState(ranks=world.size)
    if run_dir and world.main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / runs.CHECKPOINTS if run_dir else None
    metrics_path = run_dir / runs.METRICS if run_dir and world.main else None
    writes = ckpt_dir is not None and world.main
    last_ckpt = None  # the newest checkpoint written (by rank 0) or resumed from
    timeout = cfg.peer_timeout_s

    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    if resume and world.main:
        ckpt = checkpoints.latest(ckpt_dir, warn=progress.message) if ckpt_dir else None
        if ckpt is None:
            # Stopped before its first checkpoint: the same seed makes a fresh start exact.
            progress.message(f"no whole checkpoint in {ckpt_dir}: starting again from step 0")
            _truncate_metrics(metrics_path, -1)
        else:
            state = checkpoints.load(ckpt, model, optimizer)
            last_ckpt = ckpt
            progress.message(f"resumed from {ckpt} (step {state.step})")
            if state.ranks != world.size:
                progress.message(
                    f"the run went on {state.ranks} rank(s) and now goes on {world.size}: the global batch "
                    f"stays {cfg.batch_size} x {cfg.grad_accum} (batch_size x grad_accum), split over {world.size}"
                )
            _truncate_metrics(metrics_path, state.step)
    if resume and world.size > 1:
        state.step = distributed.share_state(world, model, optimizer, state.step, timeout)
        if state.step and ckpt_dir and not world.main:
            last_ckpt = checkpoints.folder_of(ckpt_dir, state.step)
    state.ranks = world.size

    def run_eval():
        if valid_batches is None:
            return
        if world.size == 1:
            val = evaluate(model, valid_batches(), loss_fn)
        else:  # each rank its share of the batches, the sums added
            mine = (b for i, b in enumerate(valid_batches()) if i % world.size == world.rank)
            total, count = distributed.sum_floats(world, list(loss_sums(model, mine, loss_fn)),
                                                  f"the validation of step {state.step}", timeout)
            val = total / max(count, 1)
        if not math.isfinite(val):
            raise TrainingError(f"validation loss is {val} at step {state.step}")
        state.history.append([state.step, val])
        state.best_val = val if state.best_val is None else min(state.best_val, val)
        if state.step > 0 and (state.best_step is None or val < dict(state.history)[state.best_step]):
            state.best_step = state.step
            if writes:
                checkpoints.save_best(run_dir / runs.BEST_ADAPTERS, model)
        append_metrics(metrics_path, {"kind": "valid", "step": state.step, "val_loss": val})
        progress.message(f"step {state.step}: validation loss {val:.4f}")

    # The base weights stay fixed: each is dequantized once for the whole run (backend), and
    # with bf16 products held as bfloat16 only. A lone long sample splits across two streams,
    # except under grad checkpointing (backend.split_samples).
    with (backend.matmul_precision(cfg.matmul, progress.message) as keep,
          dequant.keep_dequantized(not cfg.grad_checkpoint, on_keep=keep),
          backend.split_samples(not cfg.grad_checkpoint)):
        if not cfg.grad_checkpoint:
            backend.keep_weights(model)
        batches = train_batches(state.step * cfg.grad_accum)
        update = compiled_update(model, optimizer, cfg.max_grad_norm)
        try:
            if state.step == 0 and valid_batches is not None and cfg.eval_every > 0:
                run_eval()
            while state.step < cfg.steps:
                tic = time.perf_counter()
                mx.random.seed((step_seed(cfg.seed, state.step) + world.rank) % 2**32)
                grads_sum, loss_sum, ntok_sum, step_tokens = None, 0.0, 0, 0
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                for batch in distributed.my_rows(micro, world):
                    args, ntok_in = loss_inputs(model, loss_fn, *batch[:3])
                    loss, grads, n = summed_loss_and_grad(model, loss_fn, args)
                    if n == 0:
                        continue
                    step_tokens += ntok_in
                    grads_sum = grads if grads_sum is None else tree_add(grads_sum, grads)
                    loss_sum = loss + loss_sum
                    ntok_sum += n
                    if cfg.grad_accum > 1:  # else evaluated in one graph with the update, below
                        mx.eval(grads_sum, loss_sum)
                stopping = bool(stop and stop["signal"])
                exchange_s = None
                if world.size > 1:  # every rank reads the same sums, so all stop at the same step
                    if grads_sum is None:
                        grads_sum = tree_map_scale(model.trainable_parameters(), 0.0)
                    grads_sum, (loss_sum, ntok_sum, step_tokens, stops), exchange_s = distributed.sum_step(
                        world, grads_sum, [loss_sum, ntok_sum, step_tokens, stopping],
                        f"the gradient exchange of step {state.step + 1}", timeout)
                    loss_sum, ntok_sum, step_tokens = mx.array(loss_sum), int(ntok_sum), int(step_tokens)
                    stopping = stops > 0
                    if ntok_sum == 0:
                        grads_sum = None
                if grads_sum is None:
                    raise TrainingError(f"step {state.step + 1}: no batch carried any loss token")
                loss = loss_sum / ntok_sum
                gnorm = update(grads_sum, mx.array(1.0 / ntok_sum, dtype=mx.float32))
                mx.eval(model.trainable_parameters(), optimizer.state, loss, gnorm)
                loss_v, gnorm_v = loss.item(), gnorm.item()
                if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
                    # Nothing of this step is saved: no metrics line, no checkpoint, no adapters.
                    kept = f"the last good checkpoint, {last_ckpt}, is kept" if last_ckpt else "no checkpoint was written"
                    raise TrainingError(
                        f"step {state.step + 1}: loss {loss_v} / gradient norm {gnorm_v} is not finite; "
                        f"training stopped and {kept}. Try a lower learning rate (now {cfg.learning_rate:g}) "
                        "or a smaller max_grad_norm in a new run."
                    )
                dt = time.perf_counter() - tic
                state.step += 1
                state.tokens += step_tokens
                state.elapsed_s += dt
                tps = step_tokens / dt
                peak = peak_memory_gb()
                eta = state.elapsed_s / max(state.step, 1) * (cfg.steps - state.step)
                append_metrics(
                    metrics_path,
                    {
                        "kind": "train",
                        "step": state.step,
                        "loss": loss_v,
                        "grad_norm": gnorm_v,
                        "lr": float(optimizer.learning_rate.item()),
                        "tokens": step_tokens,
                        "loss_tokens": ntok_sum,
                        "step_time_s": dt,
                        "tokens_per_s": tps,
                        "peak_mem_gb": peak,
                        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
                    } | ({"ranks": world.size, "exchange_s": exchange_s} if world.size > 1 else {})
                )
                progress.step(state.step, loss_v, tps, eta, peak)
                last = state.step == cfg.steps
                if valid_batches is not None and (last or (cfg.eval_every > 0 and state.step % cfg.eval_every == 0)):
                    run_eval()
                if ckpt_dir and ((cfg.save_every > 0 and state.step % cfg.save_every == 0) or last):
                    last_ckpt = _save(ckpt_dir, model, optimizer, state, cfg, writes, on_checkpoint)
                if world.size == 1:
                    stopping = bool(stop and stop["signal"])
                if stopping and not last:
                    if ckpt_dir and last_ckpt != checkpoints.folder_of(ckpt_dir, state.step):
                        last_ckpt = _save(ckpt_dir, model, optimizer, state, cfg, writes, None)
                    raise Interrupted((stop and stop["signal"]) or "SIGINT", state.step, last_ckpt if ckpt_dir else None)
        except distributed.DistributedError as e:
            kept = f"the last checkpoint, {last_ckpt}, is whole" if last_ckpt else "no checkpoint was written"
            raise TrainingError(f"{e}; {kept}") from None
    best, vals = state.best_step, dict(state.history)
    state.kept_step = state.step
    if cfg.keep_best and writes and best not in (None, state.step) and state.step in vals:
        lowest = f"validation loss was lowest at step {best} ({vals[best]:.4f}; {vals[state.step]:.4f} at step {state.step}"
        if vals[state.step] <= (1 + cfg.keep_best_margin) * vals[best]:
            progress.message(f"{lowest}, within train.keep_best_margin): the run keeps its last adapters")
        elif checkpoints.load_best(run_dir / runs.BEST_ADAPTERS, model):
            progress.message(f"{lowest}): the run keeps step {best}'s adapters (train.keep_best)")
            state.kept_step = best
    if writes and state.kept_step in vals:  # which adapters the run ends with, for its summary and report
        append_metrics(metrics_path, {"kind": "adapters", "step": state.kept_step, "val_loss": vals[state.kept_step]})
    return state


def _save(ckpt_dir: Path, model, optimizer, state: TrainState, cfg: TrainConfig, writes: bool,
          on_checkpoint: Callable[[Path], None] | None) -> Path:
    """Checkpoint this step (rank 0; the other ranks only note where it went)."""
    if not writes:
        return checkpoints.folder_of(ckpt_dir, state.step)
    path = checkpoints.save(ckpt_dir, model, optimizer, state, cfg.keep_checkpoints)
    if on_checkpoint:
        on_checkpoint(path)
    return path


def append_metrics(path: Path | None, record: dict) -> None:
    """Add one line to the run's metrics (nothing without a run folder)."""
    if not path:
        return
    try:  # appended, not atomic: a line cut short by a crash is dropped on resume
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise TrainingError(
            f"cannot write {path} ({e.strerror or e}); free some disk space, then "
            "resume from the last checkpoint"
        ) from e


def _truncate_metrics(path: Path | None, step: int) -> None:
    """Drop metrics lines written after `step` by a run that died before its next checkpoint."""
    if not path or not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))
