"""How quantized weights multiply, decided in this one place.

Metal: MLX's fused ``mx.quantized_matmul`` is fast; nothing changes.
CPU: ``mx.quantized_matmul`` runs ~50x slower than dequantizing the weight and doing an fp32
matmul through BLAS (1024x576 @ 576x1536: 800 ms against 15 ms, ../shared/FACTS.md), and CPU
half-precision matmul has no BLAS path at all. So on CPU every quantized layer dequantizes
its weight just in time (the base stays 4-bit in memory) and the model computes in fp32.

The training forward (CPU): inside ``fast_forward()`` a prepared model computes the exp-heavy
ops (SiLU, GELU-tanh, the attention softmax, the loss's cross-entropy) 1.5-4x faster
than MLX (cpu_kernels.py), and takes packed batches: the samples of a batch laid end to end in
one row with no padding, attention within each sample and RoPE positions restarting at 0 for
each, so every sample gets exactly what it would get alone. A model with a sliding window packs
the batches whose samples all fit it (within a sample its attention is then causal). A step's
samples go to the cores' streams in groups; a lone long sample as two segments, the second
attending over the first's keys and values (Prefix). mlx-lm's models are used unchanged:
``prepare`` gives their RoPE modules and Gemma's GELU MLPs a twin class and routes the
``scaled_dot_product_attention`` and ``swiglu`` their module calls, and LoRALinear's, through
dispatchers that act only inside ``fast_forward``.

One job, past ~600 lines: the twins, the dispatchers, the packing rule they share
(``pack_refusal``), the stream groups and the split sample all read the one ``fast_forward``
state, and change together whenever mlx-lm's attention or a family's MLP does.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from edgeft import _blas, cpu_kernels
from edgeft.dequant import (
    DequantizedEmbedding,
    DequantizedLinear,
    dequantized_weight,
    in_forward,
)
from edgeft.device import on_cpu

# How MLX orders a graph's ops for its streams: breadth first until this many are pending at one
# depth, then depth first. At its default (20) a training step's 420 adapter gradients overflow
# it, and the ops of the stream groups (loss.stream_split) went out one group after the other,
# so the cores took turns. At 100: SmolLM2, batch 4, one eval per step: 154 -> 243 tokens/s
# (300: 238). MLX reads it once, at its first evaluation: one is made here with the variable
# set, which is then taken out of the environment again (_blas.set_while). The user's setting
# wins; MLX evaluating before edgeft is imported keeps MLX's. Linux CPU only: not measured on Metal.
if sys.platform == "linux":
    with _blas.set_while("MLX_BFS_MAX_WIDTH", "100"):
        mx.eval(mx.zeros(1) + 1)


_CPU_CLASSES = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}
# mlx-lm's MLPs computing down_proj(nn.gelu_approx(gate_proj(x)) * up_proj(x)). They reach the
# activation through mlx.nn, so a twin class routes it, not a hook on their module.
_GELU_MLPS = {("mlx_lm.models.gemma3_text", "MLP"), ("mlx_lm.models.gemma2", "MLP")}


def prepare(model: nn.Module, cpu: bool | None = None) -> nn.Module:
    """Make `model` compute the fast way for the current device (in place; returns it).

    On CPU: quantized layers switch to their dequantize-then-BLAS twins (same parameters,
    same file layout), half-precision parameters become fp32, and the attention layers learn
    to take packed batches (see :func:`can_pack`).
    """
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return model
    for _, module in model.named_modules():
        twin = _CPU_CLASSES.get(type(module))
        if twin is not None:
            module.__class__ = twin
        elif (type(module).__module__, type(module).__name__) in _GELU_MLPS:
            module.__class__ = _gelu_mlp_class(type(module))
    for attn in _attention_modules(model):
        attn.rope.__class__ = _packed_rope_class(type(attn.rope))
        if hasattr(attn, "is_sliding"):
            attn.__class__ = _sliding_attention_class(type(attn))
        arch = sys.modules[type(attn).__module__]
        _hook(arch, "scaled_dot_product_attention", _fast_sdpa)
        _hook(arch, "swiglu", _fast_swiglu)
    _hook(LoRALinear, "__call__", _fast_lora)

    def to_fp32(x):
        return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x

    model.update(tree_map(to_fp32, model.parameters()))
    return model


def prepare_inference(model: nn.Module, cpu: bool | None = None) -> nn.Module:
    """Make `model` fast at generating one token at a time (in place; returns it).

    On CPU a one-row product is memory-bound, and both MLX's 4-bit kernel and just-in-time
    dequantization run it at well under 1 GFLOP/s; fp32 weights through BLAS are ~10x faster.
    So every quantized layer is dequantized once (memory: 4 bytes a weight). Adapters are the
    caller's: merge them first (lora.merge) to have them dense too. On Metal the model stays as
    it is.
    """
    if cpu is None:
        cpu = on_cpu()
    if not cpu:
        return model
    dense = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = dequantized_weight(module).astype(mx.float32)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            lin.weight = w
            if "bias" in module:
                lin.bias = module["bias"]
            dense.append((name, lin))
        elif isinstance(module, nn.QuantizedEmbedding):
            w = dequantized_weight(module).astype(mx.float32)
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            dense.append((name, emb))
    if dense:
        model.update_modules(tree_unflatten(dense))
    mx.eval(model.parameters())
    return model


# The products of a CPU training step in bfloat16 (train.matmul): inputs rounded to bf16, sums in
# fp32, through MKL's cblas_gemm_bf16bf16f32 (edgeft/_sgemm.c). "auto" takes it where a start-up
# measurement (_blas.bf16_speedup, rounding included) finds it at least this much faster.
BF16_MIN_SPEEDUP = 1.3


def bf16_products(setting: str) -> tuple[bool, str | None]:
    """Whether a training step's CPU products go in bf16 under train.matmul = `setting` ("fp32",
    "bf16", or "auto": where they measure BF16_MIN_SPEEDUP x faster), and a line saying why
    (None on Metal, where MLX computes as it does, and for "fp32", which the user chose)."""
    if not on_cpu() or setting == "fp32":
        return False, None
    if not _blas.bf16_available():
        why = _blas.SPLIT if _blas.LOADED and _blas.LOADED[0] == "MKL" else f"the BLAS is {_blas.LOADED[0]}"
        return False, f"matrix products in fp32: no bfloat16 path here ({why}; it needs MKL and edgeft._sgemm)"
    speed = _blas.bf16_speedup()
    use = setting == "bf16" or speed >= BF16_MIN_SPEEDUP
    reason = "train.matmul bf16" if setting == "bf16" else f"train.matmul auto takes bf16 from {BF16_MIN_SPEEDUP}x"
    return use, f"matrix products in {'bf16' if use else 'fp32'}: bf16 measured {speed:.2f}x fp32's speed on this CPU ({reason})"


@contextmanager
def matmul_precision(setting: str, log=print):
    """Inside the block (a training loop), the CPU's products are as bf16_products(setting) says;
    logs why. Yields keep(w): call it with each weight that stays as it is for the whole block and
    that only the block's products read (the kept dequantized base, dequant.keep_dequantized's
    on_keep). With bf16 products, keep rounds it to bfloat16 once and gives its fp32 memory back
    to the system: SmolLM2's kept weights take 2 bytes a weight instead of 6 (peak RSS of the
    default run 1.95 -> 1.43 GB). After the block such a weight holds its bf16 values if anything
    still holds it, else zeros until it is freed (_blas.fix)."""
    use, why = bf16_products(setting)
    if why:
        log(why)
    with _blas.bf16(use):
        yield lambda w: _blas.fix([w], release=True)


# ---------------------------------------------------------------------------------------------
# The training forward on CPU: packed batches, fused kernels for exp-heavy ops


class PackingError(RuntimeError):
    pass


@dataclass(frozen=True)
class Packing:
    """A row of samples of these lengths laid end to end (axis -2 of attention tensors), of a
    model with a sliding `window` or none. Attention runs within each sample: its sliding layers
    (the window's mask of the whole row) with the window where a sample passes it, which needs
    the flash kernel and layers known to be sliding or not (pack_refusal). With `start`, the
    first sample continues one whose first `start` tokens another segment computes (a Prefix):
    its positions start there."""

    lengths: tuple[int, ...]
    window: int | None = None
    start: int = 0

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def check(self, x: mx.array) -> None:
        if x.ndim < 3 or x.shape[0] != 1 or x.shape[-2] != self.total:
            raise PackingError(f"packed batch of {self.total} tokens, but a tensor of shape {tuple(x.shape)}")

    def split(self, x: mx.array) -> list[mx.array]:
        self.check(x)
        parts, start = [], 0
        for n in self.lengths:
            parts.append(x[..., start : start + n, :])
            start += n
        return parts

    def join(self, parts: list[mx.array]) -> mx.array:
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)


@dataclass
class Prefix:
    """The first segment of a sample split in two (loss.lm_loss, sample_streams): its forward
    records each attention layer's keys and values, in layer order; the second segment's
    forward takes them in the same order and attends over them before its own."""

    length: int
    kv: list[tuple[mx.array, mx.array]] = field(default_factory=list)
    taken: int = 0

    def take(self) -> tuple[mx.array, mx.array]:
        if self.taken >= len(self.kv):
            raise PackingError(f"the second segment reached attention layer {self.taken + 1}, the first recorded {len(self.kv)}")
        self.taken += 1
        return self.kv[self.taken - 1]


# Faster kernels (edgeft/cpu_kernels.py) for SiLU, softmax and cross-entropy inside fast_forward;
# False: MLX's own ops (for A/B measurements, scripts/profile_step.py).
FUSED_KERNELS = True


@dataclass(frozen=True)
class _Forward:
    packing: Packing | None
    kernels: bool
    prefix: Prefix | None = None  # a split sample's first segment: record into it, or ...
    extend: bool = False  # ... the second: attend over it first


_FORWARD: ContextVar[_Forward | None] = ContextVar("edgeft_forward", default=None)


@contextmanager
def fast_forward(packing: Packing | None = None, prefix: Prefix | None = None, extend: bool = False):
    """Within: a model prepared for CPU computes its forward (and the backward built from it)
    the fast way: exp-heavy ops as fused kernels, and with `packing` its input row holds samples
    end to end. With `prefix` the row is one segment of a sample split in two: the first records
    its keys and values into it, the second (`extend`, its packing's `start` the first's length)
    attends over them. Outside (generation, plain calls) the model computes as mlx-lm wrote it."""
    if prefix is not None and (packing is None or len(packing.lengths) != 1 or packing.start != (prefix.length if extend else 0)):
        raise PackingError("a split sample's segment is one packed sample, the second starting where the first ends")
    token = _FORWARD.set(_Forward(packing, FUSED_KERNELS and on_cpu(), prefix, extend))
    try:
        with in_forward():
            yield
    finally:
        _FORWARD.reset(token)


def keep_weights(model: nn.Module) -> None:
    """Inside dequant.keep_dequantized: dequantize (and keep, and hand to its on_keep) every weight
    the training forward uses, now, with a one-token forward outside any gradient trace. Made
    inside mx.value_and_grad instead, each kept weight, evaluated there, left MLX holding ~19x
    its size until the step ended (Gemma 3 270M: peak RSS 6.3 GB against 2.3)."""
    with fast_forward():
        mx.eval(model(mx.zeros((1, 1), dtype=mx.int32)))


# Streams: MLX runs each stream's ops on its own thread, and its CPU elementwise ops use one
# core. Independent samples on one stream per core (BLAS with the cores left over each) keep
# every core busy. Each group gets its own forward and backward graph (loss.stream_split):
# SmolLM2, batch 4, 2 streams on 2 cores: ~205 tokens/s against ~165 on one stream
# (scripts/profile_step.py ab base one-stream).
# None: one stream per core, at most one per sample; 1: everything on the default stream.
CPU_STREAMS: int | None = None
# The cores this process may use (None: all); several ranks on one machine share its cores.
CPU_CORES: int | None = None
_streams: list = []
_blas_threads: int | None = None
IDLE_STREAMS = True  # a step on one stream spreads its attention blocks over the cores' streams
# A step's lone sample of at least this many tokens is computed as two segments side by side,
# one stream each (sample_streams, loss.lm_loss); under grad checkpointing it is not (split_samples).
SPLIT_SAMPLE_TOKENS = 256
_SPLIT: ContextVar[bool] = ContextVar("edgeft_split_samples", default=True)


def stream_groups(lengths: tuple[int, ...], work: tuple[float, ...] | None = None) -> list[tuple[object, tuple[int, ...]]]:
    """Split the samples of a packed row into groups of about equal work (`work`: each sample's,
    default its tokens), one per CPU stream: [(stream, indices of the group's samples,
    ascending)]. Any samples may share a group: heaviest first into the lightest group
    (contiguous groups of 4 samples left the busier stream with 15% more than half the work on
    the benchmark's batches; this, 6%)."""
    work = tuple(lengths) if work is None else tuple(work)
    cores = _cores()
    k = min(CPU_STREAMS or cores, len(lengths)) if on_cpu() else 1
    if on_cpu():
        _set_blas_threads(max(1, cores // max(k, 1)))
    if k <= 1:
        return [(mx.default_stream(mx.default_device()), tuple(range(len(lengths))))]
    streams = _core_streams(k)
    load, members = [0.0] * k, [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-work[i], i)):
        g = min(range(k), key=lambda j: (load[j], j))
        load[g] += work[i]
        members[g].append(i)
    return [(streams[g], tuple(sorted(members[g]))) for g in range(k)]


def _cores() -> int:
    """The cores this process computes on (CPU_CORES, else all)."""
    return CPU_CORES or os.cpu_count() or 1


def _core_streams(n: int) -> list:
    """The first n of the cores' streams, made when first wanted (the default stream is none)."""
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


def sample_streams(tokens: int) -> tuple[object, object] | None:
    """Two of the cores' streams for a lone sample of `tokens` computed as two segments (the
    second attending over the first's keys and values, Prefix), or None where it stays whole:
    one core, one stream wanted (CPU_STREAMS), a short sample, the caller already on a stream
    group's stream, or split_samples(False). Whole, such a sample kept 1.15 of 2 cores busy
    (SmolLM2, 1024 tokens): MLX's elementwise ops take one core per stream."""
    cores = _cores()
    if (not _SPLIT.get() or not on_cpu() or cores < 2 or CPU_STREAMS == 1 or tokens < SPLIT_SAMPLE_TOKENS
            or mx.default_stream(mx.default_device()) in _streams):
        return None
    _set_blas_threads(max(1, cores // 2))
    first, second = _core_streams(2)
    return first, second


@contextmanager
def split_samples(enabled: bool):
    """Whether a lone long sample may be split across two streams (sample_streams) within. Not
    under grad checkpointing: a checkpointed layer recomputes its insides, and the second
    segment would hold on to the first's."""
    token = _SPLIT.set(enabled)
    try:
        yield
    finally:
        _SPLIT.reset(token)


# A (query, key) pair's attention work over a token's projection work, per multiply-add (scores,
# softmax and the products with V, forward and backward), for sample_streams' split point. At 1,
# 2 and 4 a 1024-token SmolLM2 sample ran within 1.5% (248, 248, 245 tokens/s), at 8 0.95x.
ATTENTION_PAIR_COST = 2.0


def pair_share(model: nn.Module) -> float:
    """One causal attention pair's work over one token's work in the layers' projections
    (ATTENTION_PAIR_COST times their multiply-adds); 0 where the shapes are not found."""
    queries = [getattr(m.q_proj, "linear", m.q_proj) for m in _attention_modules(model) if hasattr(m, "q_proj")]
    pair = sum(2 * q.weight.shape[0] for q in queries)  # heads x head size: q k and p v
    _, layers = _projection_sizes(model)
    return ATTENTION_PAIR_COST * pair / layers if pair and layers else 0.0


def _projection_sizes(model: nn.Module) -> tuple[int, int]:
    """(the vocabulary head's weights, the other projections' weights)."""
    head, layers = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            size = m["weight"].shape[0] * m["scales"].shape[-1] * m.group_size
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            size = m["weight"].shape[0] * m["weight"].shape[1]
        else:
            continue
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)) or name.split(".")[-1] == "lm_head":
            head = max(head, size)  # tied (the embedding) or not: one V x H product
        else:
            layers += size
    return head, layers


def head_share(model: nn.Module) -> float:
    """The vocabulary head's matrix work for a token that carries loss, over the layers' for any
    token: its V x H weights over the model's other projection weights (SmolLM2-135M 0.27,
    Gemma 3 270M 1.67); 0 where the shapes are not found. Stream groups balanced on tokens plus
    this times loss tokens, against tokens alone (scripts/profile_step.py ab base
    groups-by-tokens, 4 x 256, Intel Xeon): Gemma 3 270M 1.03x in three runs, SmolLM2
    0.98-1.01x in four."""
    head, layers = _projection_sizes(model)
    return head / layers if head and layers else 0.0


def _set_blas_threads(n: int) -> None:
    global _blas_threads
    if n == _blas_threads:
        return
    import ctypes

    name, path = _blas.LOADED or (None, None)
    setter = {"MKL": "MKL_Set_Num_Threads", "OpenBLAS": "openblas_set_num_threads"}.get(name)
    if setter and path and not os.environ.get("MKL_NUM_THREADS" if name == "MKL" else "OPENBLAS_NUM_THREADS"):
        getattr(ctypes.CDLL(path), setter)(n)
    _blas_threads = n


def _kernels_for(*arrays: mx.array) -> bool:
    fwd = _FORWARD.get()
    return fwd is not None and fwd.kernels and cpu_kernels.usable(*arrays)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """logsumexp(logits[i]) - logits[i, targets[i]] for each row i, the faster way inside
    fast_forward."""
    if _kernels_for(logits):
        return cpu_kernels.cross_entropy(logits, targets)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if isinstance(getattr(m, "rope", None), nn.Module)]


# Whether the attention layer being computed slides its window: set by the twins of attention
# classes that say so (mlx-lm's gemma3_text: is_sliding), None elsewhere (not known).
_SLIDING: ContextVar[bool | None] = ContextVar("edgeft_sliding", default=None)
_ATTENTION_TWINS: dict[type, type] = {}


def _sliding_attention_class(cls: type) -> type:
    if getattr(cls, "_edgeft_sliding", False):
        return cls
    if cls not in _ATTENTION_TWINS:

        def __call__(self, *args, **kwargs):
            token = _SLIDING.set(bool(self.is_sliding))
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                _SLIDING.reset(token)

        _ATTENTION_TWINS[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_edgeft_sliding": True,
                                                          "__module__": cls.__module__})  # where its sdpa is
    return _ATTENTION_TWINS[cls]


def _windows_known(attns: list[nn.Module]) -> bool:
    """Whether a sliding window can be applied per sample: the flash kernel, and every layer
    says whether it slides."""
    return cpu_kernels.flash_attention() and all(getattr(type(a), "_edgeft_sliding", False) for a in attns)


_ROPE_TWINS: dict[type, type] = {}


def _packed_rope_class(cls: type) -> type:
    if getattr(cls, "_edgeft_packed", False):
        return cls
    if cls not in _ROPE_TWINS:

        def __call__(self, x, offset=0):
            fwd = _FORWARD.get()
            if fwd is None or fwd.packing is None:
                return cls.__call__(self, x, offset)
            if not (isinstance(offset, int) and offset == 0):
                raise PackingError("a packed batch cannot continue from a cache offset")
            freqs = _rope_inverse_frequencies(self)
            if freqs is not None:
                return _rope_table(x, self.dims, self.traditional, *freqs, fwd.packing)
            parts = fwd.packing.split(x)
            return fwd.packing.join([cls.__call__(self, p, fwd.packing.start if i == 0 else 0) for i, p in enumerate(parts)])

        _ROPE_TWINS[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_edgeft_packed": True})
    return _ROPE_TWINS[cls]


# RoPE of a packed row from a table of angles: every sample's positions restart at 0, so the
# whole row rotates in one pass instead of one mx.fast.rope call per sample. Also, MLX's CPU
# rope made two streams wait on each other (measured: a chain of 30 attention blocks on two
# streams ran no faster than on one, while every other op of the block ran ~2x).


def _rope_inverse_frequencies(rope: nn.Module) -> tuple[mx.array, float] | None:
    """(inverse frequencies, position scale) of the RoPE kinds whose angles are known here:
    nn.RoPE (as mx.fast.rope computes them from base) and mlx-lm's Llama3RoPE (its _freqs);
    None for the others (they keep mx.fast.rope, one call per sample)."""
    base = type(rope).__mro__[1] if getattr(type(rope), "_edgeft_packed", False) else type(rope)
    if base is nn.RoPE and rope.base is not None:
        half = rope.dims // 2
        return mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(float(rope.base)) / half)), float(rope.scale)
    if base.__name__ == "Llama3RoPE" and isinstance(getattr(rope, "_freqs", None), mx.array):
        return 1.0 / rope._freqs.astype(mx.float32), 1.0
    return None


