"""The Apple Silicon path, run where there is no Apple Silicon.

EDGEFT_COMPUTE_PATH=gpu (edgeft/device.py) makes edgeft compute as it does on Metal, on MLX's
CPU: quantized layers through mx.quantized_matmul, padded batches, MLX's own ops, one stream.
A tiny 8-bit model goes through that path from end to end in real `edgeft` processes: `tune`
stopped by Ctrl-C at step 3 and `--resume`d, `export`, and `verify` (llama.cpp runs the file).
Its losses must equal those of the same run on the CPU path within RTOL: both paths compute
the same maths, in another order and rounding (quantized_matmul against dequantize + matmul,
padded against packed batches). Nothing here measures or implies speed on Metal.

    python -m pytest -q tests/test_gpu_path.py
"""

import json
import signal

import numpy as np
import pytest
from test_reliability import (
    adapters_of,
    edgeft,
    env_for,
    max_difference,
    start_paused,
    train_steps,
    write_chats,
)
from tiny import make_tiny

STEPS = 4
# --matmul fp32: the CPU path's products as the GPU path's, in fp32. With bf16 products (auto, on
# a CPU with AMX) the forward differs by the inputs' rounding, ~4e-5 here: tests/test_trainer.py
# holds that to its own tolerance.
ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--eval-every", "2", "--save-every", "2",
        "--learning-rate", "5e-3", "--warmup-steps", "2", "--seed", "3", "--no-export", "--no-eval",
        "--matmul", "fp32"]
# Relative differences between the paths' losses, measured on this run with --seed 1, 3, 5, 7,
# 11 and 42: at most 8.9e-6 before the first update (the validation loss at step 0, the train
# loss of step 1): the forward's rounding alone. After it, up to 9.2e-5 (validation at step 4):
# AdamW turns gradients that differ in their last bits into steps that differ by more, so the
# adapters drift apart a little each step. Both tolerances leave a factor ~3.
FORWARD_RTOL = 3e-5
RTOL = 2.5e-4


def on_path(root, path: str) -> dict:
    """The environment of an `edgeft` process computing on `path` ("auto" is the CPU path here)."""
    return env_for(root, EDGEFT_COMPUTE_PATH=path)


def losses(run_dir) -> dict[tuple[str, int], float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r["loss" if r["kind"] == "train" else "val_loss"] for r in recs}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 8-bit GGUF and chats; the same run done straight on the CPU path and on the GPU
    path, and once more on the GPU path stopped by Ctrl-C at step 3, then resumed."""
    root = tmp_path_factory.mktemp("gpu_path")
    (root / "model").mkdir()
    model, _, _ = make_tiny("llama", root / "model", "q8_0", tie=False)  # untied: see test_export
    data = write_chats(root / "chats.jsonl")
    runs = root / "runs"
    base = ["tune", "--data", str(data), "--model", str(model), *ARGS, "--runs-dir", str(runs)]
    for name, path in (("cpu", "auto"), ("gpu", "gpu")):
        r = edgeft([*base, "--name", name], root, on_path(root, path))
        assert r.returncode == 0, r.stderr

    with pytest.MonkeyPatch.context() as mp:  # start_paused passes this process's environment on
        mp.setenv("EDGEFT_COMPUTE_PATH", "gpu")
        proc, marker = start_paused([*base, "--name", "gpu-resumed"], root, root, "step:3")
    proc.send_signal(signal.SIGINT)
    marker.unlink()  # let step 3 finish: its checkpoint is saved, then the process stops
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    resumed = runs / "gpu-resumed"
    assert f"stopped after step 3; checkpoint {resumed / 'checkpoints' / 'step_000003'} saved" in err
    r = edgeft(["tune", "--resume", "--name", "gpu-resumed", "--runs-dir", str(runs)], root, on_path(root, "gpu"))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {resumed / 'checkpoints' / 'step_000003'}" in r.stdout + r.stderr
    return {"root": root, "runs": runs, "model": model, "data": data}


def test_the_gpu_path_is_taken(world):
    """The memory plan a run writes models the path it computed on: no dequantized copies and
    padded batches on the GPU path."""
    plans = {name: json.loads((world["runs"] / name / "memory_plan.json").read_text()) for name in ("cpu", "gpu")}
    assert plans["cpu"]["dequantized"] > 0 and plans["gpu"]["dequantized"] == 0
    assert plans["gpu"]["tokens"] == plans["gpu"]["batch_size"] * plans["gpu"]["seq_len"] > plans["cpu"]["tokens"]


def test_a_stopped_and_resumed_gpu_path_run_equals_the_straight_one(world):
    runs = world["runs"]
    assert train_steps(runs / "gpu-resumed") == list(range(1, STEPS + 1))
    assert losses(runs / "gpu-resumed") == losses(runs / "gpu")
    diff = max_difference(adapters_of(runs / "gpu-resumed"), adapters_of(runs / "gpu"))
    assert diff == 0.0, f"resumed adapters differ from the uninterrupted run by {diff}"


def test_gpu_path_losses_equal_the_cpu_paths_within_rtol(world):
    cpu, gpu = losses(world["runs"] / "cpu"), losses(world["runs"] / "gpu-resumed")
    assert cpu.keys() == gpu.keys() and len(cpu) == STEPS + STEPS // 2 + 2  # + evaluations at steps 0, 2, 4, the adapters kept
    keys = sorted(cpu)
    want, got = np.array([cpu[k] for k in keys]), np.array([gpu[k] for k in keys])
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"losses at {keys}")
    first = [("valid", 0), ("train", 1)]
    np.testing.assert_allclose([gpu[k] for k in first], [cpu[k] for k in first], rtol=FORWARD_RTOL)
    assert not np.array_equal(got, want)  # bit-equal would mean the CPU path ran twice


def test_a_gpu_path_run_exports_and_runs_in_llama_cpp(world):
    root, run_dir = world["root"], world["runs"] / "gpu-resumed"
    env = on_path(root, "gpu")
    r = edgeft(["export", str(run_dir), "--quant", "q8_0", "--no-verify"], root, env)
    assert r.returncode == 0, r.stderr
    gguf = run_dir / "export" / "gpu-resumed-q8_0.gguf"
    assert gguf.exists()
    r = edgeft(["verify", str(gguf)], root, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: top-1 agreement" in r.stdout


def test_an_unknown_compute_path_is_one_clear_line(world):
    root = world["root"]
    r = edgeft(["tune", "--data", str(world["data"]), "--model", str(world["model"]), *ARGS,
                "--name", "metal", "--runs-dir", str(root / "runs")], root, on_path(root, "metal"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: EDGEFT_COMPUTE_PATH='metal' is not a compute path; set it to gpu (compute as on Apple "
        "Silicon's GPU, on any device) or auto, or unset it"
    ]
