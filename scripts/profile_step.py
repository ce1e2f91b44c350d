"""Where the time of one LoRA training step goes, on this machine, on realistic chat batches.

SmolLM2-135M-Instruct (Q4_1 GGUF), LoRA rank 8 on all 7 projections, batch 4 x at most 256
tokens of chats built from ../shared/data/seed_tasks.jsonl (or --data; user = instruction + input,
assistant = output), as the benchmark does. The machine is shared, so every comparison
interleaves its contestants step by step on the same batches and reports medians and ratios;
wall time and this process's CPU time are both shown (CPU time suffers less from neighbours).

    python scripts/profile_step.py phases            # forward / loss / backward / optimizer
    python scripts/profile_step.py ablate            # what each op family costs inside a step
    python scripts/profile_step.py ab A B ...        # step variants, interleaved (see VARIANTS)
    python scripts/profile_step.py micro             # single ops at the model's shapes
    python scripts/profile_step.py attention         # causal attention alone: flash against composed

Thread settings are per process: compare them with alternating runs of `ab base`, e.g.
``for i in 1 2 3; do KMP_BLOCKTIME=0 python ... ab base; python ... ab base; done``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import edgeft  # noqa: F401  (first: it loads the fast BLAS, which must happen before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from edgeft import (
    _blas,
    backend,
    batches,
    cpu_kernels,
    data_files,
    dequant,
    hub,
    loader,
    lora,
    loss,
    runs,
    system,
    trainer,
)
from edgeft.config import DataConfig, LoRAConfig, TrainConfig

SEED_TASKS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "seed_tasks.jsonl"


# ---------------------------------------------------------------------------------------------
# Setup


def chat_file(src: Path, out: Path, join_tokens: int = 0) -> Path:
    """The benchmark's chats (one per seed task); with join_tokens, consecutive tasks as the
    turns of one chat of about that many tokens, for long samples."""
    from bench import (  # scripts/bench.py, beside this file
        joined_chats,
        seed_task_chats,
    )

    chats = seed_task_chats(src)
    if join_tokens:
        chats = joined_chats(chats, join_tokens)
    out.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return out


def setup(args):
    """(model, samples) with LoRA applied the way `edgeft tune` does it."""
    loaded = loader.load(hub.resolve(args.model), quantize_bits=args.quantize_bits)
    runs.choose_chat_template(loaded, None)  # as `edgeft tune`: a built-in when it has none (Gemma's GGUF)
    backend.prepare(loaded.model)
    mx.random.seed(0)
    lora.apply_lora(loaded.model, LoRAConfig(rank=args.rank))
    with tempfile.TemporaryDirectory() as tmp:
        path = chat_file(Path(args.data), Path(tmp) / "chat.jsonl", args.join_tokens)
        samples, _ = data_files.load_samples(path, loaded.tokenizer, DataConfig(skip_bad_lines=True), args.max_seq_len)
    return loaded.model, samples


def fixed_batches(samples, args):
    it = batches.iterate_batches(samples, args.batch_size, seed=0)
    return [next(it) for _ in range(args.batches)]


def real_tokens(batch) -> int:
    return loss.input_tokens(batch[2])


class Clock:
    """Wall and process-CPU seconds of a block, after forcing evaluation."""

    def __init__(self):
        self.wall, self.cpu = [], []

    @contextmanager
    def __call__(self):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)


def rss_peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    mx.reset_peak_memory()


def rss_peak_gb() -> float:
    return system.peak_rss() / 1e9


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------
# Step variants: each is (name, make) where make(model) -> step(batch) -> None


def default_step(model, loss_fn=loss.lm_loss):
    """One optimizer step as trainer.train takes it (packing decided by loss.loss_inputs)."""
    opt = optim.AdamW(learning_rate=1e-5)
    update = trainer.compiled_update(model, opt)
    kept = {}  # as trainer.train: each weight dequantized once for the run

    def step(batch):
        args, _ = loss.loss_inputs(model, loss_fn, *batch[:3])
        # Evaluated inside, as in trainer.train; but bf16 rounds (and gives back, and at the
        # block's end writes back) the kept weights once per step here, where trainer.train
        # does it once per run: variants of other precisions take turns with this one.
        with backend.matmul_precision(MATMUL, log=lambda m: None) as keep:
            on_keep = keep if FIX_WEIGHTS else None
            for _, w in kept.values() if on_keep else ():
                on_keep(w)
            with dequant.keep_dequantized(KEEP_DEQUANTIZED, store=kept, on_keep=on_keep):
                if KEEP_DEQUANTIZED and not kept:
                    backend.keep_weights(model)  # as trainer.train: outside the gradient trace
                loss_sum, grads, n = loss.summed_loss_and_grad(model, loss_fn, args)
            if COMPILED_UPDATE:
                gnorm = update(grads, mx.array(1.0 / n, dtype=mx.float32))
            else:  # the same step op by op, as the trainer took it before trainer.compiled_update
                grads = loss.tree_map_scale(grads, 1.0 / n)
                gnorm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
                opt.update(model, grads)
            mx.eval(model.trainable_parameters(), opt.state, loss_sum, gnorm)

    return step


def padded_loss(model, inputs, idx, tgt):
    """lm_loss on the padded batch (no `lengths` parameter: loss.loss_inputs does not pack)."""
    return loss.lm_loss(model, inputs, idx, tgt)


def with_setting(make, obj, name, value):
    """A variant that runs `make`'s step with obj.name = value."""

    def made(model):
        step = make(model)

        def patched_step(batch):
            with patched(obj, name, value):
                step(batch)

        return patched_step

    return made