def _rope_table(x: mx.array, dims: int, traditional: bool, inv_freq: mx.array, scale: float,
                packing: Packing) -> mx.array:
    """mx.fast.rope(x, dims, traditional, ...) for each sample of the packed row x [B, H, T, D]."""
    packing.check(x)
    half = dims // 2
    starts = [packing.start] + [0] * (len(packing.lengths) - 1)
    pos = mx.array(np.concatenate([np.arange(a, a + n, dtype=np.float32) for a, n in zip(starts, packing.lengths)]))
    theta = (pos * scale)[:, None] * inv_freq[None, :]  # [T, half]
    cos, sin = mx.cos(theta).astype(x.dtype), mx.sin(theta).astype(x.dtype)
    rot, rest = (x, None) if dims == x.shape[-1] else (x[..., :dims], x[..., dims:])
    if traditional:  # pairs (2i, 2i+1)
        pairs = rot.reshape(*rot.shape[:-1], half, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    else:  # pairs (i, i + dims/2)
        a, b = rot[..., :half], rot[..., half:]
        out = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out if rest is None else mx.concatenate([out, rest], axis=-1)


# The flash kernel (compiled; cpu_kernels.flash_attention) keeps its scores in cache tiles of its
# own: it takes a causal attention whole, or, when the step leaves cores idle, in two blocks per
# idle stream. Forward + backward alone at SmolLM2's heads, 1024 / 2048 tokens (Intel Xeon, fp32
# products): one call 38.7 / 140.8 ms, one block per stream 25.0 / 95.5, two 24.5 / 88.1.
# The composed attention: over a long sample in query blocks of about this many positions, each block
# only against the keys up to its end (cpu_kernels.causal_blocks): the scores above the
# diagonal, half the square, are mostly never formed, and a block's scores stay small enough
# for the core's cache through the softmax's passes over them. When a step's samples fill fewer
# streams than there are cores (one long sample), the blocks take turns on the idle streams.
# Attention forward and backward alone, 256 to 2048 tokens, interleaved (AMD EPYC): blocks of 96
# took 0.77x the time of blocks of 256 at SmolLM2's heads (9/3, 64 wide), 0.78x at
# Qwen2.5-0.5B's (14/2), 0.83x at Gemma 3 270M's (4/1, 256 wide); 128 and 64 were no better.
ATTENTION_BLOCK = 96


def _idle_streams() -> list:
    """The cores' streams when the caller computes on none of them (its whole step is one group
    on the default stream, see stream_groups), else none: the groups keep every core busy."""
    cores = _cores()
    if not IDLE_STREAMS or cores < 2 or mx.default_stream(mx.default_device()) in _streams:
        return []
    return _core_streams(cores)


def _causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, window: int | None = None) -> mx.array:
    """Causal attention of the queries, the last of the keys' positions (within a sliding
    `window`: the flash kernel only). The flash kernel (cpu_kernels.attention, compiled) takes
    them whole, or in two blocks per idle core's stream; the composed attention in blocks of
    ATTENTION_BLOCK queries, on the idle streams in turn."""
    T, before = q.shape[2], k.shape[2] - q.shape[2]
    idle, outs = _idle_streams(), []
    if cpu_kernels.flash_attention():
        n = 2 * len(idle) if T >= 2 * ATTENTION_BLOCK else 1
    else:
        n = -(-T // ATTENTION_BLOCK) if T >= 2 * ATTENTION_BLOCK else 1
    for i, (a, b) in enumerate(cpu_kernels.causal_blocks(T, max(n, 1), before)):
        stream = idle[i % len(idle)] if idle and n > 1 else None
        with mx.stream(stream) if stream is not None else nullcontext():
            outs.append(cpu_kernels.attention(q[:, :, a:b], k, v, scale, True, start=before + a, window=window))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _packed_in_one_call(fwd: _Forward, q: mx.array, k: mx.array, v: mx.array) -> tuple[bool, int | None] | None:
    """(True, the window to apply) when a packed row's samples can attend within themselves in
    one flash-kernel call (its segments), else None: one call per sample. Per sample, each
    sample's q, k and v were copies out of the row, and their gradients went back into it as
    zeros plus an update plus an add, for every sample of every layer. Not for a split sample's
    segments (their keys continue another's) or when attention blocks go to idle streams."""
    lengths, window = fwd.packing.lengths, fwd.packing.window
    if (len(lengths) < 2 or fwd.prefix is not None or fwd.packing.start or not PACKED_ATTENTION
            or not (_kernels_for(q, k, v) and cpu_kernels.flash_attention()) or _idle_streams()):
        return None
    if window is None or max(lengths) <= window:
        return True, None
    sliding = _SLIDING.get()
    return None if sliding is None else (True, window if sliding else None)


# A packed row's attention in one call of the flash kernel (see _packed_in_one_call); False: one
# call per sample, as before (scripts/profile_step.py's A/B).
PACKED_ATTENTION = True


def _fast_sdpa(original):
    def scaled_dot_product_attention(queries, keys, values, cache=None, scale=1.0, mask=None, **kwargs):
        fwd = _FORWARD.get()
        plain = fwd is None or cache is not None or kwargs.get("sinks") is not None
        causal = isinstance(mask, str) and mask == "causal"
        if fwd is not None and fwd.packing is not None and fwd.packing.window is not None:
            causal = causal or isinstance(mask, mx.array)  # the sliding window's: see Packing
        if fwd is not None and fwd.packing is not None:
            if plain or not (causal or (mask is None and fwd.packing.total == 1)):
                raise PackingError(f"packed batches need plain causal attention, got mask={mask!r}")
        elif plain or not (causal or mask is None) or not _kernels_for(queries, keys, values):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)

        def attend(q, k, v, causal):
            window = fwd.packing.window if fwd.packing is not None else None
            if window is not None and k.shape[2] > window:  # a sample past the window: its sliding layers
                if _SLIDING.get() is None or not (_kernels_for(q, k, v) and cpu_kernels.flash_attention()):
                    raise PackingError(f"a packed sample of {k.shape[2]} tokens exceeds the {window}-token sliding window")
                return _causal_attention(q, k, v, scale, window if _SLIDING.get() else None)
            if _kernels_for(q, k, v):
                return _causal_attention(q, k, v, scale) if causal else cpu_kernels.attention(q, k, v, scale, False)
            if k.shape[2] != q.shape[2]:  # MLX's causal mask aligns the queries with the last keys
                raise PackingError("a split sample's second segment needs edgeft's CPU attention")
            return original(q, k, v, cache=None, scale=scale, mask="causal" if causal else None)

        if fwd.packing is None:
            return attend(queries, keys, values, causal)
        if whole := _packed_in_one_call(fwd, queries, keys, values):
            return cpu_kernels.attention(queries, keys, values, scale, True, window=whole[1], segments=fwd.packing.lengths)
        parts = list(zip(*(fwd.packing.split(a) for a in (queries, keys, values))))
        if fwd.prefix is not None and fwd.extend:  # the first segment's keys and values first
            (q, k, v), (pk, pv) = parts[0], fwd.prefix.take()
            parts[0] = (q, mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2))
        elif fwd.prefix is not None:
            fwd.prefix.kv.append(parts[0][1:])
        return fwd.packing.join([attend(q, k, v, True) for q, k, v in parts])

    scaled_dot_product_attention._edgeft_original = original
    return scaled_dot_product_attention


