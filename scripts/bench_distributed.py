"""Data-parallel training on one machine, and what the gradient exchange costs between machines.

    python scripts/bench_distributed.py                 # measure (~4 min on 2 cores), then the table
    python scripts/bench_distributed.py --table-only --step-time 0.9   # the on-paper table alone

Measure: `edgeft tune` on examples/brand_voice.jsonl with SmolLM2-135M (the cached GGUF), the
same global batch, once as 1 process using every core and once as `mlx.launch -n N --backend
ring` (N ranks on loopback, cores shared out); median tokens/s over the steps after the first
(read from each run's metrics.jsonl), side by side, and the bytes each rank sends per step.

On paper: the per-step all-reduce of the LoRA gradients (float32, all 7 projections) for
SmolLM2-135M, Gemma 3 270M and Llama 3.2 1B at rank 8 and 16, against link speeds; the
scaling efficiency of 2 machines that follows from a step time (measured here for SmolLM2,
scaled by parameter count for the others), and the grad_accum that hides the exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "brand_voice.jsonl"

# (name, layers, width, q out, kv out, ffn, parameters): q/kv out = heads x head dim
MODELS = [
    ("SmolLM2-135M", 30, 576, 9 * 64, 3 * 64, 1536, 135e6),
    ("Gemma 3 270M", 18, 640, 4 * 256, 1 * 256, 2048, 270e6),
    ("Llama 3.2 1B", 16, 2048, 32 * 64, 8 * 64, 8192, 1.24e9),
]
# (name, bits/s, duplex factor): Wi-Fi shares the air between sending and receiving
LINKS = [("Thunderbolt 5", 80e9, 1), ("10 GbE", 10e9, 1), ("1 GbE", 1e9, 1), ("Wi-Fi 6", 1e9, 2)]


def lora_parameters(layers, width, q, kv, ffn, rank) -> int:
    """A and B of every projection: rank x (in + out) each."""
    shapes = [(width, q), (width, kv), (width, kv), (q, width), (width, ffn), (width, ffn), (ffn, width)]
    return layers * rank * sum(i + o for i, o in shapes)


def ring_bytes_sent(buffer_bytes: float, ranks: int) -> float:
    """What each rank sends (and receives) in a ring all-reduce: reduce-scatter + all-gather."""
    return 2 * (ranks - 1) / ranks * buffer_bytes


def run(cmd, env, log) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0 or "Error" in r.stderr:
        sys.exit(f"failed ({log}):\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def speed(run_dir: Path) -> tuple[float, float, int]:
    """(median tokens/s, median step seconds, steps) after the first step."""
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train" and r["step"] > 1]
    return (statistics.median(r["tokens_per_s"] for r in train),
            statistics.median(r["step_time_s"] for r in train), len(train))


def measure(args) -> float:
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tune = ["tune", "--data", str(DATA), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.grad_accum), "--eval-every", "0", "--save-every", "0", "--no-export", "--no-eval",
            "--runs-dir", str(work / "runs")]
    edgeft = [sys.executable, "-m", "edgeft.cli"]
    launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(args.ranks), "--backend", "ring", "--"]
    rows = []
    for label, cmd, name in [
        (f"1 process x {os.cpu_count()} cores", [*edgeft, *tune, "--name", "single"], "single"),
        (f"{args.ranks} ranks x {max(1, (os.cpu_count() or 1) // args.ranks)} core(s)",
         [*launch, *edgeft, *tune, "--name", "ranks"], "ranks"),
    ]:
        wall = run(cmd, env, work / f"{name}.log")
        tps, step_s, n = speed(work / "runs" / name)
        rows.append((label, tps, step_s, n, wall))
    import mlx.core as mx

    adapters = mx.load(str(work / "runs" / "ranks" / "adapters" / "adapters.safetensors"))
    single = mx.load(str(work / "runs" / "single" / "adapters" / "adapters.safetensors"))
    diff = max(mx.abs(adapters[k] - single[k]).max().item() for k in adapters)
    scale = max(mx.abs(single[k]).max().item() for k in single)
    floats = sum(v.size for v in adapters.values())
    buffer = 4 * (floats + 4)  # float32 gradients + loss, tokens, input tokens, stop flag
    print(f"\nSmolLM2-135M, brand_voice.jsonl, global batch {args.batch_size} x {args.grad_accum}, "
          f"{args.steps} steps (median after step 1); run folders in {work}\n")
    print("| setup | tokens/s | step time | steps | wall time |\n| --- | --- | --- | --- | --- |")
    for label, tps, step_s, n, wall in rows:
        print(f"| {label} | {tps:.0f} | {step_s:.2f} s | {n} | {wall:.0f} s |")
    print(f"\nratio {args.ranks} ranks / 1 process: {rows[1][1] / rows[0][1]:.2f}")
    print(f"adapters, {args.ranks} ranks against 1 process: largest difference {diff:.2e} "
          f"(largest adapter value {scale:.3f})")
    print(f"exchanged per step: one all_sum of {buffer / 1e6:.2f} MB ({floats} float32 gradients + 4 "
          f"scalars); each rank sends and receives {ring_bytes_sent(buffer, args.ranks) / 1e6:.2f} MB "
          f"(ring factor 2(N-1)/N = {2 * (args.ranks - 1) / args.ranks:.2f})")
    return rows[0][2]


def table(step_time: float, batch: int) -> None:
    """The on-paper table: 2 machines, the step time of 1 machine for the global batch."""
    print(f"\nOn paper: 2 machines, float32 LoRA gradients on all 7 projections, ring all-reduce "
          f"(each sends 1x the buffer); 1-machine step {step_time:.2f} s for SmolLM2 at global batch "
          f"{batch} (scaled by parameters for the others); efficiency = (T/2) / (T/2 + exchange).\n")
    head = "| model | rank | gradients / step | " + " | ".join(f"{n}: exchange, efficiency" for n, *_ in LINKS)
    print(head + " | grad_accum for 95%: 1 GbE / Wi-Fi 6 |")
    print("| --- " * (4 + len(LINKS)) + "|")
    for name, layers, width, q, kv, ffn, params in MODELS:
        t = step_time * params / MODELS[0][6]
        for rank in (8, 16):
            buf = 4 * lora_parameters(layers, width, q, kv, ffn, rank)
            cells, accum = [], []
            for link, bps, duplex in LINKS:
                x = ring_bytes_sent(buf, 2) * 8 * duplex / bps
                cells.append(f"{x * 1e3:.1f} ms, {(t / 2) / (t / 2 + x):.0%}")
                if link in ("1 GbE", "Wi-Fi 6"):  # exchange <= 5/95 of a rank's grad_accum x T/2
                    accum.append(str(int(max(1, -(-x * 19 // (t / 2))))))
            print(f"| {name} | {rank} | {buf / 1e6:.1f} MB | " + " | ".join(cells) + f" | {' / '.join(accum)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--step-time", type=float, default=None, help="1-machine step seconds for the table")
    args = ap.parse_args()
    step_time = args.step_time
    if not args.table_only:
        measured = measure(args)
        step_time = step_time or measured
    table(step_time or 1.0, args.batch_size * args.grad_accum)


if __name__ == "__main__":
    import edgeft  # noqa: F401  (the fast BLAS before mlx)

    main()
