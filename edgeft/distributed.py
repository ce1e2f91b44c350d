"""Data-parallel training over MLX's own distributed engine: the one module that talks to
mx.distributed. Started by mlx.launch (ring backend over TCP, JACCL, MPI), every rank runs the
same `edgeft tune`; this module gives each its place (World), the rows of a step it computes,
the one all_sum per step that adds the ranks' gradients, losses and token counts, the
checkpoint broadcast on resume, the check that every rank started from the same data, config
and model, and the watchdog that stops a rank whose peers are gone.

    mlx.launch -n 2 --backend ring -- edgeft tune --data chats.jsonl
    mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- edgeft tune --data chats.jsonl

Started alone (no launcher), World is one rank and nothing here exchanges anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from edgeft.batches import packed_lengths
from edgeft.errors import UserError
from edgeft.files import sha256_file


class DistributedError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class World:
    group: object | None
    rank: int = 0
    size: int = 1
    local_ranks: int = 1  # ranks on this machine (they share its cores)

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that reads and writes the run folder."""
        return self.rank == 0

    def cores(self) -> int:
        """This rank's share of the machine's cores."""
        return max(1, (os.cpu_count() or 1) // max(self.local_ranks, 1))


SINGLE = World(None)
_world: World | None = None


def init() -> World:
    """The world this process belongs to: mx.distributed.init() as mlx-lm's trainer calls it
    (a group of one when no launcher started us); once per process."""
    global _world
    if _world is None:
        group = mx.distributed.init()
        if group.size() == 1:
            _world = SINGLE
        else:
            w = World(group, group.rank(), group.size())
            host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:4], "little") >> 1
            hosts = gather(w, [host])[:, 0]
            _world = World(group, w.rank, w.size, int((hosts == host).sum()))
            _yield_launcher()
    return _world


def _yield_launcher() -> None:
    """Give the cores back to training: mlx.launch (MLX 0.32) relays the ranks' output in loops
    that never sleep (select() on their stdin pipes, always writable), ~0.8 core on the machine
    it runs on, which halved a 2-rank step on 2 cores (scripts/bench_distributed.py). It only
    copies text, so the ranks it started lower its priority to the least (nice 19; Linux sets
    nice per thread). Anything else as parent, or no right to, is left alone."""
    ppid = os.getppid()
    try:
        if sys.platform == "linux":
            if b"mlx.launch" not in Path(f"/proc/{ppid}/cmdline").read_bytes():
                return
            for tid in os.listdir(f"/proc/{ppid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), 19)
        elif sys.platform == "darwin":
            import subprocess

            command = subprocess.run(["ps", "-o", "command=", "-p", str(ppid)], capture_output=True, text=True).stdout
            if "mlx.launch" in command:
                os.setpriority(os.PRIO_PROCESS, ppid, 19)
    except OSError:
        pass


def gather(world: World, values: list[int]) -> np.ndarray:
    """[size, len(values)]: every rank's int32 values, row r from rank r."""
    x = mx.array(np.asarray(values, dtype=np.int32)[None])
    return np.array(mx.distributed.all_gather(x, group=world.group, stream=mx.cpu))


# ---------------------------------------------------------------------------------------------
# Refusing ranks that did not start alike


def check_same_start(world: World, digests: dict[str, str]) -> None:
    """Refuse (on every rank) a start where some rank's digests differ from rank 0's.
    digests: {what: sha256 hex}, e.g. {"data file": ..., "config": ..., "model": ...}."""
    if world.size == 1:
        return
    words = [int.from_bytes(bytes.fromhex(h)[i : i + 4], "little") >> 1 for h in digests.values() for i in (0, 4)]
    table = gather(world, words)
    for r in range(1, world.size):
        for k, what in enumerate(digests):
            if (table[r, 2 * k : 2 * k + 2] != table[0, 2 * k : 2 * k + 2]).any():
                raise DistributedError(
                    f"rank {r} was started with a different {what} than rank 0; every rank must "
                    "start from the same data file, config and model (copy them to every machine)"
                )


def files_digest(paths) -> str:
    """sha256 over the contents of these files (a folder: its files, by name); None skipped."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def config_digest(cfg_dict: dict) -> str:
    """The config as the ranks must share it: file paths left out (their contents are compared
    on their own, and may live elsewhere on each machine)."""
    d = {k: dict(v) for k, v in cfg_dict.items()}
    for section, key in (("data", "train"), ("data", "valid"), ("model", "name")):
        d.get(section, {}).pop(key, None)
    return hashlib.sha256(repr(sorted((k, sorted(v.items())) for k, v in d.items())).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# A step over the ranks


def my_rows(micro_batches: list[tuple], world: World) -> list[tuple]:
    """This rank's part of one optimizer step: the rows of the step's micro-batches (every rank
    draws the same ones) dealt to the ranks longest first into the lightest (packed tokens),
    kept in their micro-batch; micro-batches left without a row of this rank are dropped."""
    if world.size == 1:
        return micro_batches
    rows = [(k, i, int(n)) for k, b in enumerate(micro_batches) for i, n in enumerate(packed_lengths(b[2]))]
    load, owner = [0] * world.size, {}
    for k, i, n in sorted(rows, key=lambda t: (-t[2], t[0], t[1])):
        r = min(range(world.size), key=lambda j: (load[j], j))
        load[r] += n
        owner[k, i] = r
    out = []
    for k, b in enumerate(micro_batches):
        mine = [i for i in range(b[0].shape[0]) if owner[k, i] == world.rank]
        if mine:
            sel = mx.array(mine)
            out.append(tuple(a[sel] for a in b[:3]))
    return out


def sum_step(world: World, grads: dict, scalars: list, what: str,
             timeout_s: float) -> tuple[dict, list[float], float]:
    """One all_sum over the ranks of a step's token-summed gradients (a tree shaped like the
    adapters) and its scalars, packed into one float32 buffer (one exchange, not one per
    tensor). Returns the summed tree, the summed scalars as floats, and the seconds this rank
    spent in the exchange (waiting for the slowest rank included)."""
    flat = tree_flatten(grads)
    parts = [g.astype(mx.float32).reshape(-1) for _, g in flat]
    parts.append(mx.stack([s.astype(mx.float32).reshape(()) if isinstance(s, mx.array)
                           else mx.array(float(s), dtype=mx.float32) for s in scalars]))
    buf = mx.concatenate(parts)
    mx.eval(buf)  # this rank's work done before the watchdog starts counting
    tic = time.perf_counter()
    total = exchange(world, buf, what, timeout_s)
    waited = time.perf_counter() - tic
    out, at = [], 0
    for name, g in flat:
        out.append((name, total[at : at + g.size].reshape(g.shape).astype(g.dtype)))
        at += g.size
    return tree_unflatten(out), total[at:].tolist(), waited


def sum_floats(world: World, values: list[float], what: str, timeout_s: float) -> list[float]:
    if world.size == 1:
        return list(values)
    return exchange(world, mx.array(values, dtype=mx.float32), what, timeout_s).tolist()


def exchange(world: World, buf: mx.array, what: str, timeout_s: float) -> mx.array:
    """all_sum of buf over the ranks, evaluated under the watchdog; a peer lost on the way is
    one DistributedError naming it."""
    total = mx.distributed.all_sum(buf, group=world.group, stream=mx.cpu)
    with watchdog(world, what, timeout_s):
        try:
            mx.eval(total)
        except RuntimeError as e:
            raise DistributedError(f"rank {world.rank}: {peers_of(world)} stopped answering during "
                                   f"{what} ({str(e).strip()})") from None
    return total


def peers_of(world: World) -> str:
    """The ranks a ring neighbour's failure points at, as words."""
    near = sorted({(world.rank - 1) % world.size, (world.rank + 1) % world.size} - {world.rank})
    return " or ".join(f"rank {r}" for r in near)