def _fast_swiglu(original):
    def swiglu(gate, x):
        return cpu_kernels.swiglu(gate, x) if _kernels_for(gate, x) else original(gate, x)

    swiglu._edgeft_original = original
    return swiglu


_MLP_TWINS: dict[type, type] = {}


def _gelu_mlp_class(cls: type) -> type:
    if cls not in _MLP_TWINS:

        def __call__(self, x):
            if _FORWARD.get() is None:
                return cls.__call__(self, x)
            gate, up = self.gate_proj(x), self.up_proj(x)
            act = cpu_kernels.gelu_mul(gate, up) if _kernels_for(gate, up) else nn.gelu_approx(gate) * up
            return self.down_proj(act)

        _MLP_TWINS[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _MLP_TWINS[cls]


# A LoRA layer without dropout as edgeft/_kernels.cpp's one primitive each way (see _fast_lora);
# False: MLX's ops (scripts/profile_step.py's A/B).
LORA_KERNEL = True


def _fast_lora(original):
    """mlx-lm's LoRALinear, y + scale * ((x @ A) @ B), inside fast_forward: without dropout, as
    cpu_kernels.lora_linear, the layer's products forward and backward as one primitive each,
    where MLX's ops were ~28 a layer, each with its per-op cost, and the backward's two parts of
    dx went through an add (`scripts/profile_step.py ab base lora-ops`, interleaved: SmolLM2 at
    4 x 256 439.5 against 393.9 tokens/s, 1.12x; at 1024 tokens 1.10x; the 0.5B's shapes at 1024
    tokens 1.13x). Otherwise as y + (x @ A) @ (scale * B): the scale multiplies the r x out
    matrix, not every output, forward and backward (SmolLM2 at 4 x 256, interleaved: 353.1
    against 343.2 tokens/s), and the rank-r product adds itself to y inside the BLAS call
    (addmm: beta 1 into y's buffer), instead of writing its own output for a separate add
    (`scripts/profile_step.py ab lora-ops lora-add`: 1.03x at 4 x 256, 1.01x at 1024 tokens)."""
    def __call__(self, x):
        if _FORWARD.get() is None:
            return original(self, x)
        xd, base = self.dropout(x), self.linear
        if LORA_KERNEL and xd is x and type(base) in (DequantizedLinear, nn.Linear) \
                and _kernels_for(x, self.lora_a, self.lora_b):
            y = cpu_kernels.lora_linear(x, dequantized_weight(base), self.lora_a, self.lora_b, self.scale)
            return y + base["bias"] if "bias" in base else y
        return mx.addmm(base(x), xd @ self.lora_a, self.scale * self.lora_b)

    __call__._edgeft_original = original
    return __call__


def _hook(module, name: str, make) -> None:
    fn = getattr(module, name, None)
    if fn is not None and not hasattr(fn, "_edgeft_original"):
        setattr(module, name, make(fn))


def sliding_window(model: nn.Module) -> int | None:
    """The model's sliding attention window in tokens, if it has one."""
    return getattr(getattr(model, "args", None), "sliding_window", None)


def pack_refusal(model: nn.Module, lengths: tuple[int, ...] | None = None) -> str | None:
    """Why `model` does not compute packed batches correctly (None: it does), in a few words:
    prepared for CPU, every attention layer of a kind this module knows (RoPE twin, hooked
    attention call). A model with a sliding window packs any samples where the flash kernel
    applies the window and its layers say which slide (Gemma 3), else only samples that fit
    the window: without `lengths` (any batch) the answer is then no."""
    attns = _attention_modules(model)
    if not attns:
        return "no attention layers edgeft knows"
    for attn in attns:
        arch = sys.modules[type(attn).__module__]
        fn = getattr(arch, "scaled_dot_product_attention", None)
        if fn is None:
            return f"mlx-lm's {arch.__name__.rsplit('.', 1)[-1]} computes attention inside its module"
        if not getattr(type(attn.rope), "_edgeft_packed", False) or not hasattr(fn, "_edgeft_original"):
            return "not prepared for the CPU"
    window = sliding_window(model)
    if window is not None and _windows_known(attns):
        return None
    if window is not None and lengths is None:
        return f"only samples within its {window}-token sliding window pack"
    if window is not None and max(lengths, default=0) > window:
        return f"a sample of {max(lengths)} tokens exceeds the {window}-token sliding window"
    return None


def can_pack(model: nn.Module, lengths: tuple[int, ...] | None = None) -> bool:
    """Whether `model` computes packed batches of samples of these lengths (None: of any) exactly
    (pack_refusal)."""
    return pack_refusal(model, lengths) is None


def fast_path_note(model: nn.Module) -> str | None:
    """A line for the start of a run when a model prepared for CPU trains some or all batches
    padded rather than packed, saying why; None when every batch packs (or off the CPU)."""
    why = pack_refusal(model) if on_cpu() else None
    if why is None:
        return None
    if pack_refusal(model, (1,)) is None:
        return f"CPU fast path: a batch packs when its samples fit the {sliding_window(model)}-token sliding window, else runs padded"
    return f"CPU fast path off: batches run padded ({why})"
