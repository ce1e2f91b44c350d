"""Gemma 3, Gemma 2 and Phi-3 on the CPU fast path, on tiny random mlx-lm models (2 layers,
width 64): the fused GELU-tanh kernel against MLX's op, packed batches of a
sliding-window model (its window applied per sample by the flash kernel; without it, exact when
every sample fits the window, padded otherwise), Gemma 2's
final soft cap in the loss, and Phi-3's fused SwiGLU and long-context RoPE under packing."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models import gemma2, gemma3_text, phi3
from test_speed_paths import _vjp_close, kernels  # noqa: F401 (a fixture)

from edgeft import backend, cpu_kernels, lora, loss
from edgeft.config import LoRAConfig

VOCAB = 96
COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB)


def tiny(family, seed=0, window=32, dtype=mx.float32):
    mx.random.seed(seed)
    if family == "gemma3":
        args = gemma3_text.ModelArgs.from_dict(dict(
            model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
            sliding_window_pattern=2, **COMMON))
        model = gemma3_text.Model(args)
    elif family == "gemma2":
        # small caps, so that both soft caps change the result
        args = gemma2.ModelArgs.from_dict(dict(
            model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
            final_logit_softcapping=1.5, **COMMON))
        model = gemma2.Model(args)
    else:  # Phi-3 with a long-context (SuScaledRoPE) configuration
        rope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0 + i / 4 for i in range(8)]}
        args = phi3.ModelArgs.from_dict(dict(
            model_type="phi3", rope_scaling=rope, max_position_embeddings=1024,
            original_max_position_embeddings=64, **COMMON))
        model = phi3.Model(args)
    # weights large enough that activations reach the GELU's and the caps' curved parts
    model.update(tree_map(lambda w: (w * (3.0 if w.ndim == 2 else 1.0)).astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def ragged_batch(seed=0):
    """4 sequences, right-padded; loss on the second half of each but one. Packed: (22, 8, 29)."""
    rng = np.random.default_rng(seed)
    T = 32
    inputs, targets, mask = (np.zeros((4, T), np.int32) for _ in range(3))
    mask = mask.astype(np.float32)
    for b, n in enumerate([23, 9, 17, 30]):
        toks = rng.integers(1, VOCAB, n + 1)
        inputs[b, :n], targets[b, :n] = toks[:-1], toks[1:]
        if b != 2:
            mask[b, n // 2 : n - 1] = 1
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def with_adapters(model, seed=2, targets=None):
    mx.random.seed(seed)
    lora.apply_lora(model, LoRAConfig(rank=4, **({"targets": targets} if targets else {})))
    bs = [(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.update(tree_unflatten(bs))
    return model


def reference_loss(model, inputs, targets, mask):
    """Cross-entropy of mlx-lm's own full forward (model(inputs): every mask, every soft cap)
    at the loss positions."""
    logits = model(inputs).astype(mx.float32).reshape(-1, VOCAB)
    idx, tgt = loss.loss_positions(targets, mask)
    return nn.losses.cross_entropy(logits[idx], tgt).mean()


def assert_grads_close(g1, g2, atol=1e-5):
    flat1, flat2 = tree_flatten(g1), tree_flatten(g2)
    assert [k for k, _ in flat1] == [k for k, _ in flat2] and flat1
    for (k, a), (_, b) in zip(flat1, flat2):
        assert mx.allclose(a, b, atol=atol, rtol=1e-4), k


def edgeft_loss_and_grad(model, batch):
    """(loss, grads, packed?) as training computes them: loss_inputs, then the stream groups."""
    args, _ = loss.loss_inputs(model, loss.lm_loss, *batch)
    total, grads, n = loss.summed_loss_and_grad(model, loss.lm_loss, args)
    return total / n, loss.tree_map_scale(grads, 1.0 / n), len(args) == 4


# Kernels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (33, 300), (2, 3, 7)])
def test_fused_gelu_mul_matches_mlx(shape, kernels):
    mx.random.seed(sum(shape))
    g, u, c = mx.random.normal(shape) * 4, mx.random.normal(shape), mx.random.normal(shape)
    _vjp_close(cpu_kernels.gelu_mul, lambda g, u: nn.gelu_approx(g) * u, [g, u], c, 2e-6)


def test_fused_gelu_is_accurate_everywhere(kernels):
    """Against float64 over [-12, 12]: GELU-tanh within 6e-7 (MLX's own op: ~4e-7), its
    gradient within 3e-7."""
    g = np.linspace(-12, 12, 200001).astype(np.float32)
    x = g.astype(np.float64)
    t = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    want = 0.5 * x * (1 + t)
    dwant = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
    gm = mx.array(g)
    (got,), (dgot,) = mx.vjp(lambda a: cpu_kernels.gelu_mul(a, mx.ones_like(a)), [gm], [mx.ones_like(gm)])
    assert np.max(np.abs(np.asarray(got) - want)) < 6e-7
    assert np.max(np.abs(np.asarray(dgot) - dwant)) < 3e-7


# Gemma 3: sliding window under packing, GELU MLP, bf16 parameters ------------------------------


@pytest.mark.parametrize("family,window", [("gemma3", 512), ("gemma3", 100), ("gemma2", 512), ("phi3", 512)])
def test_a_lone_long_sample_splits_across_two_streams_in_every_family(family, window, monkeypatch):
    """Gemma 3 (its sliding window wider than the 300-token sample, and narrower than either
    segment), Gemma 2 (soft caps) and Phi-3: the split sample's loss and gradients are mlx-lm's
    own forward's, where the family packs."""
    monkeypatch.setattr(backend, "CPU_CORES", 2)
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    model = with_adapters(backend.prepare(tiny(family, seed=1, window=window), cpu=True))
    rng = np.random.default_rng(3)
    T = 300
    inputs, targets = (mx.array(rng.integers(1, VOCAB, (1, T)), dtype=mx.int32) for _ in range(2))
    mask = mx.array((rng.random((1, T)) < 0.5).astype(np.float32))
    splits = []
    split_loss = loss._split_sample_loss
    monkeypatch.setattr(loss, "_split_sample_loss", lambda *a: splits.append(a[4]) or split_loss(*a))
    args, _ = loss.loss_inputs(model, loss.lm_loss, inputs, targets, mask)
    (got, _), grads = nn.value_and_grad(model, loss.lm_loss)(model, *args)
    want, want_grads = nn.value_and_grad(model, lambda m: reference_loss(m, inputs, targets, mask))(model)
    assert (len(args) == 4) == (family != "gemma2")  # Gemma 2 computes attention in its module: no packing
    assert splits == ([args[3][0]] if len(args) == 4 else [])
    assert abs(got.item() - want.item()) < 2e-5
    assert_grads_close(grads, want_grads, atol=2e-5)


@pytest.mark.parametrize("window,flash,packs", [(32, True, True), (24, True, True), (32, False, True), (24, False, False)])
@pytest.mark.parametrize("one_call", [False, True])
def test_gemma3_packs_with_its_window_applied_per_sample(window, flash, packs, one_call, monkeypatch):
    """Window 32: the packed row (59 tokens) is longer than the window but each sample fits.
    Window 24: the 29-token sample does not; the flash kernel applies the window within it on the
    sliding layers (not on the global one). Either way the loss and gradients are the padded
    batch's and mlx-lm's own forward's, its window masks honoured. Without the flash kernel the
    sample past the window stays padded. `one_call`: the three samples on one stream, without
    idle streams, so the flash kernel takes the row whole (its segments)."""
    monkeypatch.setattr(cpu_kernels, "flash_attention", lambda: flash)
    if one_call:
        monkeypatch.setattr(backend, "CPU_STREAMS", 1)
        monkeypatch.setattr(backend, "IDLE_STREAMS", False)
    model = with_adapters(backend.prepare(tiny("gemma3", seed=1, window=window), cpu=True))
    batch = ragged_batch(seed=3)
    padded_args, _ = loss.loss_inputs(model, lambda m, x, i, t: None, *batch)
    (l1, _), g1 = nn.value_and_grad(model, loss.lm_loss)(model, *padded_args)
    l2, g2, packed = edgeft_loss_and_grad(model, batch)
    assert packed == packs
    assert abs(l1.item() - l2.item()) < 1e-5
    assert_grads_close(g1, g2)
    l3, g3 = nn.value_and_grad(model, reference_loss)(model, *batch)
    assert abs(l3.item() - l2.item()) < 1e-5
    assert_grads_close(g3, g2)
    if window == 24:  # the window did cut the long sample's attention
        wide = with_adapters(backend.prepare(tiny("gemma3", seed=1, window=64), cpu=True))
        assert abs(reference_loss(wide, *batch).item() - l2.item()) > 1e-4


def test_a_packed_sample_past_the_window_without_the_flash_kernel_is_an_error(monkeypatch):
    model = with_adapters(backend.prepare(tiny("gemma3", seed=1, window=24), cpu=True))
    args, _ = loss.loss_inputs(model, loss.lm_loss, *ragged_batch(seed=3))
    assert len(args) == 4  # packed: (22, 8, 29)
    monkeypatch.setattr(cpu_kernels, "flash_attention", lambda: False)
    with pytest.raises(backend.PackingError, match="29 tokens exceeds the 24-token sliding window"):
        loss.lm_loss(model, *args)


def test_gemma_mlps_take_the_fused_gelu_inside_fast_forward_only(monkeypatch):
    calls = []
    fused = cpu_kernels.gelu_mul
    monkeypatch.setattr(cpu_kernels, "gelu_mul", lambda g, u: calls.append(g.shape) or fused(g, u))
    for family in ("gemma3", "gemma2"):
        model = tiny(family, seed=4)
        x = mx.array([[5, 6, 7, 8, 9, 10]])
        before = model(x)
        backend.prepare(model, cpu=True)
        assert mx.allclose(before, model(x), atol=1e-5) and not calls
        with backend.fast_forward():
            inside = model(x)
        assert len(calls) == 2, family  # one per layer
        assert mx.allclose(before, inside, atol=1e-4), family
        calls.clear()


def test_prepared_gemma3_from_bf16_gives_the_loss_of_the_unprepared():
    """prepare's fp32 conversion keeps Gemma's embedding scale (a bf16 constant) and its
    RMSNorm(1 + w): same loss as the model as loaded, to bf16 precision (fp32: to 1e-6)."""
    batch = ragged_batch(seed=5)
    for dtype, tol in [(mx.bfloat16, 2e-2), (mx.float32, 1e-5)]:
        model = tiny("gemma3", seed=5, dtype=dtype)
        before = reference_loss(model, *batch).item()
        backend.prepare(model, cpu=True)
        assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
        args, _ = loss.loss_inputs(model, loss.lm_loss, *batch)
        after = loss.lm_loss(model, *args)[0].item()
        assert abs(before - after) < tol * max(1.0, abs(before)), dtype


# Gemma 2: soft caps ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_loss_equals_cross_entropy_of_the_full_logits(family):
    """edgeft's loss (head and soft cap only at the loss positions) equals the cross-entropy
    of mlx-lm's whole model(inputs) logits there, final soft cap included; gradients too."""
    model = with_adapters(backend.prepare(tiny(family, seed=6), cpu=True))
    batch = ragged_batch(seed=7)
    l1, g1 = nn.value_and_grad(model, reference_loss)(model, *batch)
    l2, g2, _ = edgeft_loss_and_grad(model, batch)
    assert abs(l1.item() - l2.item()) < 1e-5
    assert_grads_close(g1, g2)
    if family == "gemma2":  # the cap mattered
        uncapped = model.model.embed_tokens.as_linear(model.model(batch[0])).reshape(-1, VOCAB)
        idx, tgt = loss.loss_positions(*batch[1:])
        assert abs(nn.losses.cross_entropy(uncapped[idx], tgt).mean().item() - l1.item()) > 1e-2


def test_gemma2_trains_padded_and_the_run_says_why():
    model = backend.prepare(tiny("gemma2"), cpu=True)
    assert not backend.can_pack(model, (5, 6))
    assert backend.pack_refusal(model) == "mlx-lm's gemma2 computes attention inside its module"
    assert backend.fast_path_note(model) == ("CPU fast path off: batches run padded "
                                             "(mlx-lm's gemma2 computes attention inside its module)")
    args, _ = loss.loss_inputs(model, loss.lm_loss, *ragged_batch())
    assert len(args) == 3


def test_which_models_pack_and_the_start_of_run_note(monkeypatch):
    gemma = backend.prepare(tiny("gemma3", window=24), cpu=True)
    assert backend.can_pack(gemma) and backend.fast_path_note(gemma) is None  # the flash kernel: any sample
    monkeypatch.setattr(cpu_kernels, "flash_attention", lambda: False)
    assert backend.can_pack(gemma, (24, 3)) and not backend.can_pack(gemma, (25, 3))
    assert not backend.can_pack(gemma)  # any batch: not known to fit
    assert "a sample of 25 tokens exceeds the 24-token sliding window" == backend.pack_refusal(gemma, (25,))
    assert backend.fast_path_note(gemma) == (
        "CPU fast path: a batch packs when its samples fit the 24-token sliding window, else runs padded")
    assert not backend.can_pack(tiny("gemma3"), (3,))
    assert backend.fast_path_note(backend.prepare(tiny("phi3"), cpu=True)) is None


# Phi-3: fused SwiGLU, SuScaledRoPE per sample --------------------------------------------------


def test_phi3_packs_with_its_long_context_rope_and_the_fused_swiglu(monkeypatch):
    calls = []
    fused = cpu_kernels.swiglu
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda g, u: calls.append(g.shape) or fused(g, u))
    model = with_adapters(backend.prepare(tiny("phi3", seed=8), cpu=True), targets=["qkv_proj", "gate_up_proj"])
    assert type(model.model.layers[0].self_attn.rope).__name__ == "SuScaledRoPE"
    batch = ragged_batch(seed=9)
    l1, g1 = nn.value_and_grad(model, reference_loss)(model, *batch)
    l2, g2, packed = edgeft_loss_and_grad(model, batch)
    assert packed and calls
    assert abs(l1.item() - l2.item()) < 1e-5
    assert_grads_close(g1, g2)
