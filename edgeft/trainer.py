"""The training loop: AdamW with warm-up + cosine decay, gradient accumulation and clipping,
validation, checkpoints that resume exactly, metrics.jsonl, a progress line.

The loop takes its loss and its batches as arguments (as mlx-lm's trainer does), so it is
tested on tiny models. Randomness is a pure function of (seed, step): the batch order comes
from edgeft.batches.iterate_batches(seed, start_step) and mx.random is reseeded from
(seed, step) before every step, so a resumed run replays exactly what the first would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from edgeft import backend, batches, dequant
from edgeft.config import TrainConfig
from edgeft.errors import UserError
from edgeft.files import (
    atomic_save_safetensors,
    atomic_write_text,
    fsync_dir,
    sha256_file,
)
from edgeft.lora import adapter_parameters

# A batch as edgeft.batches yields it: inputs, targets, loss mask (all [B, T]).
Batch = tuple


class TrainingError(UserError, RuntimeError):
    pass


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step; `checkpoint` holds that step (None
    without a run folder). `run_dir` is filled in by whoever knows the run (edgeft.tune)."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        super().__init__(f"{signame} at step {step}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        self.run_dir: Path | None = None


def pause_for_test(point: str, step: int) -> None:
    """Test-only: with EDGEFT_TEST_PAUSE_AT=point:step (point: step, checkpoint, eval or
    adapters) and EDGEFT_TEST_PAUSE_FILE=PATH, write PATH and wait here until it is deleted,
    so tests/test_reliability.py can signal or SIGKILL the process at that exact moment."""
    if os.environ.get("EDGEFT_TEST_PAUSE_AT") != f"{point}:{step}":
        return
    marker = Path(os.environ["EDGEFT_TEST_PAUSE_FILE"])
    marker.write_text(f"{point}:{step} {os.getpid()}\n")
    deadline = time.monotonic() + 600
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


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
# Loss


def output_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The vocabulary projection of an mlx-lm causal LM (tied embedding or lm_head)."""
    if "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def loss_positions(targets: mx.array, loss_mask: mx.array) -> tuple[mx.array, mx.array]:
    """Flat indices of the positions that carry loss, and their target ids."""
    mask = np.asarray(loss_mask).reshape(-1) > 0
    idx = np.nonzero(mask)[0].astype(np.int32)
    tgt = np.asarray(targets).reshape(-1)[idx].astype(np.int32)
    return mx.array(idx), mx.array(tgt)


