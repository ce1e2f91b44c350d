"""The training loss and how one batch is computed: cross-entropy at the positions that carry
loss only, the batch packed into one unpadded row when the backend can, split into groups of
whole samples that run side by side on the CPU streams, and the validation loss (in eval mode).
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from edgeft import backend, batches, dequant

# A batch as edgeft.batches yields it: inputs, targets, loss mask (all [B, T]).
Batch = tuple


def output_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The vocabulary projection of an mlx-lm causal LM (tied embedding or lm_head), then its
    final soft cap if it has one (Gemma 2: cap * tanh(logits / cap), as its __call__ applies;
    MLX's tanh: an exp-based fused tanh measured slower on CPU)."""
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    cap = getattr(model, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: mx.tanh(head(h) / cap) * cap


def loss_positions(targets: mx.array, loss_mask: mx.array) -> tuple[mx.array, mx.array]:
    """Flat indices of the positions that carry loss, and their target ids."""
    mask = np.asarray(loss_mask).reshape(-1) > 0
    idx = np.nonzero(mask)[0].astype(np.int32)
    tgt = np.asarray(targets).reshape(-1)[idx].astype(np.int32)
    return mx.array(idx), mx.array(tgt)


def lm_loss(
    model: nn.Module, inputs: mx.array, idx: mx.array, tgt: mx.array, lengths: tuple[int, ...] | None = None
) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the loss positions only.

    The vocabulary projection and softmax, the most expensive part of a small model's step,
    run only where there is loss (assistant tokens), not over prompt and padding. With
    `lengths`, inputs is one packed row of sequences of these lengths (batches.pack).
    """
    window = backend.sliding_window(model)
    if lengths and len(lengths) == 1 and (streams := backend.sample_streams(lengths[0])):
        return _split_sample_loss(model, inputs, idx, tgt, lengths[0], window, streams)
    packing = backend.Packing(tuple(lengths), window) if lengths else None
    with backend.fast_forward(packing):
        h = model.model(inputs)
        return _ce_sum(model, h, idx, tgt) / max(idx.size, 1), mx.array(idx.size)


def _split_sample_loss(model, inputs, idx, tgt, length, window, streams) -> tuple[mx.array, mx.array]:
    """lm_loss of one packed sample as two segments built on two streams, computed side by side:
    the second attends over the first's keys and values (backend.Prefix), and the gradients
    flow back through them, so the loss and gradients are the whole sample's."""
    positions = np.asarray(idx)
    cut = split_point(length, positions, backend.head_share(model), backend.pair_share(model))
    at = int(np.searchsorted(positions, cut))
    prefix = backend.Prefix(cut)
    with mx.stream(streams[0]), backend.fast_forward(backend.Packing((cut,), window), prefix):
        h = model.model(inputs[:, :cut])
        total = _ce_sum(model, h, idx[:at], tgt[:at]) if at > 0 else mx.array(0.0)
    with (mx.stream(streams[1]),
          backend.fast_forward(backend.Packing((length - cut,), window, start=cut), prefix, extend=True)):
        h = model.model(inputs[:, cut:])
        if at < idx.size:
            total = total + _ce_sum(model, h, idx[at:] - cut, tgt[at:])
        return total / max(idx.size, 1), mx.array(idx.size)


def split_point(length: int, loss_positions: np.ndarray, head_share: float, pair_share: float) -> int:
    """Where a lone sample of `length` tokens splits into two segments of about equal work: a
    token's layers (1), the vocabulary head at a loss position (head_share), and attention
    (pair_share a query-key pair: the second segment's queries also see all the first's keys)."""
    first = np.arange(1, length)
    second = length - first
    loss_first = np.searchsorted(loss_positions, first)
    a = first + head_share * loss_first + pair_share * first * first / 2
    b = second + head_share * (len(loss_positions) - loss_first) + pair_share * (second * first + second * second / 2)
    return int(first[np.argmin(np.abs(a - b))])


def _ce_sum(model: nn.Module, h: mx.array, idx: mx.array, tgt: mx.array) -> mx.array:
    """Summed cross-entropy at positions idx of h: logsumexp minus the target logit, as
    nn.losses.cross_entropy."""
    h = h.reshape(-1, h.shape[-1])[idx]
    logits = output_head(model)(h).astype(mx.float32)
    return backend.cross_entropy(logits, tgt).sum()


def input_tokens(mask: mx.array) -> int:
    """Input tokens of a batch without the padding after each sequence's last loss token."""
    m = np.asarray(mask)
    last = np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1] > 0, axis=1), 0)
    return int(last.sum())


