"""The CPU speed paths compute the same mathematics as the plain ones, on tiny random models:
packed batches (no padding, attention within each sample, positions restarting per sample) and
the fused kernels (SwiGLU, attention softmax)."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama, qwen3
from mlx_lm.models.rope_utils import Llama3RoPE

from edgeft import backend, batches, cpu_kernels, dequant, lora, loss
from edgeft.config import LoRAConfig

VOCAB = 96


def tiny(arch="llama", seed=0, quantize=True):
    mx.random.seed(seed)
    common = dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, tie_word_embeddings=True,
    )
    if arch == "llama":
        model = llama.Model(llama.ModelArgs(model_type="llama", rope_traditional=True, **common))
    else:
        model = qwen3.Model(qwen3.ModelArgs(model_type="qwen3", head_dim=16, max_position_embeddings=512, rope_theta=1e4, **common))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def ragged_batch(seed=0):
    """4 sequences of different lengths, right-padded with id 0; loss on the second half of
    each, and one sequence without any loss token."""
    rng = np.random.default_rng(seed)
    lengths = [23, 9, 17, 30]
    T = 32
    inputs = np.zeros((4, T), np.int32)
    targets = np.zeros((4, T), np.int32)
    mask = np.zeros((4, T), np.float32)
    for b, n in enumerate(lengths):
        toks = rng.integers(1, VOCAB, n + 1)
        inputs[b, :n], targets[b, :n] = toks[:-1], toks[1:]
        if b != 2:
            mask[b, n // 2 : n - 1] = 1  # the last input token carries no loss: pack cuts it
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def test_pack_cuts_after_the_last_loss_token_and_drops_rows_without_loss():
    inputs, targets, mask = ragged_batch()
    x, y, m, lengths = batches.pack(inputs, targets, mask)
    assert lengths == (22, 8, 29)
    assert x.shape == y.shape == m.shape == (1, sum(lengths))
    assert x.shape[1] == loss.input_tokens(mask)
    np.testing.assert_array_equal(np.asarray(x)[0, :22], np.asarray(inputs)[0, :22])
    np.testing.assert_array_equal(np.asarray(y)[0, 22:30], np.asarray(targets)[1, :8])
    assert np.asarray(m).sum() == np.asarray(mask).sum()
    # the loss positions come in the same order, so their targets are the same list
    _, tgt_packed = loss.loss_positions(y, m)
    _, tgt_padded = loss.loss_positions(targets, mask)
    assert tgt_packed.tolist() == tgt_padded.tolist()


def test_pack_of_a_batch_without_loss_is_empty():
    inputs, targets, mask = ragged_batch()
    x, _, _, lengths = batches.pack(inputs, targets, mx.zeros_like(mask))
    assert lengths == () and x.shape == (1, 0)


def test_only_prepared_models_pack():
    model = tiny()
    assert not backend.can_pack(model)
    backend.prepare(model, cpu=False)  # Metal: nothing changes
    assert not backend.can_pack(model)
    assert backend.can_pack(backend.prepare(model, cpu=True))


@pytest.mark.parametrize("arch,streams,block", [("llama", 1, 256), ("llama", 2, 256), ("llama", 3, 256),
                                               ("qwen3", 2, 256), ("llama", 1, 5), ("qwen3", 2, 4)])
def test_packed_loss_and_gradients_equal_padded(monkeypatch, arch, streams, block):
    """One packed row, its samples split over `streams` CPU streams, gives the loss and adapter
    gradients of the padded batch; also with the attention of samples of 2 * `block` tokens or
    more in causal query blocks (on the idle streams when there is one group)."""
    monkeypatch.setattr(backend, "CPU_STREAMS", streams)
    monkeypatch.setattr(backend, "ATTENTION_BLOCK", block)
    model = backend.prepare(tiny(arch, seed=1), cpu=True)
    mx.random.seed(2)
    lora.apply_lora(model, LoRAConfig(rank=4))
    # non-zero lora_b so that every adapter gets a gradient
    bs = [(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.update(tree_unflatten(bs))
    batch = ragged_batch(seed=3)
    loss_and_grad = nn.value_and_grad(model, loss.lm_loss)
    padded_args, n_padded = loss.loss_inputs(model, lambda m, x, i, t: None, *batch)
    packed_args, n_packed = loss.loss_inputs(model, loss.lm_loss, *batch)
    assert len(packed_args) == 4 and n_packed == n_padded
    (l1, _), g1 = loss_and_grad(model, *padded_args)
    assert len(loss.stream_split(packed_args)) == streams
    l2, g2, n = loss.summed_loss_and_grad(model, loss.lm_loss, packed_args)
    l2, g2 = l2 / n, loss.tree_map_scale(g2, 1.0 / n)
    assert n == packed_args[1].size
    assert abs(l1.item() - l2.item()) < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_stream_groups_are_balanced_by_tokens(monkeypatch):
    monkeypatch.setattr(backend, "CPU_STREAMS", 2)
    groups = backend.stream_groups((250, 60, 80, 100))
    assert [g for _, g in groups] == [(0,), (1, 2, 3)]
    groups = backend.stream_groups((200, 60, 90, 170))  # not contiguous: 260 / 260
    assert [g for _, g in groups] == [(0, 1), (2, 3)]
    assert len({s for s, _ in groups}) == 2
    monkeypatch.setattr(backend, "CPU_STREAMS", 3)
    groups = backend.stream_groups((10, 10, 10, 10, 10, 10))
    assert sorted(len(g) for _, g in groups) == [2, 2, 2]
    assert sorted(i for _, g in groups for i in g) == list(range(6))
    assert len({s for s, _ in groups}) == 3
    monkeypatch.setattr(backend, "CPU_STREAMS", 4)
    assert [g for _, g in backend.stream_groups((5, 7))] == [(1,), (0,)]
    monkeypatch.setattr(backend, "CPU_STREAMS", 1)
    assert [g for _, g in backend.stream_groups((5, 7))] == [(0, 1)]


def test_stream_groups_balance_work_and_loss_tokens_weigh_the_head(monkeypatch):
    """Given each sample's work, the groups balance it rather than tokens; stream_split counts a
    loss token as 1 + head_share tokens (the vocabulary head runs only there), and head_share
    is the head's weights over the other projections', quantized or not."""
    monkeypatch.setattr(backend, "CPU_STREAMS", 2)
    assert [g for _, g in backend.stream_groups((100, 100, 100, 100))] == [(0, 2), (1, 3)]
    assert [g for _, g in backend.stream_groups((100, 100, 100, 100), (100, 100, 300, 100))] == [(2,), (0, 1, 3)]
    lengths = (4, 4, 4, 4)
    inputs, idx = mx.arange(16)[None], mx.array([0, 1, 2, 3, 5])  # sample 0 all loss, sample 1 one token
    args = (inputs, idx, idx + 100, lengths)
    assert [g[3] for _, g in loss.stream_split(args)] == [(4, 4), (4, 4)]
    by_work = loss.stream_split(args, head_share=3.0)  # work 16, 7, 4, 4
    assert [np.asarray(g[0]).tolist() for _, g in by_work] == [[[0, 1, 2, 3]], [[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]]
    assert [np.asarray(g[1]).tolist() for _, g in by_work] == [[0, 1, 2, 3], [1]]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(1000, 64)
            self.layers = [nn.Linear(64, 128), nn.Linear(128, 64)]

    model = Model()
    assert backend.head_share(model) == 64_000 / (2 * 64 * 128)
    nn.quantize(model, group_size=32, bits=4)
    assert backend.head_share(model) == 64_000 / (2 * 64 * 128)
    assert backend.head_share(nn.Linear(4, 4)) == 0.0


def test_stream_split_regroups_samples_with_their_loss_positions(monkeypatch):
    """Samples 0 and 2 on one stream, 1 and 3 on the other (7 and 6 tokens): each group's
    row, loss positions and targets are those samples' own."""
    monkeypatch.setattr(backend, "CPU_STREAMS", 2)
    lengths = (5, 2, 2, 4)
    inputs = mx.arange(13)[None]
    idx = mx.array([1, 4, 5, 8, 10, 12])
    tgt = idx + 100
    groups = loss.stream_split((inputs, idx, tgt, lengths))
    got = [(x.tolist()[0], i.tolist(), t.tolist(), g) for _, (x, i, t, g) in groups]
    assert got == [
        ([0, 1, 2, 3, 4, 7, 8], [1, 4, 6], [101, 104, 108], (5, 2)),
        ([5, 6, 9, 10, 11, 12], [0, 3, 5], [105, 110, 112], (2, 4)),
    ]


