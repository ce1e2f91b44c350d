"""LoRA + trainer on tiny random models: counts, learning, fast path = plain path, resume."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama

from edgeft import backend, dequant, lora, trainer
from edgeft.config import LoRAConfig, TrainConfig
from edgeft.generate import generate_ids
from edgeft.loss import evaluate, lm_loss, loss_positions

VOCAB = 96


def tiny_llama(seed=0, quantize=True):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def batches_from(seqs, bs, start=0):
    """Deterministic cycling batches of fixed sequences (inputs, targets, mask)."""
    seqs = np.array(seqs, dtype=np.int32)
    step = start
    while True:
        i = (step * bs) % len(seqs)
        chunk = np.concatenate([seqs, seqs])[i : i + bs]
        mask = np.ones_like(chunk[:, 1:], dtype=np.float32)
        mask[:, : chunk.shape[1] // 2] = 0  # the first half is "prompt"
        yield mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:]), mx.array(mask)
        step += 1


def four_examples():
    rng = np.random.default_rng(1)
    return rng.integers(0, VOCAB, size=(4, 17)).tolist()


def test_lora_parameter_count_all_linear_layers():
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig(rank=4))
    trainable, _ = lora.count_parameters(model)
    # per layer: q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64
    dims = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert trainable == 2 * sum(4 * (i + o) for i, o in dims)
    assert len(lora.lora_layers(model)) == 14


def test_lora_targets_and_layers_are_honoured():
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"], layers=1))
    names = sorted(n for n, _ in lora.lora_layers(model))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_unknown_target_is_a_clear_error():
    with pytest.raises(lora.LoRAError, match="'qkv' is not a linear layer.*q_proj"):
        lora.apply_lora(tiny_llama(), LoRAConfig(targets=["qkv"]))


def test_new_adapters_leave_the_output_unchanged():
    model = tiny_llama()
    x = mx.array([[1, 2, 3, 4]])
    before = model(x)
    lora.apply_lora(model, LoRAConfig())
    assert mx.allclose(before, model(x), atol=1e-6)


def test_cpu_path_matches_quantized_matmul():
    """backend.prepare swaps in dequantize-then-BLAS layers: same numbers as MLX's kernel."""
    model = tiny_llama()
    x = mx.array([[5, 6, 7, 8, 9]])
    ref = model(x)
    backend.prepare(model, cpu=True)
    assert isinstance(model.layers[0].self_attn.q_proj, dequant.DequantizedLinear)
    assert mx.allclose(ref, model(x), atol=1e-4, rtol=1e-4)


def test_loss_falls_when_overfitting_four_examples():
    model = backend.prepare(tiny_llama(), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=8, alpha=16))
    cfg = TrainConfig(steps=40, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_every=0, save_every=0)
    seqs = four_examples()
    first = evaluate(model, [next(batches_from(seqs, 4))])
    trainer.train(model, cfg, lambda s: batches_from(seqs, 4, s), progress=trainer.Progress(40, every=1000))
    last = evaluate(model, [next(batches_from(seqs, 4))])
    assert last < 0.5 * first, (first, last)


def test_bf16_products_train_within_a_percent_of_fp32():
    """train.matmul bf16 (MKL's bfloat16 GEMM on the larger products) against fp32, from the same
    start on the same batches: every step's loss within 1% and the loss falls as far."""
    from edgeft import _blas

    if not _blas.bf16_available():
        pytest.fail(f"no bfloat16 path: {_blas.LOADED} {_blas.SPLIT}")
    seqs = four_examples()
    curves = {}
    for matmul in ("fp32", "bf16"):
        model = backend.prepare(tiny_llama(seed=4), cpu=True)
        mx.random.seed(2)
        lora.apply_lora(model, LoRAConfig(rank=8, alpha=16))
        cfg = TrainConfig(steps=30, batch_size=4, learning_rate=1e-3, warmup_steps=2, eval_every=0, save_every=0,
                          matmul=matmul)
        progress = trainer.Progress(30, every=1000)
        messages = []
        progress.message = messages.append
        losses = []
        progress.step = lambda step, loss, *a: losses.append(loss)
        trainer.train(model, cfg, lambda s: batches_from(seqs, 4, s), progress=progress)
        curves[matmul] = np.array(losses)
        assert any(m.startswith(f"matrix products in {matmul}") for m in messages) == (matmul == "bf16"), messages
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-1] < 0.5 * fp32[0] and bf16[-1] < 0.5 * bf16[0], (fp32, bf16)
    assert not np.array_equal(fp32, bf16)  # the products were rounded
    np.testing.assert_allclose(bf16, fp32, rtol=0.01)


