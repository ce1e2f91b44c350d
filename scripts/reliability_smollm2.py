"""The README's by-hand Reliability figures on the real SmolLM2-135M (too slow for the tests).

    python scripts/reliability_smollm2.py kill    # SIGKILL 3 times, resume, compare (~7 min on 2 cores)
    python scripts/reliability_smollm2.py plan    # estimate vs measured peak, 4 batch shapes (~5 min)

kill: one uninterrupted `edgeft tune` (6 steps, LoRA dropout on) and one killed mid-step 3,
mid-checkpoint 4 and mid-evaluation 6 (at the moments tests/paused_edgeft.py stops at),
then resumed; prints the largest difference between the two runs' adapters.
plan: `edgeft tune` processes on equal-length chats (every batch the same shape) and
edgeft.plan's estimate for that shape; prints MLX's peak and the process peak against it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import edgeft  # noqa: F401  (BLAS before mlx)
from edgeft import data_files, hub, plan
from edgeft.config import DataConfig, LoRAConfig
from edgeft.loader import load

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "brand_voice.jsonl"
PAUSED = ROOT / "tests" / "paused_edgeft.py"


def edgeft_tune(args, pause_at=None, marker=None):
    """`edgeft tune ARGS`; with pause_at, SIGKILLed there (tests/paused_edgeft.py)."""
    command = [str(PAUSED), pause_at, str(marker)] if pause_at else ["-m", "edgeft.cli"]
    proc = subprocess.Popen([sys.executable, *command, "tune", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if pause_at:
        while not marker.exists():
            if proc.poll() is not None:
                sys.exit(f"edgeft exited before {pause_at}:\n{proc.communicate()[1][-2000:]}")
            time.sleep(0.05)
        proc.kill()
        proc.communicate()
        marker.unlink()
        return
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"edgeft tune failed (exit status {proc.returncode}):\n{err[-2000:]}")


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters" / "adapters.safetensors")).items()}


def kill(model: Path, work: Path):
    runs = work / "runs"
    base = ["--data", str(EXAMPLES), "--model", str(model), "--steps", "6", "--batch-size", "2",
            "--eval-every", "3", "--save-every", "2", "--lora-dropout", "0.1", "--no-export", "--no-eval", "--runs-dir", str(runs)]
    resume = ["--resume", "--name", "killed", "--runs-dir", str(runs)]
    edgeft_tune([*base, "--name", "straight"])
    edgeft_tune([*base, "--name", "killed"], pause_at="step:3", marker=work / "m")
    edgeft_tune(resume, pause_at="checkpoint:4", marker=work / "m")
    edgeft_tune(resume, pause_at="eval:6", marker=work / "m")
    edgeft_tune(resume)
    a, b = adapters(runs / "straight"), adapters(runs / "killed")
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"3 kills (mid-step 3, mid-checkpoint 4, mid-evaluation 6), resumed: max |adapter difference| "
          f"{diff} ({'bitwise equal' if diff == 0 else 'not bitwise equal'})")


def measure(model: Path, work: Path):
    chats = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    long_answer = " ".join(m["content"] for c in chats[:6] for m in c["messages"] if m["role"] == "assistant")
    rows = {"short": chats[0], "long": {"messages": [{"role": "user", "content": "Tell me everything about your shop."},
                                                     {"role": "assistant", "content": long_answer}]}}
    loaded = load(model, tokenizer_only=True)
    packed = plan.packs(config=loaded.config)
    print("shape (packed tokens)    MLX peak: measured  estimate         process peak: measured  estimate")
    for kind, batch in (("short", 4), ("short", 8), ("long", 2), ("long", 4)):
        name = f"{kind}-b{batch}"
        data = work / f"{name}.jsonl"
        data.write_text((json.dumps(rows[kind]) + "\n") * 12)
        edgeft_tune(["--data", str(data), "--model", str(model), "--steps", "3", "--batch-size", str(batch),
                     "--max-seq-len", "512", "--eval-every", "0", "--no-export", "--no-eval", "--name", name,
                     "--runs-dir", str(work / "runs")])
        recs = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["kind"] == "train"]
        mlx_peak = max(r["mlx_peak_gb"] for r in train) * 1e9
        proc_peak = max(r["peak_mem_gb"] for r in train) * 1e9
        samples, _ = data_files.load_samples(data, loaded.tokenizer, DataConfig(), 512)
        width, loss_tokens, lengths = plan.batch_shape(samples, batch, 512)
        est = plan.estimate_peak_bytes(loaded.config, LoRAConfig(), batch, width, plan.quant_info_from_gguf(model),
                                       loss_tokens=loss_tokens, lengths=lengths if packed(lengths) else None, runtime_bytes=0)
        total = json.loads((work / "runs" / name / "memory_plan.json").read_text())["total"]  # tune's own
        print(f"{batch} x {width} ({sum(lengths)})".ljust(25)
              + f"{mlx_peak / 1e9:7.2f} GB {est.mlx / 1e9:6.2f} GB ({est.mlx / mlx_peak - 1:+.1%})      "
              + f"{proc_peak / 1e9:7.2f} GB {total / 1e9:6.2f} GB ({total / proc_peak - 1:+.1%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kill", "plan"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    model = hub.resolve(args.model, log=print)
    with tempfile.TemporaryDirectory(prefix="edgeft-reliability-") as d:
        (kill if args.what == "kill" else measure)(model, Path(d))


if __name__ == "__main__":
    main()