def test_outside_a_packed_loss_the_model_computes_as_before():
    """Generation and plain calls see the stock model: the hooks act only inside fast_forward()."""
    model = tiny(seed=4, quantize=False)
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    before = model(x)
    backend.prepare(model, cpu=True)
    assert mx.allclose(before, model(x), atol=1e-5)
    with backend.fast_forward(backend.Packing((2, 4))):
        parts = model(x)
    assert mx.allclose(parts[:, :2], model(x[:, :2]), atol=1e-5)
    assert mx.allclose(parts[:, 2:], model(x[:, 2:]), atol=1e-5)


@pytest.mark.parametrize("rope", [
    nn.RoPE(64, traditional=True, base=10000.0),  # llama from GGUF (llama.cpp's Q/K row order)
    nn.RoPE(64, traditional=False, base=1e6),  # qwen2/qwen3
    nn.RoPE(32, traditional=True, base=500.0, scale=0.5),  # partial rotation, scaled positions
    nn.RoPE(48, traditional=False),
    Llama3RoPE(64, base=500000.0, scaling_config={"factor": 8.0, "original_max_position_embeddings": 8192}),
], ids=["traditional", "neox", "partial-scaled", "partial-neox", "llama3"])
def test_packed_rope_table_equals_mx_fast_rope_per_sample(rope):
    """The whole packed row rotated from one table of angles equals mx.fast.rope on each sample
    with its positions from 0."""
    packing = backend.Packing((37, 120, 5, 300))
    x = mx.random.normal((1, 4, packing.total, 64), key=mx.random.key(0))
    want = packing.join([rope(part) for part in packing.split(x)])
    got = backend._rope_table(x, rope.dims, rope.traditional, *backend._rope_inverse_frequencies(rope), packing)
    assert mx.allclose(got, want, atol=1e-6, rtol=1e-6).item()