def test_every_base_weight_is_kept_before_the_first_step(monkeypatch):
    """The trainer keeps (and with bf16 products rounds and gives back) every quantized weight the
    step uses with backend.keep_weights, before the first step: kept inside the gradient trace
    instead, each would leave MLX holding many times its size until the step ended."""
    from contextlib import contextmanager

    events = []
    keep_weights, matmul_precision = backend.keep_weights, backend.matmul_precision

    def recorded_keep_weights(model):
        keep_weights(model)
        events.append("all kept")

    @contextmanager
    def recorded_precision(setting, log=print):
        with matmul_precision(setting, log) as keep:
            yield lambda w: (events.append("keep"), keep(w))

    monkeypatch.setattr(backend, "keep_weights", recorded_keep_weights)
    monkeypatch.setattr(backend, "matmul_precision", recorded_precision)
    model = backend.prepare(tiny_llama(seed=5), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=8, alpha=16))
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, save_every=0)
    trainer.train(model, cfg, lambda s: batches_from(four_examples(), 4, s), progress=trainer.Progress(2, every=1000))
    assert events == ["keep"] * len(quantized) + ["all kept"]  # 2 layers x 7 projections and the tied head


@pytest.mark.parametrize("streams,dropout", [(1, 0.1), (2, 0.0)])
def test_fast_path_equals_plain_path(monkeypatch, streams, dropout):
    """Dequantized BLAS layers + loss only at masked positions + packed batches + fused kernels
    (+ samples split over CPU streams) give the same losses and adapters as MLX's quantized
    matmul + a full-vocabulary masked cross-entropy. With dropout only on one stream: which
    positions drop depends on how the forward is split (its distribution does not)."""
    monkeypatch.setattr(backend, "CPU_STREAMS", streams)

    def plain_loss(model, inputs, idx, tgt):
        logits = model(inputs).astype(mx.float32)
        flat = logits.reshape(-1, logits.shape[-1])
        ce = nn.losses.cross_entropy(flat, mx.zeros(flat.shape[0], dtype=mx.int32).at[idx].add(tgt))
        m = mx.zeros(flat.shape[0]).at[idx].add(1.0)
        return (ce * m).sum() / m.sum(), mx.array(idx.size)

    # fp32 products: the plain path's quantized matmul is never bf16 (that is tested against fp32 above)
    cfg = TrainConfig(steps=5, batch_size=2, learning_rate=5e-3, warmup_steps=1, eval_every=0, save_every=0, matmul="fp32")
    seqs = four_examples()
    results = []
    for fast in (True, False):
        model = tiny_llama(seed=3)
        backend.prepare(model, cpu=fast)
        mx.random.seed(7)
        lora.apply_lora(model, LoRAConfig(rank=4, dropout=dropout))
        trainer.train(
            model,
            cfg,
            lambda s: batches_from(seqs, 2, s),
            loss_fn=lm_loss if fast else plain_loss,
            progress=trainer.Progress(5, every=1000),
        )
        results.append(dict(tree_flatten(model.trainable_parameters())))
    for k in results[0]:
        assert mx.allclose(results[0][k], results[1][k], atol=1e-4, rtol=1e-3), k


def test_grad_accumulation_matches_bigger_batch():
    seqs = four_examples()
    out = []
    for bs, accum in ((4, 1), (2, 2)):
        model = backend.prepare(tiny_llama(seed=2), cpu=True)
        mx.random.seed(1)
        lora.apply_lora(model, LoRAConfig(rank=4))
        # lr 1e-3: Adam turns float noise in near-zero gradients into lr-sized parameter noise
        # fp32 products: with bf16 ones the two batchings end further apart than this tolerance
        cfg = TrainConfig(steps=3, batch_size=bs, grad_accum=accum, learning_rate=1e-3, warmup_steps=0, eval_every=0,
                          save_every=0, matmul="fp32")
        trainer.train(model, cfg, lambda s, bs=bs: batches_from(seqs, bs, s), progress=trainer.Progress(3, every=1000))
        out.append(dict(tree_flatten(model.trainable_parameters())))
    for k in out[0]:
        assert mx.allclose(out[0][k], out[1][k], atol=1e-5, rtol=1e-4), k


