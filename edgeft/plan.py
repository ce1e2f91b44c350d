"""How much memory and disk a run will need, before it starts (`edgeft plan`, tune's preflight).

Peak memory of one LoRA step, as MLX's CPU backend runs edgeft's step (edgeft/backend.py:
quantized projections are dequantized to fp32 just in time, the model computes in fp32):

  runtime       what the process holds outside MLX's arrays: Python, the libraries, BLAS's thread
                buffers, tokenizer and data (measured in the running process: measure_runtime_bytes)
  weights       the base as held in memory (fp32 scales/biases on CPU, half floats made fp32)
  lora          adapters + AdamW's two moments, and the step's gradients and clipped copy
  dequantized   fp32 copies of quantized weights, kept from the forward pass for the backward
  activations   what each adapted layer keeps per token for the backward pass
  attention     attention scores: one per head and token pair, per layer, plus one layer's work;
                none when packed CPU batches go to edgeft/_kernels.cpp's flash attention, which
                holds a tile of them at a time (the composed attention, where it is not built,
                and MLX's own, where a batch does not pack, hold them all)
  logits        the vocabulary projection, only at the positions that carry loss
  transient     one layer's backward-pass temporaries
  bf16_copies   with bf16 products (train.matmul): the kept dequantized weights' bfloat16 copies
                (2 bytes a weight, outside MLX's arrays), and the logits' gradient rounded for
                the head's backward product (2 bytes a logit)
  released      with bf16 products, the kept fp32 weights' memory, given back to the system once
                their copies exist (backend.matmul_precision): MLX still counts it, the process
                does not hold it, so it is taken off the total

The per-token and per-score byte counts are measured, not derived: fitted to MLX's peak
(mx.get_peak_memory) during edgeft's own trainer.train (packed CPU batches) over tiny models
(9 shapes: width 64-256, MLP 128-1024, 2 or 4 layers, 4 or 8 heads; 7 batch shapes each) and
the real SmolLM2-135M at 10 batch shapes from 1x128 to 4x256 and 1x1024 (mlx 0.32.4, Linux
x86_64 CPU, SmolLM2 weighted as much as all tiny shapes together; last refitted after the
exp-heavy ops became MLX primitives (edgeft/_kernels.cpp: fewer intermediate arrays; the fused
cross-entropy holds 8 bytes a logit, the logits and their gradient, measured alone, where the
old fit held 16) and a lone long sample split over two streams, which had moved the old fit to
+4% to +13% on SmolLM2, up to +46% on tiny shapes and +16-22% on Gemma 3 270M). The per-token
counts were refitted again when attention became the flash kernel, which holds no scores (the
fit before it read -3% to +1% on SmolLM2, -8% to +5% on tiny shapes); the attention's two
coefficients are from before it, for the composed attention and MLX's. The estimate is within
-1% to +2% on every SmolLM2 shape, -5% to +9% on the tiny shapes.
With gradient checkpointing each block keeps only its input and one block is redone at a time:
over SmolLM2's measured peak by 17-21% (measured before the refit, not since), but far under on
tiny models, whose peak MLX raises 2-4x with checkpointing on (so auto_fit never turns it on).
On Metal (not measured here) weights are not dequantized and activations are half width.

The batch weighed is the largest of those the run will draw (the seed fixes which samples each
step gets: batches.drawn_shapes); the largest the data could form (its longest samples in one
batch, batch_shape) is kept beside it as `worst_case`, shown, but not what a run is refused on.

Disk: the checkpoints kept (one more while a new one is written), the final adapters, and the
exported GGUF at its quantization (plus llama.cpp's f16 intermediate for K-quants).

One job, past ~400 lines: the estimate, its inputs (the model's shape, and its quantization as
each file format stores it, read without loading weights) and its two checks (tune's preflight,
`edgeft plan`) change together whenever the training step changes. The machine's figures come
from edgeft.system, the training-time estimate is edgeft.timing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from edgeft import cpu_kernels, system
from edgeft.errors import UserError

# What a training run adds outside MLX's arrays after the preflight measured the process: the
# fused kernels MLX compiles and loads, its stream threads, allocator slack. Measured 14-20 MB
# on tiny-model runs at batch 4 and 8 (19-32 MB while weights were dequantized every step), the
# same in two installs whose baselines differ by 11 MB.
RUNTIME_GROWTH = 17_000_000


@dataclass(frozen=True)
class Coefficients:
    """Bytes per unit of the estimate, fitted (see the module docstring); scripts/calibrate_plan.py
    refits all but logits_per_v and passes its trial values to estimate_peak_bytes."""

    act_per_h: float  # saved per token, per adapted layer, per hidden unit (~2 fp32 values)
    act_per_i: float  # ... per MLP intermediate unit (~3.7 fp32 values)
    transient_per_i: float  # one layer's backward temporaries, per token per intermediate unit
    attn_saved: float  # per head, per (query, key) pair, per adapted layer
    attn_transient: float  # per head, per (query, key) pair, one layer at a time
    logits_per_v: float  # per loss position per vocabulary entry: the logits and their gradient


FITTED = Coefficients(act_per_h=39.5, act_per_i=8.6, transient_per_i=29.0, attn_saved=2.1,
                      attn_transient=3.1, logits_per_v=8.0)
LORA_COPIES = 5  # fp32: parameters, 2 AdamW moments, gradient, clipped gradient
CHECKPOINT_FILES = 3  # adapters + optimizer moments: 3 fp32 values per adapter parameter

# GGUF export size per weight, in bits (K-quants: llama.cpp's typical mixes).
EXPORT_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0,
               "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6}
K_QUANT_INTERMEDIATE = "f16"

TARGET_DIMS = {  # projection -> (in, out) in terms of the config
    "q_proj": ("H", "Q"), "k_proj": ("H", "KV"), "v_proj": ("H", "KV"), "o_proj": ("Q", "H"),
    "gate_proj": ("H", "I"), "up_proj": ("H", "I"), "down_proj": ("I", "H"),
}


@dataclass
class QuantInfo:
    """How the base model sits in memory."""

    weight_bytes: int  # all base parameters as held in memory for training
    linear_quantized: bool  # projections stored quantized (the CPU path dequantizes copies)
    head_quantized: bool  # the vocabulary projection (tied embedding or lm_head) is quantized
    device: str = "cpu"  # "cpu" or "gpu"
    source: str = ""  # what the numbers were read from, for messages


@dataclass
class Breakdown:
    """Estimated peak bytes of a training step, by cause."""

    runtime: int
    weights: int
    lora: int
    dequantized: int
    activations: int
    attention: int
    logits: int
    transient: int
    bf16_copies: int = 0  # outside MLX (edgeft/_sgemm.c), so not part of .mlx
    released: int = 0  # part of .mlx, not held by the process (so off the total)
    batch_size: int = 0
    seq_len: int = 0
    tokens: int = 0  # input tokens of the batch (batch_size x seq_len, or the packed row)
    loss_tokens: int = 0
    grad_checkpoint: bool = False
    packed: bool = False  # the batch trains as one unpadded row
    worst_case: int = 0  # total on the largest batch the data could form (0: not weighed)
    parts: tuple = ("runtime", "weights", "lora", "dequantized", "activations", "attention",
                    "logits", "transient", "bf16_copies", "released")

    @property
    def mlx(self) -> int:
        """What MLX allocates (comparable to mx.get_peak_memory())."""
        return self.total - self.runtime - self.bf16_copies + self.released

    @property
    def total(self) -> int:
        """What the process holds at the peak."""
        return sum(getattr(self, p) for p in self.parts if p != "released") - self.released

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "parts"}
        return {**d, "mlx": self.mlx, "total": self.total}

    def lines(self) -> list[str]:
        out = [f"  {p:12} {gb(getattr(self, p)):>9}" if p != "released" else f"  {p:12} {'-' + gb(self.released):>9}"
               for p in self.parts if p not in ("bf16_copies", "released") or getattr(self, p)]
        out.append(f"  {'total':12} {gb(self.total):>9}")
        if self.worst_case > self.total:
            out.append(f"  ({gb(self.worst_case)} if the data's largest samples fell into one batch; "
                       "this run's seed never draws that batch)")
        return out


@dataclass
class DiskPlan:
    checkpoints: int
    adapters: int
    export: int
    metrics: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.checkpoints + self.adapters + self.export + self.metrics


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------
# The model's shape


def dims(config: dict) -> dict[str, int]:
    """H (hidden), I (MLP), Q (query width), KV (key/value width), L, V, heads of a ModelArgs dict."""
    H = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or H // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return {"H": H, "I": int(config["intermediate_size"]), "Q": heads * head_dim,
            "KV": kv_heads * head_dim, "L": int(config["num_hidden_layers"]),
            "V": int(config["vocab_size"]), "heads": heads}


def base_parameters(config: dict) -> int:
    """Parameters of the base model (projections, embeddings, norms)."""
    d = dims(config)
    per_layer = sum(_numel(d, t) for t in TARGET_DIMS) + 2 * d["H"]
    head = 0 if config.get("tie_word_embeddings", True) else d["V"] * d["H"]
    return d["L"] * per_layer + d["V"] * d["H"] + head + d["H"]


def _numel(d, target) -> int:
    i, o = TARGET_DIMS[target]
    return d[i] * d[o]


def adapted_layers(config: dict, lora_cfg) -> int:
    L = dims(config)["L"]
    return L if lora_cfg.layers is None else max(0, min(int(lora_cfg.layers), L))


def lora_parameters(config: dict, lora_cfg) -> int:
    """Trainable parameters: rank x (in + out) per adapted projection."""
    d = dims(config)
    per_layer = 0
    for t in lora_cfg.targets:
        if t in TARGET_DIMS:
            i, o = TARGET_DIMS[t]
            per_layer += lora_cfg.rank * (d[i] + d[o])
    return adapted_layers(config, lora_cfg) * per_layer


# ---------------------------------------------------------------------------------------------
# Memory


def estimate_peak_bytes(config: dict, lora_cfg, batch_size: int, seq_len: int, quant: QuantInfo,
                        *, loss_tokens: int | None = None, grad_checkpoint: bool = False,
                        runtime_bytes: int | None = None, lengths: list[int] | None = None,
                        bf16: bool = False, coefficients: Coefficients = FITTED) -> Breakdown:
    """Peak memory of a training step on a batch of `batch_size` x `seq_len` tokens, of which
    `loss_tokens` (default: all) carry loss. `lengths`: the batch's sequence lengths when the
    step packs them into one unpadded row (batches.pack, the CPU path): then the tokens are
    their sum and the attention pairs the sum of their squares. `runtime_bytes`: what the
    process holds besides (default: measured now, measure_runtime_bytes()). `bf16`: the step's
    products go in bfloat16 (backend.bf16_products). `coefficients`: the fitted bytes per unit
    (FITTED). See the module docstring."""
    if runtime_bytes is None:
        runtime_bytes = measure_runtime_bytes()
    c = coefficients
    d = dims(config)
    L = adapted_layers(config, lora_cfg)
    B, T = int(batch_size), int(seq_len)
    N = sum(lengths) if lengths else B * T
    square = sum(n * n for n in lengths) if lengths else B * T * T
    K = N if loss_tokens is None else min(int(loss_tokens), N)
    cpu = quant.device == "cpu"
    width = 1.0 if cpu else 0.5  # fp32 on CPU; half-precision activations on Metal (unmeasured)

    proj = sum(_numel(d, t) for t in TARGET_DIMS)  # projection weights of one layer
    deq_layer = 4 * proj if (cpu and quant.linear_quantized) else 0
    deq_head = 4 * d["V"] * d["H"] if (cpu and quant.head_quantized) else 0
    per_token_layer = c.act_per_h * d["H"] + c.act_per_i * d["I"]
    flash = cpu and bool(lengths) and cpu_kernels.flash_attention()  # see "attention" above
    pairs = 0 if flash else d["heads"] * square
    if grad_checkpoint:  # each block keeps its input; one block at a time is redone
        dequantized = deq_head + deq_layer
        activations = N * (4 * d["H"] * L + per_token_layer)
        attention = pairs * (c.attn_saved + c.attn_transient)
    else:
        dequantized = deq_head + deq_layer * L
        activations = N * L * per_token_layer
        attention = pairs * (c.attn_saved * L + c.attn_transient)
    return Breakdown(
        runtime=int(runtime_bytes),
        weights=int(quant.weight_bytes),
        lora=LORA_COPIES * 4 * lora_parameters(config, lora_cfg),
        dequantized=int(dequantized),
        activations=int(width * activations),
        attention=int(width * attention),
        logits=int(c.logits_per_v * K * d["V"]),
        transient=int(width * c.transient_per_i * N * d["I"]),
        # the weights kept for the run (dequant.keep_dequantized: not with checkpointing), held
        # as bf16 copies instead (backend.matmul_precision); and the logits' gradient rounded to
        # bf16 for the head's backward product (Gemma 3 270M's 262k vocabulary: -11% without)
        bf16_copies=((0 if grad_checkpoint else int(dequantized // 2)) + 2 * K * d["V"]) if bf16 and cpu else 0,
        released=int(dequantized) if bf16 and cpu and not grad_checkpoint else 0,
        batch_size=B, seq_len=T, tokens=N, loss_tokens=K, grad_checkpoint=grad_checkpoint,
        packed=bool(lengths),
    )


def measure_runtime_bytes() -> int:
    """What this process holds outside MLX's buffers now (system.bytes_outside_mlx), plus what
    training will add (RUNTIME_GROWTH). Measured rather than assumed: the same packages'
    builds differ by 30 MB and more here (MKL's OpenMP runtime alone 16-31 MB)."""
    return system.bytes_outside_mlx() + RUNTIME_GROWTH


def quant_info_from_model(model, device: str | None = None) -> QuantInfo:
    """From a loaded model after backend.prepare (exact bytes of what is in memory)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from edgeft.device import on_cpu

    device = device or ("cpu" if on_cpu() else "gpu")
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    quantized = [n for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    head = "lm_head" if "lm_head" in model else "model.embed_tokens"
    return QuantInfo(
        weight_bytes=weight_bytes,
        linear_quantized=any(".layers." in n for n in quantized),
        head_quantized=head in quantized,
        device=device,
        source="the loaded model",
    )


def quant_info_from_gguf(path, quantize_bits: int | None = None, device: str = "cpu") -> QuantInfo:
    """From a GGUF's tensor table, as edgeft's loader and backend will hold it (no weights read)."""
    from edgeft import gguf_reader as G
    from edgeft.loader import (
        QUANT_GROUP_SIZE,
        held_bits,
        held_scale_bytes,
        read_natively,
    )
    from edgeft.rope_scaling import ROPE_TENSORS

    index = G.read_index(path)
    native = read_natively(index)
    total, linear_q, head_q = 0, False, False
    # scale + bias per weight (backend.prepare makes them float32 on CPU)
    group_bytes = 2 * (4 if device == "cpu" else held_scale_bytes(native)) / QUANT_GROUP_SIZE
    names = {t.name for t in index.tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    for t in index.tensors:
        if t.name in ROPE_TENSORS:  # the loader folds them into the config
            continue
        n = 1
        for s in t.shape:
            n *= s
        bits = held_bits(t, native, quantize_bits)
        if bits is None:
            total += n * (4 if device == "cpu" or G.ggml_type_name(t.ggml_type) == "F32" else 2)
            continue
        total += n * (bits / 8 + group_bytes)
        linear_q = linear_q or t.name.startswith("blk.")
        head_q = head_q or t.name == head
    return QuantInfo(int(total), linear_q, head_q, device, source=str(path))


def quant_info_from_folder(path, config: dict, quantize_bits: int | None = None,
                           device: str = "cpu") -> QuantInfo:
    """From an HF/MLX folder's safetensors headers (no weights read)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U32": 4, "I32": 4, "U8": 1, "I8": 1}
    total, quantized = 0, "quantization" in config
    for f in sorted(Path(path).glob("*.safetensors")):
        if f.name.startswith("adapter"):
            continue
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 100 * 2**20)))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for s in info["shape"]:
                numel *= s
            size = sizes.get(info["dtype"], 4)
            if info["dtype"] in ("F16", "BF16") and device == "cpu":
                size = 4  # backend.prepare makes half floats fp32 on CPU
            if quantize_bits and not quantized and len(info["shape"]) == 2 and info["dtype"] in ("F16", "BF16", "F32"):
                total += numel * (quantize_bits / 8 + (8 if device == "cpu" else 4) / 32)
            else:
                total += numel * size
    q = quantized or bool(quantize_bits)
    return QuantInfo(int(total), q, q, device, source=str(path))