@pytest.mark.parametrize("rope", [nn.RoPE(64, traditional=True, base=10000.0), nn.RoPE(48, traditional=False)],
                         ids=["traditional", "partial-neox"])
def test_a_continued_samples_rope_starts_at_its_first_position(rope):
    """A split sample's second segment (Packing.start) rotates from where the first ended."""
    packing = backend.Packing((50, 7), start=30)
    x = mx.random.normal((1, 4, packing.total, 64), key=mx.random.key(1))
    first, second = packing.split(x)
    want = mx.concatenate([mx.fast.rope(first, rope.dims, traditional=rope.traditional, base=rope.base, scale=1.0, offset=30),
                           rope(second)], axis=2)
    got = backend._rope_table(x, rope.dims, rope.traditional, *backend._rope_inverse_frequencies(rope), packing)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()


def long_sample(T=300, loss_tokens=120, seed=0):
    """One packed sample of T random tokens with loss at random positions: lm_loss's arguments."""
    rng = np.random.default_rng(seed)
    inputs = mx.array(rng.integers(1, VOCAB, (1, T)), dtype=mx.int32)
    idx = np.sort(rng.choice(T, loss_tokens, replace=False)).astype(np.int32)
    return inputs, mx.array(idx), mx.array(rng.integers(1, VOCAB, loss_tokens), dtype=mx.int32), (T,)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_lone_long_sample_split_across_two_streams_has_the_whole_samples_loss_and_gradients(arch, monkeypatch):
    """Two segments on two streams, the second attending over the first's keys and values:
    the loss and every gradient equal the sample computed whole (and padded, MLX's own path)."""
    monkeypatch.setattr(backend, "CPU_CORES", 2)
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    model = backend.prepare(tiny(arch, seed=3), cpu=True)
    mx.random.seed(1)
    lora.apply_lora(model, LoRAConfig(rank=4))
    args = long_sample()
    splits = []
    split_loss = loss._split_sample_loss
    monkeypatch.setattr(loss, "_split_sample_loss", lambda *a: splits.append(a[4]) or split_loss(*a))
    loss_and_grad = nn.value_and_grad(model, loss.lm_loss)
    (split, _), g_split = loss_and_grad(model, *args)
    assert splits == [300]
    with backend.split_samples(False):
        (whole, _), g_whole = loss_and_grad(model, *args)
    (padded, _), g_padded = loss_and_grad(model, *args[:3])  # no lengths: not packed, not split
    assert splits == [300]
    assert abs(split.item() - whole.item()) < 1e-5 and abs(split.item() - padded.item()) < 1e-5
    for (k, a), (_, b), (_, c) in zip(tree_flatten(g_split), tree_flatten(g_whole), tree_flatten(g_padded)):
        assert mx.allclose(a, b, atol=1e-6, rtol=1e-4).item() and mx.allclose(a, c, atol=1e-6, rtol=1e-4).item(), k