def within(make, context):
    """A variant that runs `make`'s step inside `context()`."""

    def made(model):
        step = make(model)

        def step_within(batch):
            with context():
                step(batch)

        return step_within

    return made


def _lora_separate_add(self, x):
    """LoRALinear inside the training step as before mx.addmm: the rank-r product writes its own
    output, then an add."""
    return self.linear(x) + (self.dropout(x) @ self.lora_a) @ (self.scale * self.lora_b)


KEEP_DEQUANTIZED = True  # False: dequantize every weight again in every step (as before)
MATMUL = TrainConfig().matmul  # the products' precision, as trainer.train takes it
COMPILED_UPDATE = True  # False: the gradients' scale and norm and AdamW as separate ops
FIX_WEIGHTS = True  # False: bf16 rounds the weights in every product (as before edgeft_sgemm_fix)


VARIANTS = {
    "base": default_step,
    "padded": lambda m: default_step(m, padded_loss),
    "mlx-ops": with_setting(default_step, backend, "FUSED_KERNELS", False),
    "mlx-dequantize": with_setting(default_step, dequant, "dequantize", lambda w, s, b, bits, group_size, mode: mx.dequantize(
        w, s, b, group_size=group_size, bits=bits, mode=mode)),
    "one-stream": with_setting(default_step, backend, "CPU_STREAMS", 1),
    "dequantize-each-step": with_setting(default_step, sys.modules[__name__], "KEEP_DEQUANTIZED", False),
    "mlx-cross-entropy": with_setting(default_step, backend, "cross_entropy", lambda x, t: mx.logsumexp(x, axis=-1)
                                      - mx.take_along_axis(x, t[:, None], axis=-1)[:, 0]),
    "whole-attention": with_setting(default_step, backend, "ATTENTION_BLOCK", 1 << 30),
    "attention-block-256": with_setting(default_step, backend, "ATTENTION_BLOCK", 256),
    "exp-one-chain": with_setting(default_step, cpu_kernels, "_exp_fused", cpu_kernels.fused(cpu_kernels._exp)),
    "no-compiled-kernels": with_setting(default_step, cpu_kernels, "_compiled_ok", False),  # the fused ops instead
    "composed-attention": with_setting(default_step, cpu_kernels, "flash_attention", lambda: False),  # scores in memory
    "ops-swiglu": with_setting(default_step, cpu_kernels, "swiglu", cpu_kernels._swiglu_ops),
    "ops-cross-entropy": with_setting(default_step, cpu_kernels, "cross_entropy", lambda x, t: cpu_kernels.logsumexp(x)
                                      - mx.take_along_axis(x, t[:, None], axis=-1)[:, 0]),
    "blocks-one-stream": with_setting(default_step, backend, "IDLE_STREAMS", False),
    "groups-by-tokens": with_setting(default_step, backend, "head_share", lambda model: 0.0),  # loss tokens weigh 1
    "whole-sample": within(default_step, lambda: backend.split_samples(False)),  # a lone sample on one stream
    "whole-products": within(default_step, lambda: _blas.split(0)),  # MKL gets wide products whole
    "split-512": within(default_step, lambda: _blas.split(512)),
    "fp32-products": with_setting(default_step, sys.modules[__name__], "MATMUL", "fp32"),
    "bf16-products": with_setting(default_step, sys.modules[__name__], "MATMUL", "bf16"),
    "bf16-unfixed": with_setting(default_step, sys.modules[__name__], "FIX_WEIGHTS", False),
    "lora-add": with_setting(default_step, LoRALinear, "__call__", _lora_separate_add),
    "update-ops": with_setting(default_step, sys.modules[__name__], "COMPILED_UPDATE", False),
    "attention-per-sample": with_setting(default_step, backend, "PACKED_ATTENTION", False),
    "lora-ops": with_setting(default_step, backend, "LORA_KERNEL", False),
}