# ---------------------------------------------------------------------------------------------
# Disk


def estimate_disk_bytes(config: dict, lora_cfg, keep_checkpoints: int, export_quant: str | None,
                        steps: int = 0) -> DiskPlan:
    """Bytes a run writes: checkpoints (keep + 1 while saving), adapters, export, metrics."""
    p = lora_parameters(config, lora_cfg)
    ckpt = CHECKPOINT_FILES * 4 * p + 64 * 1024  # + headers and state.json
    plan = DiskPlan(
        checkpoints=(max(keep_checkpoints, 1) + 1) * ckpt,
        adapters=4 * p + 16 * 1024,
        export=0,
        metrics=400 * max(steps, 1),
    )
    if export_quant:
        q = export_quant.lower()
        n = base_parameters(config)
        plan.export = int(n * EXPORT_BITS.get(q, 16) / 8)
        if q in ("q4_k_m", "q5_k_m", "q6_k"):
            plan.export += int(n * EXPORT_BITS[K_QUANT_INTERMEDIATE] / 8)
            plan.notes.append(f"includes llama.cpp's {K_QUANT_INTERMEDIATE} intermediate for {q}")
    return plan


# ---------------------------------------------------------------------------------------------
# Preflight: refuse with numbers, or make the run fit


class PlanError(UserError, ValueError):
    """The run will not fit; the message gives the numbers and what to change."""