def test_a_split_samples_segments_use_the_kept_weights_and_the_fused_loss(monkeypatch):
    """Both segments compute inside the fast forward: no weight dequantized again (the head's
    included), the loss by the fused cross-entropy (outside, each segment's head had made its
    own fp32 copy: +0.2 GB at SmolLM2's)."""
    monkeypatch.setattr(backend, "CPU_CORES", 2)
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    model = backend.prepare(tiny(seed=3), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=4))
    with dequant.keep_dequantized(True, store={}):
        backend.keep_weights(model)
        made, fused = [], []
        monkeypatch.setattr(dequant, "dequantize", lambda *a: made.append(a) or mx.zeros((1, 1)))
        ce = cpu_kernels.cross_entropy
        monkeypatch.setattr(cpu_kernels, "cross_entropy", lambda *a: fused.append(a) or ce(*a))
        mx.eval(nn.value_and_grad(model, loss.lm_loss)(model, *long_sample()))
    assert made == [] and len(fused) == 2


def test_lora_layers_scale_b_inside_the_fast_forward_only(monkeypatch):
    """prepare(cpu=True) routes mlx-lm's LoRALinear through a dispatcher: inside fast_forward
    (without the compiled LoRA kernel) y + (x @ A) @ (scale * B), the same values as mlx-lm's
    y + scale * ((x @ A) @ B) outside."""
    from mlx_lm.tuner.lora import LoRALinear

    monkeypatch.setattr(backend, "LORA_KERNEL", False)
    model = backend.prepare(tiny(seed=4), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=4))
    layer = next(m for _, m in model.named_modules() if isinstance(m, LoRALinear))
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(2))
    assert hasattr(LoRALinear.__call__, "_edgeft_original")
    x = mx.random.normal((3, layer.lora_a.shape[0]), key=mx.random.key(3))
    scaled = []
    with patched_scale(layer, scaled):
        with backend.fast_forward():
            fast = layer(x)
        plain = layer(x)
    assert scaled == [True, False]  # the scale went to B inside, to the output outside
    assert mx.allclose(fast, plain, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("base", ["quantized", "linear", "linear-bias"])
def test_a_lora_layer_in_the_fast_forward_is_mlx_lms_values_and_gradients(base, kernels, monkeypatch):
    """Inside fast_forward a LoRA layer without dropout is one compiled primitive each way (or
    MLX's ops without the module): the output and the gradients of x, A and B (and of a base
    weight that trains) are mlx-lm's LoRALinear's outside."""
    from mlx_lm.tuner.lora import LoRALinear

    calls = []
    fused = cpu_kernels.lora_linear
    monkeypatch.setattr(cpu_kernels, "lora_linear", lambda *a: calls.append(a[0].shape) or fused(*a))
    linear = nn.Linear(64, 40, bias=base == "linear-bias")
    if base == "quantized":
        linear = backend.prepare(nn.Sequential(nn.QuantizedLinear.from_linear(linear, 64, 8)), cpu=True).layers[0]
    layer = LoRALinear.from_base(linear, r=4, scale=3.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(2))
    x, cot = mx.random.normal((2, 5, 64), key=mx.random.key(3)), mx.random.normal((2, 5, 40), key=mx.random.key(4))
    params = {"x": x, "a": layer.lora_a, "b": layer.lora_b, **({"w": linear.weight} if base != "quantized" else {})}

    def run(p):
        layer.lora_a, layer.lora_b = p["a"], p["b"]
        if "w" in p:
            linear.weight = p["w"]
        return layer(p["x"])

    def fast(p):
        with backend.fast_forward():
            return run(p)

    names = list(params)
    (y1,), g1 = mx.vjp(lambda *a: fast(dict(zip(names, a))), list(params.values()), [cot])
    (y2,), g2 = mx.vjp(lambda *a: run(dict(zip(names, a))), list(params.values()), [cot])
    assert calls == [(2, 5, 64)]  # the primitive, or its MLX ops without the compiled module
    for k, a, b in zip(["y", *names], [y1, *g1], [y2, *g2]):  # fp32 sums in another order: to 1e-6 of the largest
        assert mx.abs(a - b).max().item() <= 1e-6 * mx.abs(b).max().item(), k


class patched_scale:
    """Record, at each multiplication by the layer's scale, whether it scaled B (r x out)."""

    def __init__(self, layer, log):
        self.layer, self.log = layer, log

    def __enter__(self):
        layer, log = self.layer, self.log

        class Scale(float):
            def __mul__(self, other):
                log.append(other.shape == layer.lora_b.shape and other.shape[0] == layer.lora_a.shape[1])
                return float(self) * other
            __rmul__ = __mul__

        self.old = layer.scale
        layer.scale = Scale(layer.scale)

    def __exit__(self, *exc):
        self.layer.scale = self.old


def test_a_sample_splits_only_when_it_is_alone_long_and_cores_are_free(monkeypatch):
    monkeypatch.setattr(backend, "CPU_CORES", 2)
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    assert backend.sample_streams(backend.SPLIT_SAMPLE_TOKENS) is not None
    assert backend.sample_streams(backend.SPLIT_SAMPLE_TOKENS - 1) is None  # short
    with backend.split_samples(False):  # grad checkpointing (trainer.train)
        assert backend.sample_streams(1000) is None
    with mx.stream(backend.stream_groups((300, 300))[0][0]):  # already one of two stream groups
        assert backend.sample_streams(1000) is None
    monkeypatch.setattr(backend, "CPU_STREAMS", 1)
    assert backend.sample_streams(1000) is None
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    monkeypatch.setattr(backend, "CPU_CORES", 1)
    assert backend.sample_streams(1000) is None


def test_the_split_point_balances_layers_head_and_attention():
    no_loss = np.array([], dtype=np.int32)
    assert loss.split_point(1000, no_loss, 0.0, 0.0) in (499, 500)  # tokens alone: halves
    # the second segment's queries also see the first's keys: attention moves the cut later
    assert 600 < loss.split_point(1000, no_loss, 0.0, 2e-3) < 750
    # the head where the loss is: loss only in the second half moves the cut later too
    assert loss.split_point(1000, np.arange(500, 1000), 1.0, 0.0) > 600
    prefix = backend.Prefix(10)
    with pytest.raises(backend.PackingError, match="attention layer 1, the first recorded 0"):
        prefix.take()


@pytest.mark.parametrize("T,before", [(37, 5), (300, 200), (600, 0)])
def test_causal_attention_of_the_last_queries_over_longer_keys(T, before, kernels):
    """Queries at the last T of T + before positions (a split sample's second segment), whole
    and in query blocks, equal MLX's attention with the explicit mask."""
    mx.random.seed(T)
    H, Hkv, D = 4, 2, 16
    q, k, v = mx.random.normal((1, H, T, D)), mx.random.normal((1, Hkv, T + before, D)), mx.random.normal((1, Hkv, T + before, D))
    mask = mx.arange(T + before)[None] <= mx.arange(T)[:, None] + before
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.allclose(cpu_kernels.attention(q, k, v, 0.25, True), want, atol=1e-5).item()
    assert mx.allclose(backend._causal_attention(q, k, v, 0.25), want, atol=1e-5).item()
    blocks = cpu_kernels.causal_blocks(T, 4, before)
    assert blocks[0][0] == 0 and blocks[-1][1] == T
    if T >= 300:
        work = [(b - a) * (before + b) for a, b in blocks]
        assert max(work) < 1.25 * min(work)


def test_a_wrong_packing_is_an_error_not_silent_cross_attention():
    model = backend.prepare(tiny(seed=5), cpu=True)
    with pytest.raises(backend.PackingError, match="packed batch of 5 tokens"):
        with backend.fast_forward(backend.Packing((2, 3))):
            model(mx.array([[1, 2, 3, 4]]))


# Fused kernels ------------------------------------------------------------------------------------


def test_fused_kernels_pass_their_self_test():
    assert cpu_kernels.usable(mx.zeros(2))
    assert not cpu_kernels.usable(mx.zeros(2, dtype=mx.bfloat16))


def test_the_install_built_the_compiled_kernels_for_this_mlx():
    """setup.py builds edgeft/_kernels.cpp against the MLX of the install, and its primitives
    pass the self-test against MLX's own ops (an install without a C++ compiler would fall back
    to the fused ops, which this suite runs too, see `kernels`)."""
    assert cpu_kernels._compiled is not None, "edgeft._kernels was not built: pip install -e . needs g++"
    assert cpu_kernels._compiled.mlx_version == mx.__version__
    assert cpu_kernels.compiled_usable()


@pytest.fixture(params=["compiled", "ops"])
def kernels(request, monkeypatch):
    """Run a test on edgeft/_kernels.cpp's primitives, then on the fused MLX ops that stand in
    for them where the install could not build them."""
    if request.param == "compiled":
        assert cpu_kernels.compiled_usable()
    monkeypatch.setattr(cpu_kernels, "_compiled_ok", request.param == "compiled")
    return request.param


def test_fused_exp_is_accurate_and_zero_far_below():
    x = np.linspace(-86.9, 87.9, 200001).astype(np.float32)
    got = np.asarray(cpu_kernels._exp_fused(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    one_chain = np.asarray(cpu_kernels.fused(cpu_kernels._exp)(mx.array(x)))  # the kernels' own exp
    assert np.array_equal(got, one_chain.astype(np.float64))  # two loops, the same values bit for bit
    assert np.max(np.abs(got - want) / want) < 5e-7
    assert np.asarray(cpu_kernels._exp_fused(mx.array([-88.0, -1e4, -np.inf], dtype=mx.float32))).tolist() == [0.0, 0.0, 0.0]


def _vjp_close(f, g, primals, cot, atol):
    (a,), ga = mx.vjp(f, primals, [cot])
    (b,), gb = mx.vjp(g, primals, [cot])
    assert mx.allclose(a, b, atol=atol, rtol=1e-5)
    for x, y in zip(ga, gb):
        assert mx.allclose(x, y, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5), (33, 300), (2, 3, 7)])
def test_fused_swiglu_and_softmax_match_mlx(shape, kernels):
    mx.random.seed(sum(shape))
    g, u, c = mx.random.normal(shape) * 4, mx.random.normal(shape), mx.random.normal(shape)
    _vjp_close(cpu_kernels.swiglu, lambda g, u: nn.silu(g) * u, [g, u], c, 1e-5)
    _vjp_close(cpu_kernels.softmax, lambda x: mx.softmax(x, axis=-1), [g], c, 1e-6)


@pytest.mark.parametrize("B,H,Hkv,T", [(1, 9, 3, 37), (2, 4, 2, 16), (1, 4, 4, 1), (1, 6, 2, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_matches_mlx_sdpa(B, H, Hkv, T, causal, kernels):
    mx.random.seed(T)
    q, k, v = mx.random.normal((B, H, T, 16)), mx.random.normal((B, Hkv, T, 16)), mx.random.normal((B, Hkv, T, 16))
    mask = "causal" if causal else None
    _vjp_close(
        lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, causal),
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask),
        [q, k, v], mx.random.normal(q.shape), 1e-5,
    )


@pytest.mark.parametrize("T,before", [(130, 0), (70, 150), (1, 99)])
def test_attention_gradients_of_queries_among_longer_keys(T, before, kernels):
    """The flash kernel's query and key tiles (64 and 128) in several partial tiles, with queries
    at the last T of T + before positions: the gradients of q, k and v equal MLX's."""
    mx.random.seed(T + before)
    q, k, v = mx.random.normal((1, 6, T, 16)), mx.random.normal((1, 2, T + before, 16)), mx.random.normal((1, 2, T + before, 16))
    mask = mx.arange(T + before)[None] <= mx.arange(T)[:, None] + before
    _vjp_close(
        lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, True),
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask),
        [q, k, v], mx.random.normal(q.shape), 1e-5,
    )