def test_resume_replays_exactly(tmp_path):
    """Stop after a checkpoint, resume in a new model: same adapters as one straight run."""
    seqs = four_examples()

    def fresh():
        model = backend.prepare(tiny_llama(seed=4), cpu=True)
        mx.random.seed(0)
        lora.apply_lora(model, LoRAConfig(rank=4, dropout=0.2))
        return model

    def cfg(steps):
        return TrainConfig(steps=steps, batch_size=2, learning_rate=5e-3, warmup_steps=2, eval_every=0, save_every=3, seed=9)

    straight = fresh()
    trainer.train(straight, cfg(6), lambda s: batches_from(seqs, 2, s), run_dir=tmp_path / "a", progress=trainer.Progress(6, every=1000))

    first = fresh()
    with pytest.raises(_Stop):
        trainer.train(first, cfg(6), lambda s: batches_from(seqs, 2, s), run_dir=tmp_path / "b", progress=trainer.Progress(6, every=1000), on_checkpoint=_stop_at(3))
    resumed = fresh()
    state = trainer.train(resumed, cfg(6), lambda s: batches_from(seqs, 2, s), run_dir=tmp_path / "b", resume=True, progress=trainer.Progress(6, every=1000))
    assert state.step == 6
    a = dict(tree_flatten(straight.trainable_parameters()))
    b = dict(tree_flatten(resumed.trainable_parameters()))
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


class _Stop(Exception):
    pass


def _stop_at(step):
    """An on_checkpoint hook that kills the run right after checkpoint `step` is written."""

    def hook(path):
        if path.name == f"step_{step:06d}":
            raise _Stop

    return hook


def test_non_finite_loss_stops_with_a_clear_error():
    model = backend.prepare(tiny_llama(), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=4))
    cfg = TrainConfig(steps=3, batch_size=2, learning_rate=1e-2, eval_every=0, save_every=0)

    def nan_loss(model, inputs, idx, tgt):
        loss, n = lm_loss(model, inputs, idx, tgt)
        return loss * mx.array(float("nan")), n

    with pytest.raises(trainer.TrainingError, match="step 1: loss nan"):
        trainer.train(model, cfg, lambda s: batches_from(four_examples(), 2, s), loss_fn=nan_loss, progress=trainer.Progress(3, every=1000))


def test_schedule_warms_up_then_decays_to_floor():
    sched = trainer.lr_schedule(TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1))
    assert sched(mx.array(0)).item() == pytest.approx(0.0)
    assert sched(mx.array(10)).item() == pytest.approx(1e-3, rel=1e-5)
    assert sched(mx.array(100)).item() == pytest.approx(1e-4, rel=1e-4)
    assert sched(mx.array(55)).item() < 1e-3


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_the_compiled_update_steps_as_the_optimizer_does_op_by_op(max_grad_norm):
    """Five steps with a warm-up schedule (the learning rate changes every step: a value baked
    into the compiled function would show) and gradients of different sizes (clipped or not)."""
    cfg = TrainConfig(steps=20, learning_rate=1e-2, warmup_steps=4, weight_decay=0.01)
    models = []
    for _ in range(2):
        model = tiny_llama()
        mx.random.seed(3)
        lora.apply_lora(model, LoRAConfig(rank=4))
        models.append((model, optim.AdamW(learning_rate=trainer.lr_schedule(cfg), weight_decay=0.01)))
    (compiled_model, compiled_opt), (plain_model, plain_opt) = models
    update = trainer.compiled_update(compiled_model, compiled_opt, max_grad_norm)
    for step in range(5):
        mx.random.seed(10 + step)
        grads = tree_map(lambda p: mx.random.normal(p.shape) * (step + 1), plain_model.trainable_parameters())
        scale = 1.0 / (7 + step)
        norm = update(grads, mx.array(scale, dtype=mx.float32))
        scaled = tree_map(lambda g: g * scale, grads)
        if max_grad_norm:
            scaled, plain_norm = optim.clip_grad_norm(scaled, max_grad_norm)
        else:
            plain_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(scaled)))
        plain_opt.update(plain_model, scaled)
        assert norm.item() == pytest.approx(plain_norm.item(), rel=1e-5)
        assert compiled_opt.learning_rate.item() == pytest.approx(plain_opt.learning_rate.item(), rel=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(compiled_model.trainable_parameters()),
                                 tree_flatten(plain_model.trainable_parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7, err_msg=name)
    assert compiled_opt.step.item() == 5


def test_inference_preparation_keeps_the_function():
    """Merged LoRA + dequantized fp32 layers compute what base + adapters computed."""
    model = backend.prepare(tiny_llama(seed=5), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=4))
    for _, layer in lora.lora_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = model(x)
    lora.merge(model)
    backend.prepare_inference(model, cpu=True)
    assert not lora.lora_layers(model)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert mx.allclose(ref, model(x), atol=1e-4, rtol=1e-4)