@dataclass
class Fit:
    batch_size: int
    grad_accum: int
    grad_checkpoint: bool
    memory: Breakdown
    changes: list[str]


def fit_memory(estimate, batch_size: int, grad_accum: int, grad_checkpoint: bool,
               available: int | None, auto_fit: bool, where: str = "") -> Fit:
    """Check the estimate against `available`. With auto_fit, lower the batch to the largest
    divisor of it that fits, raising grad_accum so each optimizer step sees the same samples.
    (Gradient checkpointing is not switched on for you: measured on MLX's CPU backend it cut
    SmolLM2's peak by ~75% but raised a tiny model's 2-4x, so it stays the user's choice.)
    `estimate(batch_size, grad_checkpoint)` -> Breakdown."""
    mem = estimate(batch_size, grad_checkpoint)
    changes: list[str] = []
    if available is None or mem.total <= available:
        return Fit(batch_size, grad_accum, grad_checkpoint, mem, changes)
    need = mem.total
    if not auto_fit:
        raise PlanError(
            f"{where}needs about {gb(need)} of memory (batch {mem.batch_size} x {mem.seq_len} "
            f"tokens), but {gb(available)} is available; lower --batch-size or --max-seq-len, "
            "try --grad-checkpoint, or set train.auto_fit: true to let edgeft lower the batch"
        )
    start, samples = batch_size, batch_size * grad_accum
    for b in sorted((b for b in range(1, start) if start % b == 0), reverse=True):
        if mem.total <= available:
            break
        batch_size, grad_accum = b, samples // b
        mem = estimate(batch_size, grad_checkpoint)
    if batch_size != start:
        changes.append(f"batch size {start} -> {batch_size} with grad_accum {grad_accum} "
                       "(the same samples per optimizer step)")
    if mem.total > available:
        raise PlanError(
            f"{where}needs about {gb(mem.total)} of memory even at batch size 1 (about "
            f"{gb(need)} as configured), but {gb(available)} is available; use a smaller model or "
            "a shorter --max-seq-len, or try --grad-checkpoint"
        )
    return Fit(batch_size, grad_accum, grad_checkpoint, mem, changes)