@pytest.mark.parametrize("T,before,window", [(300, 0, 100), (70, 150, 130), (200, 0, 129), (40, 0, 1)])
def test_flash_attention_within_a_sliding_window(T, before, window):
    """Query p sees the keys (p - window, p]: several key tiles wholly before a query tile's
    window, and rows that see nothing in the first tiles they meet. The composed attention has
    no window: it refuses one."""
    assert cpu_kernels.flash_attention()
    mx.random.seed(T + window)
    q, k, v = mx.random.normal((1, 6, T, 16)), mx.random.normal((1, 2, T + before, 16)), mx.random.normal((1, 2, T + before, 16))
    pos, keys = mx.arange(T)[:, None] + before, mx.arange(T + before)[None]
    mask = (keys <= pos) & (keys > pos - window)
    _vjp_close(
        lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, True, window=window),
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask),
        [q, k, v], mx.random.normal(q.shape), 1e-5,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "_compiled_ok", False)
        with pytest.raises(ValueError, match="sliding window needs"):
            cpu_kernels.attention(q, k, v, 0.25, True, window=window)


def _each_sample_alone(lengths, window=None):
    """Causal attention of each sample of a packed row on its own (its last `window` keys)."""
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))

    def attend(q, k, v):
        outs = []
        for a, b in bounds:
            pos = mx.arange(b - a)
            mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - (window or b - a))
            outs.append(mx.fast.scaled_dot_product_attention(*(x[:, :, a:b] for x in (q, k, v)), scale=0.25, mask=mask))
        return mx.concatenate(outs, axis=2)

    return attend