@contextlib.contextmanager
def watchdog(world: World, what: str, timeout_s: float):
    """While within: if the exchange has not finished after timeout_s (a peer frozen or a link
    gone without closing its connection), write one line naming the peers and end the process
    (exit 75). Checkpoints are written whole or not at all, so the newest one stays usable."""
    done = threading.Event()

    def fire():
        if not done.wait(timeout_s):
            os.write(2, (f"\nrank {world.rank}: no answer from {peers_of(world)} for {timeout_s:g} s "
                         f"during {what}; stopping (the last checkpoint is whole)\n").encode())
            sys.stderr.flush()
            os._exit(75)

    t = threading.Thread(target=fire, daemon=True, name="edgeft-watchdog")
    t.start()
    try:
        yield
    finally:
        done.set()


# ---------------------------------------------------------------------------------------------
# Resume


def share_state(world: World, model, optimizer, step: int, timeout_s: float) -> int:
    """Give every rank rank 0's adapters and optimizer state (rank 0 alone read the checkpoint;
    the others may be on machines without the run folder). Returns rank 0's step."""
    if world.size == 1:
        return step
    step = int(sum_floats(world, [step if world.main else 0], "the resume exchange", timeout_s)[0])
    if step == 0:
        return 0
    if not world.main:
        optimizer.init(model.trainable_parameters())
    tensors = sorted(tree_flatten(model.trainable_parameters())) + sorted(tree_flatten(optimizer.state))
    zero = 1.0 if world.main else 0.0
    buf = mx.concatenate([mx.array(v).astype(mx.float32).reshape(-1) * zero for _, v in tensors])
    total = exchange(world, buf, "the resume exchange", timeout_s)
    params, opt, at = [], [], 0
    n_params = len(tree_flatten(model.trainable_parameters()))
    for k, (name, v) in enumerate(tensors):
        v = mx.array(v)
        value = total[at : at + v.size].reshape(v.shape).astype(v.dtype)
        at += v.size
        (params if k < n_params else opt).append((name, value))
    model.load_weights(params, strict=False)
    optimizer.state = tree_unflatten(opt)
    mx.eval(model.parameters(), optimizer.state)
    return step