def batch_shape(samples, batch_size: int, max_seq_len: int) -> tuple[int, int, list[int]]:
    """(seq_len, loss tokens, lengths) of the largest batch `samples` can form, as
    edgeft.batches pads and packs it (batches.batch_shape)."""
    from edgeft import batches

    return batches.batch_shape(samples, batch_size, max_seq_len)


def packs(model=None, config: dict | None = None) -> Callable[[list[int]], bool]:
    """Whether training packs a batch of samples of these lengths into one unpadded row
    (backend.can_pack; a sliding-window model packs any where the flash kernel applies the
    window per sample, else only samples that fit it): asked
    of `model`, or of a skeleton built from `config` (lazy arrays: nothing is allocated)."""
    from edgeft import backend
    from edgeft.device import on_cpu

    if not on_cpu():
        return lambda lengths: False
    if model is None:
        from edgeft.loader import build_model

        model = backend.prepare(build_model(config), cpu=True)
    return lambda lengths: backend.can_pack(model, tuple(lengths))


def preflight(cfg, loaded, samples, run_dir, resume: bool = False, *, log: Callable[[str], None],
              share: int = 1) -> Breakdown:
    """Before training: refuse a run that will not fit in memory or on disk, with the numbers,
    or (train.auto_fit, new runs only) change cfg.train so that it fits. Returns the estimate.
    `share`: the processes (ranks) training side by side on this machine, each planned against
    its share of the free memory."""
    from edgeft import backend

    t = cfg.train
    quant = quant_info_from_model(loaded.model)
    packed = packs(loaded.model)
    estimate = step_estimator(loaded.config, cfg.lora, samples, cfg.model.max_seq_len, quant, packed,
                              seed=t.seed, samples_drawn=t.steps * t.batch_size * t.grad_accum,
                              bf16=backend.bf16_products(t.matmul)[0])
    available, source = system.available_memory()
    if available is not None:
        available //= max(share, 1)
        if source.startswith("MemAvailable"):
            available += system.current_rss()  # what this process holds already is part of the budget
    fit = fit_memory(estimate, t.batch_size, t.grad_accum, t.grad_checkpoint, available,
                     bool(t.auto_fit) and not resume, where="this run ")
    if fit.changes:
        log(f"to fit in {gb(available)} of memory: {'; '.join(fit.changes)}")
        t.batch_size, t.grad_accum, t.grad_checkpoint = fit.batch_size, fit.grad_accum, fit.grad_checkpoint
    disk = estimate_disk_bytes(loaded.config, cfg.lora, t.keep_checkpoints,
                               cfg.export.quant if cfg.export.enabled else None, t.steps)
    free = system.free_disk(run_dir)
    if disk.total > free:
        parts = f"checkpoints {gb(disk.checkpoints)}, adapters {gb(disk.adapters)}"
        if disk.export:
            parts += f", {cfg.export.quant} export {gb(disk.export)}"
        raise PlanError(
            f"this run needs about {gb(disk.total)} of disk in {run_dir} ({parts}), but only "
            f"{gb(free)} is free; free some space, pass --no-export, or lower train.keep_checkpoints"
        )
    return fit.memory