def _packed_row(lengths):
    mx.random.seed(sum(lengths))
    T = sum(lengths)
    return [mx.random.normal((1, 6, T, 16)), mx.random.normal((1, 2, T, 16)), mx.random.normal((1, 2, T, 16))]


@pytest.mark.parametrize("lengths", [(130, 1, 69), (64, 64, 128, 7), (3, 2)])
def test_a_packed_rows_samples_attend_within_themselves_in_one_call(lengths, kernels):
    """One call with the row's segments gives each sample's own causal attention, values and
    gradients, as one call per sample does."""
    q, k, v = _packed_row(lengths)
    _vjp_close(lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, True, segments=lengths),
               _each_sample_alone(lengths), [q, k, v], mx.random.normal(q.shape), 1e-5)


@pytest.mark.parametrize("lengths,window", [((300, 40, 5), 100), ((20, 230), 129)])
def test_a_packed_rows_samples_keep_their_sliding_window_in_one_call(lengths, window):
    assert cpu_kernels.flash_attention()
    q, k, v = _packed_row(lengths)
    _vjp_close(lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, True, window=window, segments=lengths),
               _each_sample_alone(lengths, window), [q, k, v], mx.random.normal(q.shape), 1e-5)


def test_flash_attention_keeps_no_scores_forward_or_backward():
    """At 1024 queries and keys the scores of 4 heads are 16 MB: the compiled kernel's forward and
    backward never hold them, where the composed attention holds them more than once."""
    q, k, v = (mx.random.normal((1, h, 1024, 16)) for h in (4, 2, 2))
    grad = mx.grad(lambda q, k, v: cpu_kernels.attention(q, k, v, 0.25, True).sum(), argnums=(0, 1, 2))
    mx.eval(q, k, v)
    peaks = {}
    for compiled in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "_compiled_ok", compiled)
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(grad(q, k, v))
            peaks[compiled] = (mx.get_peak_memory() - base) / 2**20
    assert cpu_kernels.compiled_usable()
    assert peaks[True] < 4 < 16 < peaks[False], peaks


