"""Nothing lost, nothing let in: a real `edgeft tune` process killed or interrupted at exact
moments resumes to the same adapters as a run never stopped; broken checkpoints, NaN losses,
hostile names and hostile model files end in one clear line.

The exact moments come from tests/paused_edgeft.py, which runs the CLI with the functions
called at those moments wrapped: at point:step the process writes a marker file and waits there
until the file is deleted, so the test can SIGKILL (or SIGINT) it at that point and nowhere else:
  step:N        step N's gradients are computed, the optimizer has not stepped
  checkpoint:N  checkpoint N is half written (adapters in its temporary folder, nothing else)
  eval:N        the validation loss of step N is computed, not yet recorded
  adapters:N    training finished (final checkpoint N written), final adapters not yet saved

    python -m pytest -q tests/test_reliability.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny

from edgeft.cli import main

STEPS = 6
# Dropout on: a resumed run must also restore the random stream, not only the weights.
ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--eval-every", "2", "--save-every", "2",
        "--lora-dropout", "0.1", "--learning-rate", "5e-3", "--warmup-steps", "2", "--seed", "3",
        "--no-export", "--no-eval"]


def write_chats(path, n=12):
    rows = [{"messages": [{"role": "user", "content": f"question {i} about tea"},
                          {"role": "assistant", "content": f"answer {i}: the tea is good."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAUSED = Path(__file__).resolve().parent / "paused_edgeft.py"


def env_for(home: Path, **extra) -> dict:
    return {**os.environ, "EDGEFT_HOME": str(home / "home"), "HF_HUB_OFFLINE": "1", **extra}


def edgeft(args, cwd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def start_paused(args, cwd, home, at: str) -> tuple[subprocess.Popen, Path]:
    """Start `edgeft ...` that will stop at `at`; return once it is waiting there."""
    marker = home / f"paused-{at.replace(':', '-')}"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(PAUSED), at, str(marker), *args], cwd=cwd, env=env_for(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"edgeft exited ({proc.returncode}) before reaching {at}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"edgeft never reached {at}")
        time.sleep(0.02)
    return proc, marker


def adapters_of(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters" / "adapters.safetensors")).items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def train_steps(run_dir: Path) -> list[int]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GGUF, chats, and the adapters of one uninterrupted run (the reference)."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "model").mkdir()
    model, _, _ = make_tiny("llama", root / "model", "q8_0")
    data = write_chats(root / "chats.jsonl")
    base = ["tune", "--data", str(data), "--model", str(model), *ARGS, "--runs-dir", str(root / "runs")]
    r = edgeft([*base, "--name", "straight"], root, env_for(root))
    assert r.returncode == 0, r.stderr
    straight = root / "runs" / "straight"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    return {"root": root, "base": base, "model": model, "data": data, "ref": adapters_of(straight)}


def resume(world, name) -> subprocess.CompletedProcess:
    r = edgeft(["tune", "--resume", "--name", name, "--runs-dir", str(world["root"] / "runs")],
               world["root"], env_for(world["root"]))
    assert r.returncode == 0, r.stderr
    return r


# (where the process dies, the checkpoint the resumed run starts from; None: from scratch)
KILLS = [
    ("step:1", None),          # before any checkpoint: starts again from step 0
    ("step:3", "step_000002"),  # mid-step
    ("eval:4", "step_000002"),  # mid-evaluation, just before checkpoint 4
    ("checkpoint:4", "step_000002"),  # checkpoint 4 half written
    ("adapters:6", "step_000006"),  # training done, final adapters not written
]


@pytest.mark.parametrize("at, resumed_from", KILLS)
def test_sigkill_then_resume_equals_the_uninterrupted_run(world, at, resumed_from):
    name = f"kill-{at.replace(':', '-')}"
    run_dir = world["root"] / "runs" / name
    proc, _ = start_paused([*world["base"], "--name", name], world["root"], world["root"], at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "adapters").exists()
    if at.startswith("checkpoint"):  # the half-written checkpoint never looks like one
        assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_000002"]
    r = resume(world, name)
    if resumed_from:
        assert f"resumed from {run_dir / 'checkpoints' / resumed_from}" in r.stderr + r.stdout
    else:
        assert "starting again from step 0" in r.stderr + r.stdout
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # no stale temporaries
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    diff = max_difference(adapters_of(run_dir), world["ref"])
    assert diff == 0.0, f"resumed adapters differ from the uninterrupted run by {diff}"


def test_three_kills_in_one_run_still_give_the_same_adapters(world):
    name = "thrice"
    run_dir = world["root"] / "runs" / name
    proc, _ = start_paused([*world["base"], "--name", name], world["root"], world["root"], "step:2")
    proc.kill(), proc.communicate()
    resume_args = ["tune", "--resume", "--name", name, "--runs-dir", str(world["root"] / "runs")]
    for at in ("checkpoint:4", "eval:6"):
        proc, _ = start_paused(resume_args, world["root"], world["root"], at)
        proc.kill(), proc.communicate()
    resume(world, name)
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert max_difference(adapters_of(run_dir), world["ref"]) == 0.0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(world, sig, code):
    name = f"stop-{sig.name}"
    runs = world["root"] / "runs"
    proc, marker = start_paused([*world["base"], "--name", name], world["root"], world["root"], "step:3")
    proc.send_signal(sig)
    time.sleep(0.1)
    marker.unlink()  # let step 3 finish
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    command = f"edgeft tune --resume --name {name} --runs-dir {runs}"
    assert f"resume with: {command}" in err
    assert f"{sig.name}: stopped after step 3; checkpoint {runs / name / 'checkpoints' / 'step_000003'} saved" in err
    assert "Traceback" not in err
    r = edgeft(command.split()[1:], world["root"], env_for(world["root"]))
    assert r.returncode == 0, r.stderr
    assert "step_000003" in r.stderr + r.stdout
    assert max_difference(adapters_of(runs / name), world["ref"]) == 0.0


def test_second_ctrl_c_stops_at_once_and_the_run_still_resumes(world):
    name = "twice"
    runs = world["root"] / "runs"
    proc, _ = start_paused([*world["base"], "--name", name], world["root"], world["root"], "step:3")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"edgeft tune --resume --name {name} --runs-dir {runs}" in err
    resume(world, name)
    assert max_difference(adapters_of(runs / name), world["ref"]) == 0.0


def test_a_full_disk_mid_checkpoint_leaves_no_partial_checkpoint_and_the_run_resumes(world):
    """RLIMIT_FSIZE makes any file over 100 kB fail to write (EFBIG), as a full disk would:
    the optimizer state of the first checkpoint cannot be written."""
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing

    name = "full"
    run_dir = world["root"] / "runs" / name
    r = edgeft([*world["base"], "--name", name], world["root"], env_for(world["root"]), preexec_fn=small_disk)
    assert r.returncode == 1, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: cannot write checkpoint step 2 in {run_dir / 'checkpoints'} (write failed, is the disk full?")
    assert "free some disk space, then resume" in error
    assert not list((run_dir / "checkpoints").iterdir())  # nothing partial, no temporaries
    resume(world, name)
    assert max_difference(adapters_of(run_dir), world["ref"]) == 0.0


# --- broken checkpoints, NaN, one-line errors (in-process CLI) ---------------------------------
def cli(args):
    return CliRunner().invoke(main, args)


def test_a_checkpoint_failing_its_checksum_is_skipped_for_the_one_before(world, home):
    runs = home / "runs"
    r = cli([*world["base"][:-1], str(runs), "--name", "c"])
    assert r.exit_code == 0, r.output
    run_dir = runs / "c"
    bad = run_dir / "checkpoints" / "step_000006" / "adapters.safetensors"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the weights: the file still parses
    bad.write_bytes(bytes(data))
    (run_dir / "adapters" / "adapters.safetensors").unlink()
    r = cli(["tune", "--resume", "--name", "c", "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    assert f"skipping checkpoint {bad.parent}: adapters.safetensors fails its checksum" in r.output
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000004'}" in r.output
    assert max_difference(adapters_of(run_dir), world["ref"]) == 0.0


def test_nan_loss_stops_with_one_line_and_keeps_only_good_state(world, home):
    runs = home / "runs"
    args = ["tune", "--data", str(world["data"]), "--model", str(world["model"]), "--steps", "8",
            "--batch-size", "2", "--eval-every", "0", "--save-every", "1", "--warmup-steps", "0",
            "--learning-rate", "1e30", "--no-export", "--name", "nan", "--runs-dir", str(runs)]
    r = cli(args)
    assert r.exit_code == 1, r.output
    error = r.output.strip().splitlines()[-1]
    assert error.startswith("Error: step ") and "is not finite" in error and "lower learning rate" in error
    bad_step = int(error.split()[2].rstrip(":"))
    run_dir = runs / "nan"
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept and int(kept[-1][5:]) == bad_step - 1
    assert f"the last good checkpoint, {run_dir / 'checkpoints' / kept[-1]}, is kept" in error
    assert max(train_steps(run_dir)) == bad_step - 1  # the bad step left no metrics line
    assert not (run_dir / "adapters").exists()
    for ckpt in kept:
        state = json.loads((run_dir / "checkpoints" / ckpt / "state.json").read_text())
        assert state["step"] < bad_step


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil-edgeft", ".hidden", "a/b", "a\\b", "x" * 101, "..", "a\0b"])
def test_run_names_cannot_leave_the_runs_folder(world, home, name):
    for extra in ([], ["--resume"]):
        r = cli(["tune", "--data", str(world["data"]), "--model", str(world["model"]), "--steps", "1",
                 "--no-export", "--name", name, "--runs-dir", str(home / "runs"), *extra])
        assert r.exit_code != 0 and "run name" in r.output, r.output
        assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output
    assert not (home / "runs").exists() and not (home / "evil").exists()
    assert not Path("/tmp/evil-edgeft").exists()


@pytest.mark.parametrize("spec", ["org/../../evil", "../../outside/x", "evil/..", "a/b:../../x.gguf",
                                  "/abs/../x.gguf", "a/b:..", "~/../../x"])
def test_model_names_cannot_reach_outside_the_cache(world, home, spec):
    cache = home / "home"
    r = cli(["tune", "--data", str(world["data"]), "--model", spec, "--steps", "1", "--no-export",
             "--name", "m", "--runs-dir", str(home / "runs")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.strip().count("\n") == 0, r.output
    assert not [p for p in home.rglob("*") if p.name in ("evil", "outside", "x.gguf")]
    assert not (home.parent / "evil").exists() and not (home.parent / "outside").exists()
    assert not cache.exists() or all(p.resolve().is_relative_to(cache.resolve()) for p in cache.rglob("*"))


def test_no_pickle_no_remote_code_anywhere_in_the_package():
    """Model files are data, never code: no unpickling, no torch.load, no trust_remote_code."""
    package = Path(__file__).resolve().parent.parent / "edgeft"
    forbidden = ("import pickle", "pickle.load", "torch.load", "trust_remote_code=True", "allow_pickle=True",
                 "cloudpickle", "import dill", "joblib.load", "import marshal", "eval(compile", "exec(")
    hits = []
    for f in sorted(package.rglob("*.py")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            hits += [f"{f.name}:{n}: {line.strip()}" for word in forbidden if word in code]
    assert not hits, "\n".join(hits)