def lm_loss(
    model: nn.Module, inputs: mx.array, idx: mx.array, tgt: mx.array, lengths: tuple[int, ...] | None = None
) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the loss positions only.

    The vocabulary projection and softmax, the most expensive part of a small model's step,
    run only where there is loss (assistant tokens), not over prompt and padding. With
    `lengths`, inputs is one packed row of sequences of these lengths (batches.pack).
    """
    with backend.fast_forward(backend.Packing(tuple(lengths)) if lengths else None):
        h = model.model(inputs)
        return _ce_sum(model, h, idx, tgt) / max(idx.size, 1), mx.array(idx.size)


def stream_split(args: tuple) -> list[tuple[object, tuple]]:
    """The loss arguments of one batch (loss_inputs) as [(stream, arguments)]: a packed batch
    is split into groups of whole samples, one per CPU stream (backend.stream_groups), whose
    losses and gradients are built and computed side by side; anything else is one group on
    the default stream. Each group's own value_and_grad keeps the streams apart until their
    gradients are added: one backward graph over both would add them layer by layer, making
    each stream wait for the other at every layer."""
    if len(args) < 4 or not args[3]:
        return [(mx.default_stream(mx.default_device()), args)]
    inputs, idx, tgt, lengths = args
    positions = np.asarray(idx)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    groups = []
    for stream, members in backend.stream_groups(tuple(lengths)):
        pieces, mine, offset = [], [], 0
        for i in members:
            start, stop = int(starts[i]), int(starts[i + 1])
            pieces.append(inputs[:, start:stop])
            at = np.nonzero((positions >= start) & (positions < stop))[0]
            mine.append((at, positions[at] - start + offset))
            offset += stop - start
        sel = np.concatenate([a for a, _ in mine]).astype(np.int32)
        group_idx = np.concatenate([p for _, p in mine]).astype(np.int32)
        group_inputs = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)
        groups.append((stream, (group_inputs, mx.array(group_idx), tgt[mx.array(sel)], tuple(lengths[i] for i in members))))
    return groups


def _ce_sum(model: nn.Module, h: mx.array, idx: mx.array, tgt: mx.array) -> mx.array:
    """Summed cross-entropy at positions idx of h: logsumexp minus the target logit, as
    nn.losses.cross_entropy."""
    h = h.reshape(-1, h.shape[-1])[idx]
    logits = output_head(model)(h).astype(mx.float32)
    return (backend.logsumexp(logits) - mx.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]).sum()


# ---------------------------------------------------------------------------------------------
# Schedule, state


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
    return max(mx.get_peak_memory(), peak_rss_bytes()) / 1e9


def peak_rss_bytes() -> int:
    """This program's resident-memory high-water mark. On Linux VmHWM, not ru_maxrss: that
    one survives exec, so a process started by a big one (pytest, an IDE) reports its parent's
    RSS at fork time as its own peak."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # input tokens seen
    elapsed_s: float = 0.0  # training time, excluding evaluation
    best_val: float | None = None
    history: list = field(default_factory=list)  # validation results [(step, loss)]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(folder: Path, model, optimizer, state: TrainState, keep: int) -> Path:
    """Write checkpoints/step_NNNNNN/ (adapters, optimizer, state.json with checksums) and
    prune to the `keep` newest. The folder appears only when complete (rename). A write that
    fails (a full disk) leaves no partial folder and raises TrainingError."""
    try:
        return _save_checkpoint(Path(folder), model, optimizer, state, keep)
    except OSError as e:
        shutil.rmtree(Path(folder) / f".step_{state.step:06d}.tmp", ignore_errors=True)
        raise TrainingError(
            f"cannot write checkpoint step {state.step} in {folder} ({e.strerror or e}); free some "
            "disk space, then resume: the checkpoints already written are whole"
        ) from e