def adapted_llama(dropout: float):
    """A tiny model with LoRA adapters that change its output (lora_b non-zero)."""
    model = backend.prepare(tiny_llama(seed=6), cpu=True)
    mx.random.seed(0)
    lora.apply_lora(model, LoRAConfig(rank=4, dropout=dropout))
    mx.random.seed(1)
    for _, layer in lora.lora_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    mx.eval(model.parameters())
    return model


def plain_forward_loss(model, inputs, targets, mask) -> float:
    """Mean cross-entropy of the full logits at the masked positions."""
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    m = mask.reshape(-1)
    return ((ce * m).sum() / m.sum()).item()


def test_validation_loss_has_no_dropout():
    """With LoRA dropout 0.3 the validation loss, alone and inside the loop, is the same every
    time and equals a plain forward's loss with the dropout off; training mode comes back."""
    batch = next(batches_from(four_examples(), 4))
    plain = plain_forward_loss(adapted_llama(0.0), *batch)
    model = adapted_llama(0.3)
    assert lm_loss(model, batch[0], *loss_positions(*batch[1:]))[0].item() != pytest.approx(plain, rel=1e-3)
    first, second = evaluate(model, [batch]), evaluate(model, [batch])
    assert first == second
    assert first == pytest.approx(plain, rel=1e-4)
    assert all(m.training for _, m in model.named_modules())

    cfg = TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, warmup_steps=0, eval_every=1, save_every=0)
    state = trainer.train(model, cfg, lambda s: batches_from(four_examples(), 4, s), lambda: [batch],
                          progress=trainer.Progress(1, every=1000))
    assert state.history[0][0] == 0 and state.history[0][1] == pytest.approx(plain, rel=1e-4)
    assert all(m.training for _, m in model.named_modules())


def test_generation_has_no_dropout():
    model = adapted_llama(0.3)
    reference = list(generate_ids(adapted_llama(0.0), [3, 1, 4, 1, 5], max_tokens=8))
    for seed in (1, 2):
        mx.random.seed(seed)
        assert list(generate_ids(model, [3, 1, 4, 1, 5], max_tokens=8)) == reference


@pytest.mark.parametrize("keep_best,losses,kept", [
    (True, [5.0, 1.0, 2.0, 3.0], 2),  # the last is 200% above the lowest: over-fitting
    (False, [5.0, 1.0, 2.0, 3.0], 6),
    (True, [5.0, 1.0, 1.1, 1.2], 6),  # 20% above, within keep_best_margin: the last
])
def test_the_run_ends_with_the_adapters_of_its_lowest_validation_loss(tmp_path, monkeypatch, capsys, keep_best,
                                                                       losses, kept):
    """Validation losses at steps 0, 2, 4, 6: step 2's adapters are the result when the last loss is
    more than keep_best_margin (25%) above step 2's (never step 0's untrained ones); with keep_best off,
    or the last within the margin, step 6's. metrics.jsonl says which."""
    scripted, seen = iter(losses), {}

    def fake_evaluate(model, batches, loss_fn):
        seen[len(seen) * 2] = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        return next(scripted)

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    model = backend.prepare(tiny_llama(seed=4), cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=4))
    cfg = TrainConfig(steps=6, batch_size=2, learning_rate=5e-3, warmup_steps=0, eval_every=2, save_every=2,
                      keep_best=keep_best)
    seqs = four_examples()
    state = trainer.train(model, cfg, lambda s: batches_from(seqs, 2, s), lambda: [], run_dir=tmp_path,
                          progress=trainer.Progress(6, every=1000))
    assert state.best_step == 2 and state.history == [[0, losses[0]], [2, losses[1]], [4, losses[2]], [6, losses[3]]]
    assert state.kept_step == kept
    now = dict(tree_flatten(model.trainable_parameters()))
    assert all(mx.array_equal(now[k], seen[kept][k]) for k in now)
    assert not all(mx.array_equal(seen[2][k], seen[6][k]) for k in now)
    said = f"validation loss was lowest at step 2 (1.0000; {losses[3]:.4f} at step 6"
    out = capsys.readouterr()
    assert (said in out.out + out.err) == keep_best
    assert ("the run keeps step 2's adapters" in out.out + out.err) == (kept == 2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"kind": "adapters", "step": kept, "val_loss": dict(state.history)[kept]}