def run_interleaved(model, batches, makers: dict, repeats: int) -> dict:
    steps = {name: make(model) for name, make in makers.items()}
    clocks = {name: Clock() for name in steps}
    peaks = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up (compiles, allocator)
        step(batches[0])
    for r in range(repeats):
        for b in batches:
            for name, step in steps.items():
                rss_peak_reset()
                with clocks[name]():
                    step(b)
                peaks[name].append((mx.get_peak_memory() / 1e9, rss_peak_gb()))
    ntok = sum(real_tokens(b) for b in batches)
    out = {}
    for name, c in clocks.items():
        n = len(batches)
        wall = [sum(c.wall[i : i + n]) for i in range(0, len(c.wall), n)]
        cpu = [sum(c.cpu[i : i + n]) for i in range(0, len(c.cpu), n)]
        out[name] = {
            "tok_s": ntok / statistics.median(wall),
            "tok_cpu_s": ntok / statistics.median(cpu),
            "wall_s": statistics.median(wall) / n,
            "mlx_peak_gb": max(p[0] for p in peaks[name]),
            "rss_peak_gb": max(p[1] for p in peaks[name]),
        }
    return out


def show(results: dict, first: str | None = None):
    first = first or next(iter(results))
    print(f"{'variant':24s} {'tok/s':>8s} {'tok/cpu-s':>9s} {'s/step':>7s} {'x':>6s} {'mlx GB':>7s} {'rss GB':>7s}")
    for name, r in results.items():
        ratio = r["tok_s"] / results[first]["tok_s"]
        print(
            f"{name:24s} {r['tok_s']:8.1f} {r['tok_cpu_s']:9.1f} {r['wall_s']:7.2f} {ratio:6.2f} "
            f"{r['mlx_peak_gb']:7.2f} {r['rss_peak_gb']:7.2f}"
        )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_ab(args, model, samples):
    batches = fixed_batches(samples, args)
    makers = {}
    for name in args.variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        makers[name] = VARIANTS[name]
    print(f"{len(batches)} batches, {sum(real_tokens(b) for b in batches)} real tokens, "
          f"{args.repeats} repeats; env: " + " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                                                     if k.startswith(("KMP_", "OMP_", "MKL_", "EDGEFT_"))))
    show(run_interleaved(model, batches, makers, args.repeats))


def cmd_phases(args, model, samples):
    """Forward only, forward + loss, forward + backward, optimizer: interleaved, per step."""
    batches = fixed_batches(samples, args)
    loss_and_grad = nn.value_and_grad(model, loss.lm_loss)
    opt = optim.AdamW(learning_rate=1e-5)

    def hidden(x, lengths):
        with backend.fast_forward(backend.Packing(lengths) if lengths else None):
            return model.model(x)

    parts = {
        "forward (hidden states)": lambda x, idx, tgt, lengths=None: mx.eval(hidden(x, lengths)),
        "forward + head + CE": lambda *a: mx.eval(loss.lm_loss(model, *a)),
        "forward + backward": lambda *a: mx.eval(loss_and_grad(model, *a)),
    }
    prepped = [loss.loss_inputs(model, loss.lm_loss, *b[:3])[0] for b in batches]
    grads = loss_and_grad(model, *prepped[0])[1]
    mx.eval(grads)
    clocks = {k: Clock() for k in list(parts) + ["optimizer update"]}
    for name, f in parts.items():
        f(*prepped[0])
    for _ in range(args.repeats):
        for p in prepped:
            for name, f in parts.items():
                with clocks[name]():
                    f(*p)
            with clocks["optimizer update"]():
                opt.update(model, grads)
                mx.eval(model.trainable_parameters(), opt.state)
    med = {k: statistics.median(c.wall) for k, c in clocks.items()}
    medc = {k: statistics.median(c.cpu) for k, c in clocks.items()}
    step = med["forward + backward"] + med["optimizer update"]
    ntok = statistics.mean(real_tokens(b) for b in batches)
    print(f"median per step over {len(batches)} batches x {args.repeats}, {ntok:.0f} real tokens/step")
    print(f"{'phase':32s} {'wall s':>8s} {'cpu s':>8s} {'share':>6s}")
    rows = [
        ("forward (hidden states)", med["forward (hidden states)"], medc["forward (hidden states)"]),
        ("head + CE (forward)", med["forward + head + CE"] - med["forward (hidden states)"],
         medc["forward + head + CE"] - medc["forward (hidden states)"]),
        ("backward", med["forward + backward"] - med["forward + head + CE"],
         medc["forward + backward"] - medc["forward + head + CE"]),
        ("optimizer update", med["optimizer update"], medc["optimizer update"]),
    ]
    for name, w, c in rows:
        print(f"{name:32s} {w:8.3f} {c:8.3f} {w / step:6.1%}")
    print(f"{'step':32s} {step:8.3f} {'':8s} {'':6s}  -> {ntok / step:.1f} tok/s")


# Ablations: each replaces one op family by a near-free stand-in inside the real step; the
# step time saved is what that family costs (forward and backward together).


def ablations(model):
    import mlx_lm.models.llama as llama

    def no_silu(gate, x):
        return gate * x

    def attn_no_softmax(queries, keys, values, cache, scale, mask, sinks=None):
        rep = queries.shape[1] // keys.shape[1]
        if rep > 1:
            keys, values = mx.repeat(keys, rep, axis=1), mx.repeat(values, rep, axis=1)
        s = (queries * scale) @ keys.swapaxes(-1, -2)
        return s @ values

    def attn_composed(queries, keys, values, cache, scale, mask, sinks=None):
        rep = queries.shape[1] // keys.shape[1]
        if rep > 1:
            keys, values = mx.repeat(keys, rep, axis=1), mx.repeat(values, rep, axis=1)
        s = (queries * scale) @ keys.swapaxes(-1, -2)
        L = s.shape[-1]
        causal = mx.arange(L)[:, None] >= mx.arange(L)[None]
        s = mx.where(causal, s, -mx.inf)
        return mx.softmax(s, axis=-1) @ values

    def no_ce(model, inputs, idx, tgt):
        h = model.model(inputs)
        h = h.reshape(-1, h.shape[-1])[idx]
        logits = loss.output_head(model)(h)
        return logits.mean(), mx.array(idx.size)

    def no_head(model, inputs, idx, tgt):
        h = model.model(inputs)
        return h.reshape(-1, h.shape[-1])[idx].mean(), mx.array(idx.size)

    def with_patch(obj, name, value):
        def make(m):
            step = default_step(m)

            def patched_step(batch):
                with patched(obj, name, value):
                    step(batch)

            return patched_step

        return make

    return {
        "base": default_step,
        "silu -> identity": with_patch(llama, "swiglu", no_silu),
        "sdpa -> composed": with_patch(llama, "scaled_dot_product_attention", attn_composed),
        "sdpa -> no softmax": with_patch(llama, "scaled_dot_product_attention", attn_no_softmax),
        "CE -> mean logits": lambda m: default_step(m, no_ce),
        "head+CE -> mean h": lambda m: default_step(m, no_head),
    }


def cmd_ablate(args, model, samples):
    batches = fixed_batches(samples, args)
    res = run_interleaved(model, batches, ablations(model), args.repeats)
    show(res)
    base = res["base"]["wall_s"]
    print("\ncost of each family (base step time minus the ablated step time):")
    for name, r in res.items():
        if name != "base":
            print(f"  {name:24s} {base - r['wall_s']:7.3f} s  ({(base - r['wall_s']) / base:6.1%} of the step)")


def cmd_micro(args, model, samples):
    def bench(name, f, *a, n=7):
        mx.eval(f(*a))
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            mx.eval(f(*a))
            ts.append(time.perf_counter() - t)
        print(f"{name:48s} {statistics.median(ts) * 1e3:8.2f} ms", flush=True)

    T = 512  # real tokens of a typical batch (4 chats of ~128 tokens)
    x = mx.random.normal((T, 576))
    g = mx.random.normal((T, 1536))
    w = mx.random.normal((1536, 576))
    bench("matmul 512x576 @ 576x1536 (gate/up)", lambda a, w: a @ w.T, x, w)
    bench("matmul 512x1536 @ 1536x576 (down)", lambda a, w: a @ w, g, w)
    wq = mx.quantize(w, group_size=32, bits=4)
    bench("dequantize 1536x576 q4 g32", lambda: mx.dequantize(*wq, group_size=32, bits=4))
    bench("exp 512x1536", mx.exp, g)
    bench("silu 512x1536", nn.silu, g)
    bench("rms_norm 512x576", lambda a: mx.fast.rms_norm(a, mx.ones(576), 1e-5), x)
    q = mx.random.normal((4, 9, 128, 64))
    k = mx.random.normal((4, 3, 128, 64))
    bench("sdpa causal B4 H9/3 T128 D64", lambda q, k: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125, mask="causal"), q, k)
    h = mx.random.normal((216, 576))
    E = mx.random.normal((49152, 576))
    bench("head 216x576 @ 576x49152", lambda h, E: h @ E.T, h, E)
    bench("logsumexp 216x49152", lambda l: mx.logsumexp(l, axis=-1), h @ E.T)


