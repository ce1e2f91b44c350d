"""Fast CPU versions of the exp-heavy ops of a training step: SwiGLU, GELU-tanh times up
(Gemma's MLP), the attention softmax (causal or not), the loss's cross-entropy.

MLX's CPU ``exp`` (and so ``sigmoid``, ``tanh``, ``softmax``, ``logsumexp``) costs ~19 ns per float32
on x86-64: the wheel is built for baseline x86-64, so its polynomial calls libm's ``fmaf`` once
per term. And each MLX op is one pass over its whole array, on one core per stream.

First choice: ``edgeft/_kernels.cpp``, the same ops as MLX primitives (one pass each, forward
and backward, with a vectorized Cephes exp), built by the install against this MLX and used
when :func:`compiled_usable` (the MLX version it was built for, and a self-test against MLX's
own ops). Whole steps at the bench's batch 4 x 256 (SmolLM2, interleaved): 1.30x the fused ops
below; the softmax alone 1.18x at one 1024-token sample.

Otherwise, the fused ops of this module: the same Cephes polynomial written as MLX ops and
fused by ``mx.compile`` (which generates one C++ loop per elementwise chain and has the system
compiler vectorize it), ~2 ns per element, with a smaller error than MLX's exp (~2e-7 relative
against ~4e-6). Inside ``mx.grad`` though, ``mx.compile`` inlines any function whose inputs
are traced, and every activation is. The trace state is per thread, so each kernel here is
built on a helper thread, on the caller's stream: it enters the caller's graph as lazy fused
ops, evaluated with the rest of the step. Each op is an ``mx.custom_function`` whose backward
is fused the same way, so autodiff never looks inside. The mathematics is that of the MLX op
each names; the backward passes keep no more than MLX's own (softmax keeps its output, SwiGLU
recomputes the sigmoid, GELU-tanh too). The loss's logsumexp over the vocabulary uses libm's
powf instead (see there). If MLX no longer allows building kernels this way, :func:`usable`
turns false after a self-test and callers use MLX's own ops.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import OrderedDict

import mlx.core as mx

try:  # the same ops as MLX primitives (edgeft/_kernels.cpp), when the install built them
    from edgeft import _kernels as _compiled
except ImportError:
    _compiled = None

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # Cody-Waite split of ln 2
_ROUND = 12582912.0  # 1.5 * 2**23: (x + _ROUND) - _ROUND rounds x to an integer
# Cephes expf: exp(r) ~ sum c_k r^k on [-ln2/2, ln2/2]
_C = (1.0, 1.0, 5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)
_LOW, _HIGH = -87.0, 88.0  # exp is 0 below _LOW (as MLX's is below -88) and finite up to _HIGH


def _exp_remainder(xc: mx.array, n: mx.array) -> mx.array:
    """r = xc - n ln 2, in two steps (Cody-Waite)."""
    return (xc - n * _LN2_HI) - n * _LN2_LO


def _exp_polynomial(r: mx.array) -> mx.array:
    """exp(r) on [-ln2/2, ln2/2], in Estrin form (a shallow graph fuses into fewer loops)."""
    r2 = r * r
    return (_C[0] + _C[1] * r + r2 * (_C[2] + _C[3] * r)) + (r2 * r2) * ((_C[4] + _C[5] * r) + r2 * (_C[6] + _C[7] * r))


def _exp(x: mx.array) -> mx.array:
    """exp as fusable ops: 2**n * p(r) with n = round(x / ln 2) and 2**n written into the
    exponent bits."""
    xc = mx.clip(x, _LOW, _HIGH)
    t = xc * _LOG2E + _ROUND
    n = t - _ROUND
    p = _exp_polynomial(_exp_remainder(xc, n))
    two_n = ((t.view(mx.int32) - (0x4B400000 - 127)) << 23).view(mx.float32)  # bits(t) = 0x4B400000 + n
    return mx.where(x < _LOW, 0.0, p * two_n)


# The helper thread -------------------------------------------------------------------------------
# A daemon thread: joining a thread that built compiled MLX graphs at interpreter exit (as
# ThreadPoolExecutor does) sometimes aborts the process ("terminate called without an active
# exception") when such a graph is still unevaluated.

_requests: queue.SimpleQueue = queue.SimpleQueue()
_worker: threading.Thread | None = None
_start_lock = threading.Lock()


def _serve():
    while True:
        fn, args, reply = _requests.get()
        try:
            reply.put((True, fn(*args)))
        except BaseException as e:  # handed back to the caller
            reply.put((False, e))


def _on_worker(fn, *args):
    global _worker
    if _worker is None:
        with _start_lock:
            if _worker is None:
                _worker = threading.Thread(target=_serve, name="edgeft-kernels", daemon=True)
                _worker.start()
    reply: queue.SimpleQueue = queue.SimpleQueue()
    _requests.put((fn, args, reply))
    ok, value = reply.get()
    if not ok:
        raise value
    return value


def fused(fn):
    """fn compiled, called from the helper thread on the caller's stream (see module doc): its
    elementwise chains fuse even when mx.grad traces the arguments."""
    compiled = mx.compile(fn)  # not shapeless: the exponent-bit view needs known shapes

    def run(stream, args):
        with mx.stream(stream):
            return compiled(*args)

    def call(*args):
        return _on_worker(run, mx.default_stream(mx.default_device()), args)

    return call


def custom(fwd, vjp):
    """mx.custom_function(fwd) with this vjp, whose backward ops go to the stream the forward
    ran on. MLX calls a custom vjp while it builds the backward graph, after the caller's `with
    mx.stream(...)` has ended: left alone, the backward of samples split over CPU streams
    (backend.stream_groups) would all land on the default stream, one after another."""
    made: dict = {}

    def call(*args):
        stream = mx.default_stream(mx.default_device())
        f = made.get(stream)
        if f is None:
            f = mx.custom_function(fwd)

            def rule(primals, cotangent, output):
                with mx.stream(stream):
                    return vjp(primals, cotangent, output)

            f.vjp(rule)
            made[stream] = f
        return f(*args)

    call.__doc__ = fwd.__doc__
    return call


# exp alone (the softmax's, GELU's backward) as two fused loops, each under MLX's fusion depth
# (11 ops, max_compile_depth in mlx/compile.cpp): compiled as one chain, `_exp` runs as 4-5
# loops, and where the depth cut falls on a scalar constant's broadcast, that becomes a
# stride-0 input and the loop MLX's slow strided one. The same values as `_exp`, bit for bit:
# 216 -> 142 ms for 64 x 590k floats.


@fused
def _exp_reduced(x):
    """(r, the bits of 2**n) with x = n ln 2 + r; the bits 0 (+0.0) where exp(x) is 0."""
    xc = mx.clip(x, _LOW, _HIGH)
    n = (xc * _LOG2E + _ROUND) - _ROUND
    return _exp_remainder(xc, n), mx.where(x < _LOW, 0, (n.astype(mx.int32) + 127) << 23)


@fused
def _exp_poly(r, two_n):
    return _exp_polynomial(r) * two_n


def _exp_fused(x: mx.array) -> mx.array:
    r, bits = _exp_reduced(x)
    return _exp_poly(r, bits.view(mx.float32))


# SwiGLU ------------------------------------------------------------------------------------------


@fused
def _swiglu_fwd(gate, up):
    return gate * up / (1.0 + _exp(-gate))


@fused
def _swiglu_bwd(gate, up, cot):
    s = 1.0 / (1.0 + _exp(-gate))
    gs = gate * s  # silu(gate); d silu / d gate = s + gs (1 - s)
    return cot * up * (s + gs * (1.0 - s)), cot * gs


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """nn.silu(gate) * up (mlx-lm's swiglu); the backward recomputes the sigmoid."""
    return _swiglu_fwd(gate, up)


def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(primals[0], primals[1], cotangent)


_swiglu_ops = custom(_swiglu, _swiglu_vjp)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """nn.silu(gate) * up (mlx-lm's swiglu)."""
    if compiled_usable() and gate.shape == up.shape:
        return _compiled.swiglu(gate, up)
    return _swiglu_ops(gate, up)


# GELU-tanh times up (Gemma's MLP: nn.gelu_approx(gate) * up) -------------------------------------
# 0.5 g (1 + tanh(u)) = g sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3): one exp, no tanh.
# On [-12, 12] against float64: max error 5e-7 forward, 2e-7 on the gradient (MLX's op: 4e-7
# and 1.5e-7); 5e-7 from MLX's op (tests/test_fast_families.py).

_G1 = 2.0 * math.sqrt(2.0 / math.pi)  # 2u = g (_G1 + _G3 g^2)
_G3 = _G1 * 0.044715


@fused
def _gelu_mul_fwd(gate, up):
    return gate * up / (1.0 + _exp(-gate * (_G1 + _G3 * (gate * gate))))


# The backward in three loops (2u, exp, the rest): one chain that deep, mx.compile splits into
# more loops than that (CPU time, 2048 x 2048: 202 ms as one chain, 140 ms split).
_neg_2u = fused(lambda gate: -gate * (_G1 + _G3 * (gate * gate)))


@fused
def _gelu_mul_bwd_from_exp(gate, up, cot, e):
    s = 1.0 / (1.0 + e)
    gs = gate * s  # d (g s(2u)) / dg = s + g s (1 - s) d(2u)/dg; 1 - s as e s: s rounds to 1 first
    return cot * up * (s + gs * (e * s) * (_G1 + 3.0 * _G3 * (gate * gate))), cot * gs


def _gelu_mul_bwd(gate, up, cot):
    return _gelu_mul_bwd_from_exp(gate, up, cot, _exp_fused(_neg_2u(gate)))


def _gelu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """nn.gelu_approx(gate) * up; the backward recomputes the sigmoid."""
    return _gelu_mul_fwd(gate, up)


def _gelu_mul_vjp(primals, cotangent, output):
    return _gelu_mul_bwd(primals[0], primals[1], cotangent)


_gelu_mul_ops = custom(_gelu_mul, _gelu_mul_vjp)


def gelu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """nn.gelu_approx(gate) * up (Gemma's MLP)."""
    if compiled_usable() and gate.shape == up.shape:
        return _compiled.gelu_mul(gate, up)
    return _gelu_mul_ops(gate, up)


# Softmax over the last axis, optionally causal ---------------------------------------------------
# Fused loops take same-shape inputs only: MLX's fused loop over a broadcast input (the row max)
# runs element by element with index arithmetic, slower than a separate subtraction.

_softmax_bwd = fused(lambda p, cot, dot: p * (cot - dot))


def _softmax(x: mx.array) -> mx.array:
    e = _exp_fused(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_vjp_rule(p: mx.array, cot: mx.array) -> mx.array:
    return _softmax_bwd(p, cot, mx.broadcast_to((cot * p).sum(axis=-1, keepdims=True), p.shape))


def _softmax_vjp(primals, cotangent, output):
    return _softmax_vjp_rule(output, cotangent)


_softmax_ops = custom(_softmax, _softmax_vjp)  # mx.softmax(x, axis=-1)


# Bounded rather than counted in edgeft/plan.py: a mask is rows x cols fp32, one per distinct
# (query rows, key columns) of an attention call. A long sample's causal query blocks
# (backend.ATTENTION_BLOCK) each have their own: 22 at 2048 tokens, 26 MB in all at SmolLM2's
# 3 query heads per KV head, 60 MB at Qwen2.5-0.5B's 7. Kept up to _MASK_BYTES, least recently
# used out first: a step's masks and the last step's, where a cache of 8 masks rebuilt most of
# them in every layer. The masks of the batch in flight are inside the peaks plan.py's
# coefficients were fitted to; the cache adds at most _MASK_BYTES to them (or one mask, if that
# alone is larger). Rebuilding a mask costs one pass over it, less than the softmax it feeds.
_MASK_BYTES = 64 << 20
_masks: OrderedDict[tuple[int, int, int], mx.array] = OrderedDict()
_masks_lock = threading.Lock()


def _causal_bias(rows: int, cols: int, period: int) -> mx.array:
    """0 where row r (query position r % period among the last `period` of `cols`) may see the
    column, -inf where it may not."""
    key = (rows, cols, period)
    with _masks_lock:
        bias = _masks.pop(key, None)
        if bias is None:
            pos = mx.arange(rows) % period + (cols - period)
            bias = mx.where(mx.arange(cols)[None, :] <= pos[:, None], 0.0, -mx.inf)
            mx.eval(bias)
            total = sum(b.nbytes for b in _masks.values()) + bias.nbytes
            while total > _MASK_BYTES and _masks:  # a new mask alone over the budget is still kept
                total -= _masks.popitem(last=False)[1].nbytes
        _masks[key] = bias
    return bias


def _causal_softmax_vjp(primals, cotangent, output):
    return _softmax_vjp_rule(output, cotangent), mx.zeros_like(primals[1])


_causal_softmax = custom(lambda x, bias: _softmax(x + bias), _causal_softmax_vjp)


def softmax(x: mx.array) -> mx.array:
    """mx.softmax(x, axis=-1)."""
    return _compiled.softmax(x) if compiled_usable() else _softmax_ops(x)


def causal_softmax(x: mx.array, period: int) -> mx.array:
    """Softmax over the last axis in which row r sees the columns up to its position: r % period,
    counted among the last `period` columns (rows: query positions, repeated per head)."""
    if compiled_usable():
        return _compiled.softmax(x, period)
    return _causal_softmax(x, _causal_bias(x.shape[-2], x.shape[-1], period))


# Logsumexp over the vocabulary -------------------------------------------------------------------
# The fused exp keeps three full-size intermediate arrays per call, ~0.3 GB more peak memory on
# [216, 49152] logits. 2 ** (x log2(e)) through MLX's power (libm's powf, ~5 ns an element
# against exp's ~19, same accuracy class: ~5e-6 relative at |x| = 88) needs one.


def _exp2(x: mx.array) -> mx.array:
    return mx.power(2.0, x * _LOG2E)


def _logsumexp(x: mx.array) -> mx.array:
    """mx.logsumexp(x, axis=-1)."""
    m = x.max(axis=-1, keepdims=True)
    return (m + mx.log(_exp2(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _logsumexp_vjp(primals, cotangent, output):
    # d lse / dx = softmax(x) = exp(x - lse), recomputed rather than kept from the forward
    return _exp2(primals - output[..., None]) * cotangent[..., None]


logsumexp = custom(_logsumexp, _logsumexp_vjp)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """logsumexp(logits[i]) - logits[i, targets[i]] for each row i of [rows, vocab] logits."""
    if compiled_usable():
        return _compiled.cross_entropy(logits, targets)
    return logsumexp(logits) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


# LoRA layers ------------------------------------------------------------------------------------


def lora_linear(x: mx.array, w: mx.array, a: mx.array, b: mx.array, scale: float) -> mx.array:
    """x @ w.T + scale * ((x @ a) @ b): a LoRA layer on base weight w [out, in], with A [in, r]
    and B [r, out]. edgeft/_kernels.cpp's one primitive each way when compiled_usable(), else
    MLX's ops."""
    if compiled_usable():
        return _compiled.lora_linear(x, w, a, b, float(scale))
    return mx.addmm(x @ w.T, x @ a, scale * b)


# Attention ---------------------------------------------------------------------------------------


def causal_blocks(length: int, n: int, before: int = 0) -> list[tuple[int, int]]:
    """At most `n` query blocks [a, b) of a causal attention over `length` positions, of about
    equal work: a block sees the keys up to its end (and `before` keys ahead of the first
    position), so it computes (b - a) x (before + b) scores. Found from the last block down, for
    the largest equal share that leaves the first block no more than it. Together they compute
    75% of the square's scores at n = 2, 64% at 4, 57% at 8."""
    def starts(work: float) -> list[int]:
        ends = [length]
        while len(ends) < n and ends[-1] > 0:
            ends.append(max(0, round(ends[-1] - work / (before + ends[-1]))))
        return ends

    lo, hi = length * (before + length) / (2 * n), float(length * (before + length))
    for _ in range(40):  # bisect the share: the smallest that leaves the first block no more
        mid = (lo + hi) / 2
        first = starts(mid)[-1]  # where the first block ends
        lo, hi = (lo, mid) if first * (before + first) <= mid else (mid, hi)
    ends = sorted(set(starts(hi)) - {0, length})
    bounds = [0, *ends, length]
    return list(itertools.pairwise(bounds))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool, start: int | None = None,
              window: int | None = None, segments: tuple[int, ...] = ()) -> mx.array:
    """mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal
    else None) with grouped KV heads: q [B, H, T, D], k and v [B, Hkv, S, D]. Causal query t
    sits at key position start + t (default S - T: the last keys) and sees the keys up to it;
    with a sliding `window`, the last `window` of them (the flash kernel only). With `segments`,
    the lengths of a packed row's samples (T = S, causal), each sample attends within itself.

    edgeft/_kernels.cpp's flash attention when flash_attention(): no T x S scores in memory,
    forward or backward, and a packed row in one call. Otherwise composed: the scores, the
    softmax, the product, a sample at a time."""
    if flash_attention():
        return _compiled.attention(q, k, v, scale, causal, start, window or 0, list(segments))
    if window is not None:
        raise ValueError("a sliding window needs edgeft's compiled flash attention (edgeft/_kernels.cpp)")
    if segments:
        bounds = [0, *itertools.accumulate(segments)]
        return mx.concatenate([attention(*(x[:, :, a:b] for x in (q, k, v)), scale, True)
                               for a, b in itertools.pairwise(bounds)], axis=2)
    if causal and start is not None:  # the keys the last query sees, aligned with the queries' end
        k, v = k[:, :, : start + q.shape[2]], v[:, :, : start + q.shape[2]]
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    # The query heads that share a KV head become extra rows of one matmul: no copies of k, v.
    qg = (q * scale).reshape(B, Hkv, rep * T, D)
    scores = qg @ k.swapaxes(-1, -2)
    p = causal_softmax(scores, T) if causal else softmax(scores)
    return (p @ v).reshape(B, H, T, D)


# Availability ------------------------------------------------------------------------------------

_usable: bool | None = None
_compiled_ok: bool | None = None
_lock = threading.Lock()  # one self-test


def _self_test() -> bool:
    try:
        x = mx.linspace(-30.0, 30.0, 301).reshape(7, 43)
        u = mx.cos(x)

        def both(x):
            return (_swiglu_ops(x, u) + _gelu_mul_ops(x, u) + _softmax_ops(x)
                    + _causal_softmax(x, _causal_bias(7, 43, 7))).sum()

        def ref(x):
            causal = mx.where(mx.arange(43)[None] <= mx.arange(7)[:, None] + 36, x, -mx.inf)
            gelu = 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
            return (x * mx.sigmoid(x) * u + gelu * u + mx.softmax(x, axis=-1)
                    + mx.softmax(causal, axis=-1)).sum()

        (a, ga), (b, gb) = mx.value_and_grad(both)(x), mx.value_and_grad(ref)(x)
        return bool(mx.allclose(a, b, rtol=1e-5, atol=1e-4).item() and mx.allclose(ga, gb, rtol=1e-4, atol=1e-5).item())
    except Exception:  # an MLX that no longer builds kernels this way: use its own ops
        return False


def flash_attention() -> bool:
    """Whether attention() is edgeft/_kernels.cpp's flash kernel, which holds a tile of the
    scores at a time (else the composed attention, which holds them all)."""
    return compiled_usable()


def _attention_ref(q, k, v, scale, start, window=None):
    """MLX's attention with the KV heads repeated and, when start is given, a causal mask (of the
    last `window` keys, when given)."""
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    s = scale * q @ k.swapaxes(-1, -2)
    if start is not None:
        pos, keys = (mx.arange(q.shape[2]) + start)[:, None], mx.arange(k.shape[2])[None]
        s = mx.where((keys <= pos) & (keys > pos - (window or k.shape[2])), s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


def _compiled_self_test() -> bool:
    """Each of edgeft/_kernels.cpp's primitives against MLX's own ops: values and gradients."""
    try:
        if _compiled.mlx_version != mx.__version__.split(".dev")[0]:
            return False  # built against another MLX's headers: its primitives' layout may differ
        x = mx.linspace(-30.0, 30.0, 3 * 8 * 40).reshape(3, 8, 40)
        u = mx.cos(x)
        causal = mx.arange(40)[None] <= (mx.arange(8) % 4 + 36)[:, None]
        t = mx.arange(24) % 40
        def qkv(x, causal=True):
            f, g = x.reshape(-1), u.reshape(-1)
            if causal:
                return f[:240].reshape(1, 4, 6, 10), f[100:900].reshape(1, 2, 40, 10), g[:800].reshape(1, 2, 40, 10)
            return 0.1 * x.reshape(1, 3, 80, 4), g.reshape(1, 3, 80, 4), 0.1 * x.reshape(1, 3, 80, 4)

        def lora(x):
            f = 0.02 * x.reshape(-1)
            return f[:400].reshape(10, 40), f[400:520].reshape(40, 3), f[520:550].reshape(3, 10)

        def packed(x):
            f, g = x.reshape(-1), u.reshape(-1)
            q = mx.concatenate([f[:800], f[160:960]]).reshape(1, 4, 40, 10)
            return q, f[100:900].reshape(1, 2, 40, 10), g[:800].reshape(1, 2, 40, 10)

        gelu = lambda x: 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
        pairs = [
            (lambda x: _compiled.softmax(x), lambda x: mx.softmax(x, axis=-1)),
            (lambda x: _compiled.softmax(x, 4), lambda x: mx.softmax(mx.where(causal, x, -mx.inf), axis=-1)),
            (lambda x: _compiled.swiglu(x, u), lambda x: x * mx.sigmoid(x) * u),
            (lambda x: _compiled.gelu_mul(x, u), lambda x: gelu(x) * u),
            (lambda x: _compiled.swiglu(u, x), lambda x: u * mx.sigmoid(u) * x),
            # 4 query heads on 2 KV heads, 6 queries at key positions 30..35 of 40, within a window
            # of 5 keys; and not causal
            (lambda x: _compiled.attention(*qkv(x), 0.02, True, 30), lambda x: _attention_ref(*qkv(x), 0.02, 30)),
            (lambda x: _compiled.attention(*qkv(x), 0.02, True, 30, 5), lambda x: _attention_ref(*qkv(x), 0.02, 30, 5)),
            (lambda x: _compiled.attention(*qkv(x, False), 0.02, False), lambda x: _attention_ref(*qkv(x, False), 0.02, None)),
            # a packed row of samples of 30, 2 and 8 tokens, each within itself
            (lambda x: _compiled.attention(*packed(x), 0.02, True, 0, 0, [30, 2, 8]),
             lambda x: mx.concatenate([_attention_ref(*(y[:, :, a:b] for y in packed(x)), 0.02, 0)
                                       for a, b in ((0, 30), (30, 32), (32, 40))], axis=2)),
            # a LoRA layer of rank 3 on a 10 x 40 weight, W, A and B trained too
            (lambda x: _compiled.lora_linear(x, *lora(x), 0.5), lambda x: mx.addmm(x @ lora(x)[0].T, x @ lora(x)[1],
                                                                                     0.5 * lora(x)[2])),
            (lambda x: _compiled.cross_entropy(x.reshape(24, 40), t)[:, None, None],
             lambda x: (mx.logsumexp(x.reshape(24, 40), axis=-1)
                        - mx.take_along_axis(x.reshape(24, 40), t[:, None], axis=-1)[:, 0])[:, None, None]),
        ]
        for ours, theirs in pairs:
            (a, ga), (b, gb) = (mx.value_and_grad(lambda x, f=f: (f(x) * mx.cos(f(x))).sum())(x) for f in (ours, theirs))
            if not (mx.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6).item()
                    and mx.allclose(ga, gb, rtol=1e-4, atol=1e-5).item()):
                return False
        return True
    except Exception:  # an MLX this build cannot serve: MLX's own ops
        return False


def compiled_usable() -> bool:
    """Whether edgeft/_kernels.cpp's primitives are built, for this MLX, and pass a self-test
    against MLX's own ops (run once). Callers have checked :func:`usable` for their arrays."""
    global _compiled_ok
    if _compiled_ok is None:
        with _lock:
            if _compiled_ok is None:
                _compiled_ok = _compiled is not None and _compiled_self_test()
    return _compiled_ok


def usable(*arrays: mx.array) -> bool:
    """Whether these arrays can take the fused kernels: float32 on the CPU, and this MLX
    passes the self-test (run once)."""
    global _usable
    if mx.default_device() != mx.cpu or any(a.dtype != mx.float32 for a in arrays):
        return False
    if _usable is None:
        with _lock:
            if _usable is None:
                _usable = _self_test()
    return _usable