@pytest.mark.parametrize("T,n", [(37, 3), (600, 4), (9, 8)])
def test_causal_blocks_cover_every_position_once_with_equal_work(T, n):
    blocks = cpu_kernels.causal_blocks(T, n)
    assert blocks[0][0] == 0 and blocks[-1][1] == T
    assert all(a < b == a2 for (a, b), (a2, _) in zip(blocks, blocks[1:] + [(T, None)]))
    work = [(b - a) * b for a, b in blocks]
    if T >= 100:
        assert max(work) < 1.2 * min(work) and sum(work) < 0.7 * T * T


def test_causal_masks_are_kept_within_their_byte_budget_most_recent_first(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_masks", type(cpu_kernels._masks)())
    monkeypatch.setattr(cpu_kernels, "_MASK_BYTES", 3 * 12 * 43 * 4)  # three masks of 12 x 43 or less
    first = cpu_kernels._causal_bias(12, 40, 4)
    expect = mx.where(mx.arange(40)[None] <= (mx.arange(12) % 4 + 36)[:, None], 0.0, -mx.inf)
    assert mx.array_equal(first, expect)
    for cols in (41, 42):
        cpu_kernels._causal_bias(12, cols, 4)
    assert cpu_kernels._causal_bias(12, 40, 4) is first  # kept, and now the most recent
    cpu_kernels._causal_bias(12, 43, 4)  # over budget: the least recently used (41) goes
    assert list(cpu_kernels._masks) == [(12, 42, 4), (12, 40, 4), (12, 43, 4)]
    big = cpu_kernels._causal_bias(100, 100, 100)  # alone over budget: kept until the next
    assert list(cpu_kernels._masks) == [(100, 100, 100)] and big.shape == (100, 100)


def test_attention_blocks_go_to_the_idle_streams_only_when_the_step_runs_on_one(monkeypatch):
    monkeypatch.setattr(backend, "CPU_CORES", 2)
    monkeypatch.setattr(backend, "CPU_STREAMS", None)
    idle = backend._idle_streams()  # the caller on the default stream: one group, a core idle
    assert len(idle) == 2 and mx.default_stream(mx.default_device()) not in idle
    groups = backend.stream_groups((30, 20))  # two groups: both cores taken
    with mx.stream(groups[0][0]):
        assert backend._idle_streams() == []
    monkeypatch.setattr(backend, "IDLE_STREAMS", False)
    assert backend._idle_streams() == []


def test_step_with_and_without_fused_kernels_agrees(monkeypatch, kernels):
    model = backend.prepare(tiny(seed=6), cpu=True)
    mx.random.seed(7)
    lora.apply_lora(model, LoRAConfig(rank=4))
    args, _ = loss.loss_inputs(model, loss.lm_loss, *ragged_batch(seed=8))
    loss_and_grad = nn.value_and_grad(model, loss.lm_loss)
    (l1, _), g1 = loss_and_grad(model, *args)
    monkeypatch.setattr(backend, "FUSED_KERNELS", False)
    (l2, _), g2 = loss_and_grad(model, *args)
    assert abs(l1.item() - l2.item()) < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_fused_dequantize_is_bit_exact(bits, group_size):
    mx.random.seed(bits + group_size)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 48), group_size=group_size, bits=bits)
    want = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=group_size, bits=bits)
    assert mx.array_equal(dequant.dequantized_weight(layer), want)