def loss_inputs(model, loss_fn, inputs, targets, mask) -> tuple[tuple, int]:
    """The arguments after `model` that loss_fn gets for this batch, and its input tokens.

    A loss function that takes `lengths` gets the batch packed (no padding computed) when
    the model's backend can compute this batch packed exactly."""
    packable = "lengths" in inspect.signature(loss_fn).parameters
    if packable and backend.can_pack(model, tuple(int(n) for n in batches.packed_lengths(mask) if n)):
        inputs, targets, mask, lengths = batches.pack(inputs, targets, mask)
        idx, tgt = loss_positions(targets, mask)
        return (inputs, idx, tgt, lengths), inputs.shape[1]
    idx, tgt = loss_positions(targets, mask)
    return (inputs, idx, tgt), input_tokens(mask)


def stream_split(args: tuple, head_share: float = 0.0) -> list[tuple[object, tuple]]:
    """The loss arguments of one batch (loss_inputs) as [(stream, arguments)]: a packed batch
    is split into groups of whole samples, one per CPU stream (backend.stream_groups), whose
    losses and gradients are built and computed side by side; anything else is one group on
    the default stream. Each group's own value_and_grad keeps the streams apart until their
    gradients are added: one backward graph over both would add them layer by layer, making
    each stream wait for the other at every layer. The groups balance each sample's tokens
    plus `head_share` (backend.head_share) times its loss tokens."""
    if len(args) < 4 or not args[3]:
        return [(mx.default_stream(mx.default_device()), args)]
    inputs, idx, tgt, lengths = args
    positions = np.asarray(idx)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    loss_tokens = np.diff(np.searchsorted(positions, starts))  # idx ascends (loss_positions)
    work = tuple(float(n + head_share * c) for n, c in zip(lengths, loss_tokens))
    groups = []
    for stream, members in backend.stream_groups(tuple(lengths), work):
        pieces, mine, offset = [], [], 0
        for i in members:
            start, stop = int(starts[i]), int(starts[i + 1])
            pieces.append(inputs[:, start:stop])
            at = np.nonzero((positions >= start) & (positions < stop))[0]
            mine.append((at, positions[at] - start + offset))
            offset += stop - start
        sel = np.concatenate([a for a, _ in mine]).astype(np.int32)
        group_idx = np.concatenate([p for _, p in mine]).astype(np.int32)
        group_inputs = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)
        groups.append((stream, (group_inputs, mx.array(group_idx), tgt[mx.array(sel)], tuple(lengths[i] for i in members))))
    return groups


def on_streams(args: tuple, fn: Callable[[tuple, int], object], head_share: float = 0.0) -> list[tuple[object, int]]:
    """[(fn(group arguments, n), n)] for the stream groups of one batch (stream_split) that
    carry n > 0 loss tokens, each built on its own stream, every weight dequantized once
    between them."""
    out = []
    with dequant.shared_weights():
        for stream, group in stream_split(args, head_share):
            n = group[1].size
            if n:
                with mx.stream(stream):
                    out.append((fn(group, n), n))
    return out


def summed_loss_and_grad(model, loss_fn, args: tuple) -> tuple[mx.array | None, dict | None, int]:
    """Loss and gradients of one batch, each summed over its loss tokens (not averaged), and
    the number of those tokens: its stream groups (stream_split) computed side by side, each
    weight dequantized once between them. (None, None, 0) for a batch without loss tokens.
    Each group's mean loss is multiplied by its tokens before the backward, which carries the
    factor to every gradient (not one multiply per gradient matrix afterwards)."""
    def summed(group, n):
        def group_sum(model, *a):
            loss, count = loss_fn(model, *a)
            return loss * n, count

        (loss, _), grads = nn.value_and_grad(model, group_sum)(model, *group)
        return loss, grads

    loss_sum, grads_sum, total = None, None, 0
    for (loss, grads), n in on_streams(args, summed, backend.head_share(model)):
        grads_sum = grads if grads_sum is None else tree_add(grads_sum, grads)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        total += n
    return loss_sum, grads_sum, total


def evaluate(model, batches: Iterable[Batch], loss_fn=lm_loss) -> float:
    """Token-weighted mean loss over the batches, with the model in eval mode (no LoRA
    dropout: the loss of the model as it will be used); its mode is restored after."""
    total, count = loss_sums(model, batches, loss_fn)
    return total / max(count, 1)


def loss_sums(model, batches: Iterable[Batch], loss_fn=lm_loss) -> tuple[float, int]:
    """(summed loss, loss tokens) over the batches in eval mode, as evaluate's mean is made
    (the ranks of a distributed run add theirs before dividing)."""
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in batches:
            args, _ = loss_inputs(model, loss_fn, *batch[:3])
            losses = on_streams(args, lambda group, n: loss_fn(model, *group)[0] * n, backend.head_share(model))
            if losses:
                total += sum(loss for loss, _ in losses).item()
                count += sum(n for _, n in losses)
        return total, count
    finally:
        model.train(was_training)


def tree_map_scale(tree, s):
    return tree_map(lambda g: g * s, tree)


def tree_add(a, b):
    return tree_map(lambda x, y: x + y, a, b)