def cmd_attention(args, model, samples):
    """Causal attention forward + backward alone at the model's head shapes, over sequence
    lengths: the compiled flash kernel against the composed attention (its query blocks of
    backend.ATTENTION_BLOCK), both as a step computes it on one stream (the blocks on the idle
    cores' streams), with fp32 and with bf16 products, interleaved."""
    attn = backend._attention_modules(model)[0]
    H, Hkv = attn.n_heads, attn.n_kv_heads
    D = getattr(attn, "head_dim", None) or attn.q_proj.weight.shape[0] // H
    sdpa = backend._fast_sdpa(mx.fast.scaled_dot_product_attention)
    kinds = {"flash": True, "composed": False}
    print(f"heads {H}/{Hkv}, {D} wide; ms per forward + backward (median of {args.repeats * 3})")
    for bf16 in (False, True):
        for T in (256, 512, 1024, 2048):
            q, k, v = mx.random.normal((1, H, T, D)), mx.random.normal((1, Hkv, T, D)), mx.random.normal((1, Hkv, T, D))

            def loss(q, k, v):
                with backend.fast_forward():
                    return (sdpa(q, k, v, scale=D**-0.5, mask="causal") * mx.repeat(v, H // Hkv, axis=1)).sum()

            grad = mx.grad(loss, argnums=(0, 1, 2))
            times = {name: [] for name in kinds}
            with _blas.bf16(bf16):
                for _ in range(args.repeats * 3 + 1):
                    for name, flash in kinds.items():
                        with patched(cpu_kernels, "flash_attention", lambda flash=flash: flash):
                            tic = time.perf_counter()
                            mx.eval(grad(q, k, v))
                            times[name].append(time.perf_counter() - tic)
            med = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}  # the first: compiles
            print(f"{'bf16' if bf16 else 'fp32'} products, T={T:5d}: " + "  ".join(f"{n} {m:7.1f}" for n, m in med.items())
                  + f"  composed / flash {med['composed'] / med['flash']:.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["phases", "ablate", "ab", "micro", "attention"])
    p.add_argument("variants", nargs="*", default=["base"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(SEED_TASKS), help="seed tasks JSONL (default ../shared/data/seed_tasks.jsonl)")
    p.add_argument("--quantize-bits", type=int, choices=(4, 8), default=None,
                   help="quantize a full-precision model folder's layers, as `edgeft tune --quantize-bits`")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--join-tokens", type=int, default=0,
                   help="chats of consecutive tasks joined as turns to about this many tokens (long samples)")
    p.add_argument("--batches", type=int, default=3, help="distinct batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, samples = setup(args)
    {"phases": cmd_phases, "ablate": cmd_ablate, "ab": cmd_ab, "micro": cmd_micro,
     "attention": cmd_attention}[args.command](args, model, samples)


if __name__ == "__main__":
    main()
