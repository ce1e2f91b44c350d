"""Data-parallel training (edgeft.distributed) as users start it: `mlx.launch -n 2 --backend
ring` on loopback (127.0.0.1 only) around real `edgeft tune` processes on a tiny model, every
launch bounded by a subprocess timeout.

  - 2 ranks give the adapters of 1 rank with the same global batch (within EQUAL_TOL);
  - a rank SIGKILLed mid-run stops the other within a bounded time with one line naming it,
    the last checkpoint stays whole, and the run resumes on 2 ranks to the adapters of the
    uninterrupted 2-rank run (bitwise here; within EQUAL_TOL asserted);
  - Ctrl-C on the launcher checkpoints on both ranks' agreement, and the run resumes on 1 rank
    keeping the global batch (and saying so) to the same adapters;
  - ranks started with different data are refused at start.

    python -m pytest -q tests/test_distributed.py
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_reliability import PAUSED, adapters_of, env_for, max_difference, write_chats
from tiny import make_tiny

# Summation order differs between 1 and 2 ranks (and 2 ranks resumed on 1): measured 0 on
# this tiny model (the float32 sums happened to round alike); allowed: well under 1e-3 of the
# adapters' largest value (~0.2).
EQUAL_TOL = 1e-5
STEPS = 6
ARGS = ["--steps", str(STEPS), "--batch-size", "4", "--eval-every", "2", "--save-every", "2",
        "--learning-rate", "5e-3", "--warmup-steps", "2", "--seed", "3", "--no-export", "--no-eval"]
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring"]
EDGEFT = [sys.executable, "-m", "edgeft.cli"]


def port(k: int) -> list[str]:
    """A starting port of its own for each launch, so a socket left in TIME_WAIT by the one
    before cannot refuse the next."""
    return ["--starting-port", str(33000 + 10 * k + (os.getpid() % 500) * 20)]


def launch(k, cmd, root, timeout=120, **kw):
    return subprocess.run([*LAUNCH, *port(k), "--", *cmd], cwd=root, env=env_for(root), capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if shutil.which("mlx.launch", path=str(BIN)) is None:
        pytest.skip("mlx.launch is not installed")
    root = tmp_path_factory.mktemp("distributed")
    model, _, _ = make_tiny("llama", root, "q8_0")
    data = write_chats(root / "chats.jsonl")
    base = ["tune", "--data", str(data), "--model", str(model), *ARGS, "--runs-dir", str(root / "runs")]
    one = subprocess.run([*EDGEFT, *base, "--name", "one"], cwd=root, env=env_for(root), capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = launch(0, [*EDGEFT, *base, "--name", "two"], root)
    assert two.returncode == 0, two.stdout + two.stderr
    return {"root": root, "base": base, "one": adapters_of(root / "runs" / "one"), "two": two,
            "two_adapters": adapters_of(root / "runs" / "two")}


def test_two_ranks_give_the_adapters_of_one_rank_with_the_same_global_batch(world):
    assert max_difference(world["one"], world["two_adapters"]) <= EQUAL_TOL
    out = world["two"].stdout + world["two"].stderr
    assert "2 ranks (2 on this machine, 1 core(s) each)" in out
    assert "tok/s on 2 ranks" in out
    assert out.count("done: 6 steps") == 1  # rank 1 prints nothing of its own
    # rank 0 alone writes the run folder: the same files and metrics lines as the 1-rank run
    runs = world["root"] / "runs"
    listing = [sorted(str(p.relative_to(runs / n)) for p in (runs / n).rglob("*")) for n in ("one", "two")]
    assert listing[0] == listing[1]
    lines = [len((runs / n / "metrics.jsonl").read_text().splitlines()) for n in ("one", "two")]
    assert lines[0] == lines[1] == STEPS + 5  # 6 train lines, validations at steps 0, 2, 4, 6, the adapters kept


def test_a_killed_rank_stops_the_other_in_bounded_time_and_the_run_resumes(world):
    root, runs = world["root"], world["root"] / "runs"
    marker = root / "paused-{rank}"
    cmd = [sys.executable, str(PAUSED), "step:3", str(marker), *world["base"], "--name", "killed"]
    proc = subprocess.Popen([*LAUNCH, *port(1), "--", *cmd], cwd=root, env=env_for(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (root / "paused-0").exists() or not (root / "paused-1").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(int((root / "paused-1").read_text().split()[1]), signal.SIGKILL)
        killed_at = time.monotonic()
        (root / "paused-0").unlink()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - killed_at < 30  # no hang: the launcher is done within 30 s
    # (mlx.launch itself exits 0 whatever its ranks did: the ranks' lines are what tells)
    assert "Node with rank 1 exited with code -9" in err
    lines = [l for l in err.splitlines() if "rank 1 stopped answering" in l]
    assert len(lines) == 1 and "step_000002, is whole" in lines[0], err
    ckpts = sorted(p.name for p in (runs / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]  # whole, no partial folder left
    r = launch(2, [*EDGEFT, "tune", "--resume", "--name", "killed", "--runs-dir", str(runs)], root)
    assert r.returncode == 0, r.stderr
    assert max_difference(world["two_adapters"], adapters_of(runs / "killed")) <= EQUAL_TOL


def test_ctrl_c_on_the_launcher_checkpoints_and_the_run_resumes(world):
    root, runs = world["root"], world["root"] / "runs"
    marker = root / "ctrl-c-{rank}"
    cmd = [sys.executable, str(PAUSED), "step:3", str(marker), *world["base"], "--name", "ctrl-c"]
    # stdin a pipe left open, as a terminal's: on /dev/null mlx.launch (MLX 0.32) relays stdin in
    # a loop that never waits, and a SIGINT landing while that loop holds one of its output
    # queues' locks ends its main thread with the lock held: the relay threads block on it and
    # the launcher never exits (5 launches of 60 in a stand-in with busy ranks; none of 70 so).
    proc = subprocess.Popen([*LAUNCH, *port(3), "--", *cmd], cwd=root, env=env_for(root), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (root / "ctrl-c-0").exists() or not (root / "ctrl-c-1").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        time.sleep(0.3)
        (root / "ctrl-c-0").unlink()
        (root / "ctrl-c-1").unlink()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert sorted(p.name for p in (runs / "ctrl-c" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    # resumed on 1 rank: the global batch stays, and the run says so
    r = subprocess.run([*EDGEFT, "tune", "--resume", "--name", "ctrl-c", "--runs-dir", str(runs)],
                       cwd=root, env=env_for(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "the run went on 2 rank(s) and now goes on 1: the global batch stays 4 x 1" in r.stdout + r.stderr
    assert max_difference(world["two_adapters"], adapters_of(runs / "ctrl-c")) <= EQUAL_TOL


def test_ranks_started_with_different_data_are_refused_at_start(world):
    root = world["root"]
    write_chats(root / "chats0.jsonl")
    write_chats(root / "chats1.jsonl", n=13)
    base = [a if a != str(root / "chats.jsonl") else "chats$MLX_RANK.jsonl" for a in world["base"]]
    script = " ".join([*EDGEFT, *base, "--name", "mixed"])
    r = launch(5, ["bash", "-c", script], root, timeout=90)
    assert "rank 1 was started with a different data file than rank 0" in r.stderr
    assert not (root / "runs" / "mixed" / "config.json").exists()


def test_each_row_of_a_step_goes_to_exactly_one_rank_and_the_load_is_even():
    import numpy as np

    from edgeft.distributed import World, my_rows

    rng = np.random.default_rng(0)
    micro = []
    for _ in range(3):  # grad_accum 3 x batch 4, loss masks of varied lengths
        mask = np.zeros((4, 40), dtype=np.float32)
        for b in range(4):
            mask[b, 2 : int(rng.integers(5, 40))] = 1
        ids = np.arange(12 * 40).reshape(12, 40)[len(micro) * 4 : len(micro) * 4 + 4]
        micro.append((mx.array(ids), mx.array(ids), mx.array(mask)))
    shares = [my_rows(micro, World(None, r, 2)) for r in range(2)]
    seen = sorted(int(b[0][i, 0].item()) for share in shares for b in share for i in range(b[0].shape[0]))
    assert seen == sorted(int(b[0][i, 0].item()) for b in micro for i in range(4))
    loads = [sum(float(b[2].sum().item()) for b in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 40
    assert my_rows(micro, World(None)) is micro  # one rank: the step as it was


def test_the_watchdog_ends_a_rank_left_waiting_with_one_line():
    code = ("import time; from edgeft.distributed import World, watchdog\n"
            "with watchdog(World(None, 0, 2), 'the gradient exchange of step 4', 0.5):\n"
            "    time.sleep(30)\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 75 and time.monotonic() - t < 20
    assert r.stderr.strip() == ("rank 0: no answer from rank 1 for 0.5 s during the gradient exchange of step 4; "
                                "stopping (the last checkpoint is whole)")