def _save_checkpoint(folder: Path, model, optimizer, state: TrainState, keep: int) -> Path:
    final = folder / f"step_{state.step:06d}"
    tmp = folder / f".step_{state.step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    atomic_save_safetensors(tmp / "adapters.safetensors", adapter_parameters(model))
    pause_for_test("checkpoint", state.step)
    opt_state = dict(tree_flatten(optimizer.state))
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_state)
    meta = {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed_s": state.elapsed_s,
        "best_val": state.best_val,
        "history": state.history,
        "sha256": {n: sha256_file(tmp / n) for n in ("adapters.safetensors", "optimizer.safetensors")},
    }
    atomic_write_text(tmp / "state.json", json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(folder)
    for old in sorted(folder.glob("step_*"))[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step_*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None if it is whole."""
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        for name, digest in meta["sha256"].items():
            if sha256_file(ckpt / name) != digest:
                return f"{name} fails its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e.__class__.__name__}: {e})"
    return None


def latest_checkpoint(folder: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that passes its checksums; broken ones are reported and skipped."""
    for ckpt in sorted(Path(folder).glob("step_*"), reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        warn(f"skipping checkpoint {ckpt}: {problem}")
    return None


def load_checkpoint(ckpt: Path, model, optimizer) -> TrainState:
    meta = json.loads((ckpt / "state.json").read_text())
    model.load_weights(list(mx.load(str(ckpt / "adapters.safetensors")).items()), strict=False)
    opt_state = mx.load(str(ckpt / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(opt_state.items()))
    mx.eval(model.parameters(), optimizer.state)
    return TrainState(
        step=meta["step"],
        tokens=meta["tokens"],
        elapsed_s=meta["elapsed_s"],
        best_val=meta.get("best_val"),
        history=meta.get("history", []),
    )


# ---------------------------------------------------------------------------------------------
# The loop


def loss_inputs(model, loss_fn, inputs, targets, mask) -> tuple[tuple, int]:
    """The arguments after `model` that loss_fn gets for this batch, and its input tokens.

    A loss function that takes `lengths` gets the batch packed (no padding computed) when
    the model's backend can compute packed batches exactly."""
    if "lengths" in inspect.signature(loss_fn).parameters and backend.can_pack(model):
        inputs, targets, mask, lengths = batches.pack(inputs, targets, mask)
        idx, tgt = loss_positions(targets, mask)
        return (inputs, idx, tgt, lengths), inputs.shape[1]
    idx, tgt = loss_positions(targets, mask)
    return (inputs, idx, tgt), _input_tokens(mask)


def summed_loss_and_grad(loss_and_grad, model, args: tuple) -> tuple[mx.array | None, dict | None, int]:
    """Loss and gradients of one batch, each summed over its loss tokens (not averaged), and
    the number of those tokens: its stream groups (stream_split) computed side by side, each
    weight dequantized once between them. (None, None, 0) for a batch without loss tokens."""
    def summed(group, n):
        (loss, _), grads = loss_and_grad(model, *group)
        return loss * n, tree_map_scale(grads, n)

    loss_sum, grads_sum, total = None, None, 0
    for (loss, grads), n in on_streams(args, summed):
        grads_sum = grads if grads_sum is None else tree_add(grads_sum, grads)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        total += n
    return loss_sum, grads_sum, total


def on_streams(args: tuple, fn: Callable[[tuple, int], object]) -> list[tuple[object, int]]:
    """[(fn(group arguments, n), n)] for the stream groups of one batch (stream_split) that
    carry n > 0 loss tokens, each built on its own stream, every weight dequantized once
    between them."""
    out = []
    with dequant.shared_weights():
        for stream, group in stream_split(args):
            n = group[1].size
            if n:
                with mx.stream(stream):
                    out.append((fn(group, n), n))
    return out


def evaluate(model, batches: Iterable[Batch], loss_fn=lm_loss) -> float:
    """Token-weighted mean loss over the batches."""
    total, count = 0.0, 0
    for batch in batches:
        args, _ = loss_inputs(model, loss_fn, *batch[:3])
        losses = on_streams(args, lambda group, n: loss_fn(model, *group)[0] * n)
        if losses:
            total += sum(loss for loss, _ in losses).item()
            count += sum(n for _, n in losses)
    return total / max(count, 1)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One status line: step, loss, tokens/s, ETA, peak memory (redrawn on a terminal)."""

    def __init__(self, total: int, stream=None, every: int = 1):
        stream = stream or sys.stderr  # looked up now: CliRunner swaps sys.stderr
        self.total, self.stream, self.every = total, stream, max(every, 1)
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, step: int, loss: float, tps: float, eta_s: float, peak_gb: float):
        if not self.tty and step % self.every and step != self.total:
            return
        width = 20
        done = int(width * step / self.total)
        line = (
            f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} "
            f"loss {loss:.3f} | {tps:.0f} tok/s | eta {_fmt_time(eta_s)} | peak {peak_gb:.2f} GB"
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
) -> TrainState:
    """Train the trainable (adapter) parameters of `model`.

    train_batches(start_step) yields batches from that step on; valid_batches() yields the
    validation set. With run_dir: metrics.jsonl and checkpoints/ go there, and resume=True
    continues from its newest whole checkpoint. `stop` is the flag of stop_requests(): once
    set, the loop checkpoints after the current step and raises Interrupted.
    """
    progress = progress or Progress(cfg.steps, every=cfg.log_every)
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)
    state = TrainState()
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    metrics_path = run_dir / "metrics.jsonl" if run_dir else None
    last_ckpt = None  # the newest checkpoint written or resumed from

    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    if resume:
        ckpt = latest_checkpoint(ckpt_dir, warn=progress.message) if ckpt_dir else None
        if ckpt is None:
            # Stopped before its first checkpoint: the same seed makes a fresh start exact.
            progress.message(f"no whole checkpoint in {ckpt_dir}: starting again from step 0")
            _truncate_metrics(metrics_path, -1)
        else:
            state = load_checkpoint(ckpt, model, optimizer)
            last_ckpt = ckpt
            progress.message(f"resumed from {ckpt} (step {state.step})")
            _truncate_metrics(metrics_path, state.step)

    def write_metrics(record: dict):
        if not metrics_path:
            return
        try:  # appended, not atomic: a line cut short by a crash is dropped on resume
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise TrainingError(
                f"cannot write {metrics_path} ({e.strerror or e}); free some disk space, then "
                "resume from the last checkpoint"
            ) from e

    def run_eval():
        if valid_batches is None:
            return
        val = evaluate(model, valid_batches(), loss_fn)
        pause_for_test("eval", state.step)
        if not math.isfinite(val):
            raise TrainingError(f"validation loss is {val} at step {state.step}")
        state.history.append([state.step, val])
        state.best_val = val if state.best_val is None else min(state.best_val, val)
        write_metrics({"kind": "valid", "step": state.step, "val_loss": val})
        progress.message(f"step {state.step}: validation loss {val:.4f}")

    # The base weights stay fixed: each is dequantized once for the whole run (backend).
    with dequant.keep_dequantized(not cfg.grad_checkpoint):
        loss_and_grad = nn.value_and_grad(model, loss_fn)
        batches = train_batches(state.step * cfg.grad_accum)
        if state.step == 0 and valid_batches is not None and cfg.eval_every > 0:
            run_eval()

        while state.step < cfg.steps:
            tic = time.perf_counter()
            mx.random.seed(step_seed(cfg.seed, state.step))
            grads_sum, loss_sum, ntok_sum, step_tokens = None, 0.0, 0, 0
            for _ in range(cfg.grad_accum):
                args, ntok_in = loss_inputs(model, loss_fn, *next(batches)[:3])
                loss, grads, n = summed_loss_and_grad(loss_and_grad, model, args)
                if n == 0:
                    continue
                step_tokens += ntok_in
                grads_sum = grads if grads_sum is None else tree_add(grads_sum, grads)
                loss_sum = loss + loss_sum
                ntok_sum += n
                if cfg.grad_accum > 1:  # else evaluated in one graph with the update, below
                    mx.eval(grads_sum, loss_sum)
            if grads_sum is None:
                raise TrainingError(f"step {state.step + 1}: no batch carried any loss token")
            grads = tree_map_scale(grads_sum, 1.0 / ntok_sum)
            loss = loss_sum / ntok_sum
            pause_for_test("step", state.step + 1)
            if cfg.max_grad_norm:
                grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            else:
                gnorm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
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
            write_metrics(
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
                }
            )
            progress.step(state.step, loss_v, tps, eta, peak)
            last = state.step == cfg.steps
            if valid_batches is not None and (last or (cfg.eval_every > 0 and state.step % cfg.eval_every == 0)):
                run_eval()
            if ckpt_dir and ((cfg.save_every > 0 and state.step % cfg.save_every == 0) or last):
                path = last_ckpt = save_checkpoint(ckpt_dir, model, optimizer, state, cfg.keep_checkpoints)
                if on_checkpoint:
                    on_checkpoint(path)
            if stop and stop["signal"] and not last:
                if ckpt_dir and last_ckpt != ckpt_dir / f"step_{state.step:06d}":
                    last_ckpt = save_checkpoint(ckpt_dir, model, optimizer, state, cfg.keep_checkpoints)
                raise Interrupted(stop["signal"], state.step, last_ckpt if ckpt_dir else None)
        return state


def _input_tokens(mask: mx.array) -> int:
    """Input tokens of a batch without the padding after each sequence's last loss token."""
    m = np.asarray(mask)
    last = np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1] > 0, axis=1), 0)
    return int(last.sum())


def tree_map_scale(tree, s):
    return tree_map(lambda g: g * s, tree)


def tree_add(a, b):
    return tree_map(lambda x, y: x + y, a, b)


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