def step_estimator(config: dict, lora_cfg, samples, max_seq_len: int, quant: QuantInfo,
                   packed: Callable[[list[int]], bool], *, seed: int | None = None, samples_drawn: int = 0,
                   bf16: bool = False) -> Callable[[int, bool], Breakdown]:
    """estimate(batch_size, grad_checkpoint) for fit_memory: the peak of a step on the largest of
    the batches the run will draw (batches.drawn_shapes: `samples_drawn` samples in the order
    `seed` gives), with the worst case, the largest batch `samples` could form (batch_shape),
    kept beside it as `worst_case`; without a seed or samples, the worst case itself. The
    runtime part is measured once, now: every batch size tried is weighed against the same."""
    from edgeft import batches

    runtime = measure_runtime_bytes()

    def peak(batch_size, grad_checkpoint, width, loss_tokens, lengths) -> Breakdown:
        return estimate_peak_bytes(config, lora_cfg, batch_size, width, quant, loss_tokens=loss_tokens,
                                   grad_checkpoint=grad_checkpoint, lengths=list(lengths) if packed(lengths) else None,
                                   runtime_bytes=runtime, bf16=bf16)

    def estimate(batch_size: int, grad_checkpoint: bool) -> Breakdown:
        worst = peak(batch_size, grad_checkpoint, *batch_shape(samples, batch_size, max_seq_len))
        if seed is None or not samples or samples_drawn < 1:
            return worst
        shapes = batches.drawn_shapes(samples, batch_size, seed, -(-samples_drawn // batch_size))
        real = max((peak(batch_size, grad_checkpoint, *shape) for shape in shapes), key=lambda b: b.total)
        real.worst_case = worst.total
        return real

    return estimate


def plan_run(cfg, runs_dir: Path = Path("runs")) -> tuple[list[str], bool]:
    """What `edgeft plan` prints for a configuration, without loading the weights, and whether
    `edgeft tune` would start (after auto_fit's changes, if allowed) with its runs in runs_dir."""
    from edgeft import backend, batches, data_files, hub
    from edgeft.device import on_cpu
    from edgeft.runs import load_model

    path = hub.resolve(cfg.model.name)
    loaded = load_model(path, False, cfg.data.chat_template, tokenizer_only=True)
    device = "cpu" if on_cpu() else "gpu"
    if loaded.fmt == "gguf":
        quant = quant_info_from_gguf(loaded.path, cfg.model.quantize_bits, device)
    else:
        quant = quant_info_from_folder(loaded.path, loaded.config, cfg.model.quantize_bits, device)
    t, config = cfg.train, loaded.config
    samples, shape_from = [], f"max_seq_len {cfg.model.max_seq_len}, every token carrying loss"
    train_file, valid_file = data_files.training_files(cfg.data.train, cfg.data.valid)
    if train_file:
        samples, _ = data_files.load_samples(train_file, loaded.tokenizer, cfg.data, cfg.model.max_seq_len)
        shape_from = f"the batches this run draws from {train_file}"
        if not valid_file:  # tune splits its validation samples off first, as here
            samples, _ = batches.split(samples, cfg.data.valid_fraction, t.seed)

    packed = packs(config=config)
    estimate = step_estimator(config, cfg.lora, samples, cfg.model.max_seq_len, quant, packed,
                              seed=t.seed, samples_drawn=t.steps * t.batch_size * t.grad_accum,
                              bf16=backend.bf16_products(t.matmul)[0])
    n_lora = lora_parameters(config, cfg.lora)
    d = dims(config)
    mem = estimate(t.batch_size, t.grad_checkpoint)
    lines = [
        f"model {path}: {base_parameters(config) / 1e6:.1f}M parameters, {d['L']} layers, "
        f"{gb(quant.weight_bytes)} in memory on {device}",
        f"LoRA rank {cfg.lora.rank} on {adapted_layers(config, cfg.lora)} layers: {n_lora / 1e6:.2f}M trainable",
        (f"largest batch drawn: {mem.batch_size} samples packed into {mem.tokens} tokens" if mem.packed else
         f"largest batch drawn: {mem.batch_size} x {mem.seq_len} tokens")
        + f", {mem.loss_tokens} carry loss ({shape_from}); gradient checkpointing "
        f"{'on' if t.grad_checkpoint else 'off'}",
        "peak memory of a training step (estimate):",
        *mem.lines(),
    ]
    available, source = system.available_memory()
    ok = True
    try:
        fit = fit_memory(estimate, t.batch_size, t.grad_accum, t.grad_checkpoint, available, bool(t.auto_fit))
        verdict = "fits" if not fit.changes else f"fits after auto_fit: {'; '.join(fit.changes)} ({gb(fit.memory.total)})"
    except PlanError as e:
        ok, verdict = False, f"does not fit: {e}"
    lines.append(f"memory available: {gb(available) if available else 'unknown'} ({source}): {verdict}")
    disk = estimate_disk_bytes(config, cfg.lora, t.keep_checkpoints,
                               cfg.export.quant if cfg.export.enabled else None, t.steps)
    free = system.free_disk(runs_dir)
    parts = f"{max(t.keep_checkpoints, 1) + 1} checkpoints {gb(disk.checkpoints)}, adapters {gb(disk.adapters)}"
    if disk.export:
        parts += f", {cfg.export.quant} export {gb(disk.export)}"
    disk_ok = disk.total <= free
    ok = ok and disk_ok
    lines.append(f"disk: about {gb(disk.total)} ({parts}); {gb(free)} free in {runs_dir}: "
                 f"{'fits' if disk_ok else 'does not fit'}")
    lines += [f"  note: {n}" for n in disk.notes]
    return lines, ok
