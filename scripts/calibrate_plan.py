"""Refit edgeft/plan.py's byte counts to what the training step does now.

    python scripts/calibrate_plan.py              # tiny models only (~1 min)
    python scripts/calibrate_plan.py --smollm2    # plus the real SmolLM2-135M (~10 min on 2 cores)

Runs edgeft's own trainer.train for 2 steps at fixed batch shapes (random tokens, a set number
of loss positions), each shape after mx.reset_peak_memory(), and fits the per-unit bytes of
plan.estimate_peak_bytes (plan.Coefficients: act_per_h, act_per_i, transient_per_i, attn_saved,
attn_transient; logits_per_v held at 8 = two fp32 copies) by least squares on relative error,
SmolLM2 weighted as much as all tiny shapes together. Prints the coefficients, then each shape's
error with plan.FITTED and with the fitted ones. Change plan.FITTED by hand if they moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import edgeft  # noqa: F401  (first: it loads the fast BLAS, which must happen before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from edgeft import backend, hub, lora, plan, trainer
from edgeft.config import LoRAConfig, TrainConfig
from edgeft.loader import load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import make_tiny  # noqa: E402

TINY_SHAPES = [{}, {"num_hidden_layers": 4}, {"hidden_size": 128, "intermediate_size": 256},
               {"hidden_size": 128, "intermediate_size": 1024, "num_hidden_layers": 4},
               {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4},
               {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 8}]
TINY_BATCHES = [(8, 64, 64), (16, 64, 64), (8, 128, 64), (4, 256, 64), (8, 64, 512), (4, 144, 360)]
SMOL_BATCHES = [(1, 128, 64), (2, 128, 128), (4, 128, 256), (4, 128, 512), (8, 64, 256), (2, 256, 256),
                (4, 256, 512), (1, 512, 256), (2, 512, 512), (1, 1024, 512)]
FREE = ["act_per_h", "act_per_i", "transient_per_i", "attn_saved", "attn_transient"]


def measure(path, batches) -> tuple[dict, plan.QuantInfo, list[tuple]]:
    """(config, quant info, [(B, T, K, measured bytes over the model's own)])."""
    loaded = load(path)
    backend.prepare(loaded.model)
    quant = plan.quant_info_from_model(loaded.model)
    mx.random.seed(0)
    lora.apply_lora(loaded.model, LoRAConfig())
    mx.eval(loaded.model.parameters())
    V, out = loaded.config["vocab_size"], []
    for B, T, K in batches:
        rng = np.random.default_rng(0)
        inputs = mx.array(rng.integers(0, V, (B, T)).astype(np.int32))
        targets = mx.array(rng.integers(0, V, (B, T)).astype(np.int32))
        mask = np.zeros(B * T, np.float32)
        mask[np.sort(rng.choice(B * T, K, replace=False))] = 1
        mask[np.arange(B) * T + T - 1] = 1  # every row ends with loss: packing cuts nothing
        mask = mx.array(mask.reshape(B, T))
        mx.eval(inputs, targets, mask)
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        trainer.train(loaded.model, TrainConfig(steps=2, batch_size=B, eval_every=0, save_every=0),
                      lambda s: iter(lambda: (inputs, targets, mask), None), progress=trainer.Progress(2, every=1000))
        out.append((B, T, int(np.asarray(mask).sum()), mx.get_peak_memory() - base))
    return loaded.config, quant, out


def terms(config, quant, B, T, K) -> tuple[float, np.ndarray]:
    """(the estimate's fixed part, the coefficients of FREE) for one shape; measured is over
    the model's weights and LoRA parameters (both already allocated)."""
    zero = dataclasses.replace(plan.FITTED, **{n: 0.0 for n in FREE})

    def mlx_bytes(coefficients):
        return plan.estimate_peak_bytes(config, LoRAConfig(), B, T, quant, loss_tokens=K, runtime_bytes=0,
                                        lengths=[T] * B, coefficients=coefficients).mlx

    est = plan.estimate_peak_bytes(config, LoRAConfig(), B, T, quant, loss_tokens=K, runtime_bytes=0,
                                   lengths=[T] * B, coefficients=zero)
    fixed = est.mlx - est.weights - 4 * plan.lora_parameters(config, LoRAConfig())
    cols = [mlx_bytes(dataclasses.replace(zero, **{n: 1.0})) - est.mlx for n in FREE]
    return fixed, np.array(cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="also measure the real SmolLM2-135M")
    args = ap.parse_args()
    rows = []  # (label, weight, fixed, cols, measured)
    with tempfile.TemporaryDirectory() as d:
        for shape in TINY_SHAPES:
            path = make_tiny("llama", d, "q8_0", **shape)[0]
            config, quant, res = measure(path, TINY_BATCHES)
            rows += [(f"tiny {shape or 'default'} {B}x{T} K{K}", 1.0, *terms(config, quant, B, T, K), m)
                     for B, T, K, m in res]
    if args.smollm2:
        config, quant, res = measure(hub.resolve("smollm2-135m-instruct", log=print), SMOL_BATCHES)
        weight = len(rows) / len(res)
        rows += [(f"SmolLM2 {B}x{T} K{K}", weight, *terms(config, quant, B, T, K), m) for B, T, K, m in res]
    w = np.array([r[1] / r[4] for r in rows])
    A = np.array([r[3] for r in rows]) * w[:, None]
    b = np.array([r[4] - r[2] for r in rows]) * w
    now = np.array([getattr(plan.FITTED, n) for n in FREE])
    # a coefficient no shape exercises (the attention's, under the flash kernel) keeps its value
    used = np.abs(A).max(axis=0) > 0
    fit = now.copy()
    fit[used] = np.linalg.lstsq(A[:, used], b - A[:, ~used] @ now[~used], rcond=None)[0]
    print("coefficient       plan.py   fitted")
    for n, c, f in zip(FREE, now, fit):
        print(f"{n:16} {c:8.1f} {f:8.1f}")
    print("\nshape                                          measured    plan.py     fitted")
    for label, _, fixed, cols, m in rows:
        print(f"{label:45} {m / 1e6:8.1f} MB {(fixed + cols @ now) / m - 1:+8.1%} {(fixed + cols @ fit) / m - 1:+9.1%}")


if __name__ == "__main__":
    main()