@pytest.mark.parametrize("rows,vocab", [(9, 1000), (3, 49), (1, 16)])
def test_cross_entropy_matches_mlx(rows, vocab, kernels):
    mx.random.seed(rows)
    x, t = mx.random.normal((rows, vocab)) * 8, mx.random.randint(0, vocab, (rows,))
    _vjp_close(lambda x: cpu_kernels.cross_entropy(x, t),
               lambda x: mx.logsumexp(x, axis=-1) - mx.take_along_axis(x, t[:, None], axis=-1)[:, 0],
               [x], mx.arange(1.0, rows + 1), 1e-5)


def test_compiled_kernels_stay_finite_and_exact_at_the_edges():
    """Scores far apart (exp underflows to 0, not NaN), masked columns exactly 0 in the output
    and the gradient, a target outside the vocabulary NaN rather than a read past the row."""
    x = mx.array([[0.0, -1e4, 80.0, 79.0] * 5] * 4)  # 4 rows of 20: 16 lanes and a tail
    p = cpu_kernels._compiled.softmax(x, 2)  # rows see 19, 20, 19, 20 columns
    assert mx.all(mx.isfinite(p)).item() and p[0, -1].item() == 0.0 and p[2, -1].item() == 0.0
    assert mx.allclose(p.sum(axis=-1), mx.ones(4)).item()
    g = mx.grad(lambda x: (cpu_kernels._compiled.softmax(x, 2) * mx.arange(20.0)).sum())(x)
    assert g[0, -1].item() == 0.0 and mx.all(mx.isfinite(g)).item()
    big = mx.array([[-200.0, 100.0], [50.0, -50.0]])
    assert mx.allclose(cpu_kernels._compiled.swiglu(big, mx.ones_like(big)), big * mx.sigmoid(big)).item()
    ce = cpu_kernels._compiled.cross_entropy(mx.zeros((3, 5)), mx.array([0, 5, -1]))
    assert ce[0].item() == pytest.approx(np.log(5)) and np.isnan(np.asarray(ce[1:])).all()


def test_logsumexp_matches_mlx():
    mx.random.seed(11)
    x = mx.random.normal((9, 1000)) * 8
    (a,), (ga,) = mx.vjp(cpu_kernels.logsumexp, [x], [mx.arange(9.0)])
    (b,), (gb,) = mx.vjp(lambda x: mx.logsumexp(x, axis=-1), [x], [mx.arange(9.0)])
    assert mx.allclose(a, b, rtol=1e-6, atol=1e-5) and mx.allclose(ga, gb, rtol=1e-4, atol=1e-7)
