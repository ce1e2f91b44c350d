"""Samples into batches: the seeded train/validation split, padded batches ([B, T], T a
multiple of PAD_MULTIPLE), packed rows (one unpadded row per batch, the CPU path), the endless
seeded stream of training batches and one pass of evaluation batches; and the geometry the
memory plan sizes: batch_shape, the largest batch a data set could form, and drawn_shapes,
those of the batches a run will actually draw."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from edgeft.records import Sample

PAD_ID = 0
PAD_MULTIPLE = 8
_SPLIT_STREAM, _EPOCH_STREAM = 1, 2  # keep split and epoch orders independent for one seed


def _seed(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *stream])


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, valid): a seeded share `fraction` held out; at least one validation sample when
    fraction > 0 and there are two or more samples; train never empty. Both keep file order."""
    n = len(samples)
    if fraction <= 0 or n < 2:
        return list(samples), []
    n_valid = min(max(1, round(n * fraction)), n - 1)
    held = set(_seed(seed, _SPLIT_STREAM).permutation(n)[:n_valid].tolist())
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def padded_width(longest_input: int) -> int:
    """Columns of a padded batch whose longest input has this many tokens: rounded up to a
    multiple of PAD_MULTIPLE."""
    return max(PAD_MULTIPLE, -(-longest_input // PAD_MULTIPLE) * PAD_MULTIPLE)


def packed_lengths(loss_mask) -> np.ndarray:
    """Per row of a [B, T] loss mask, the inputs a packed row keeps of it: up to its last loss
    position (what follows cannot change the loss: attention is causal); 0 for a row without
    loss, which packing drops."""
    m = np.asarray(loss_mask) > 0
    if not m.shape[1]:
        return np.zeros(m.shape[0], dtype=np.int64)
    return np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)


def collate(batch: list[Sample]) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, loss_mask) [B, T]: T the longest input rounded up to a multiple of 8,
    padding id 0 with loss 0."""
    width = padded_width(max(len(s.tokens) - 1 for s in batch))
    inputs = np.full((len(batch), width), PAD_ID, dtype=np.int32)
    targets = np.full((len(batch), width), PAD_ID, dtype=np.int32)
    loss_mask = np.zeros((len(batch), width), dtype=np.float32)
    for b, s in enumerate(batch):
        n = len(s.tokens) - 1
        inputs[b, :n] = s.tokens[:-1]
        targets[b, :n] = s.tokens[1:]
        loss_mask[b, :n] = s.mask[1:]
    return mx.array(inputs), mx.array(targets), mx.array(loss_mask)


def pack(inputs, targets, loss_mask) -> tuple[mx.array, mx.array, mx.array, tuple[int, ...]]:
    """A padded batch as one row [1, N] with no padding: each sequence cut after its last loss
    position (packed_lengths), sequences without loss dropped, the rest laid end to end.
    Returns the row's inputs, targets, loss mask and the sequence lengths (for
    edgeft.backend.Packing). N is what collate's batch counts as input tokens; the loss
    positions keep their order."""
    ends = packed_lengths(loss_mask)
    rows = [(b, int(n)) for b, n in enumerate(ends) if n]
    x, y, w = np.asarray(inputs), np.asarray(targets), np.asarray(loss_mask)

    def row(a):
        return mx.array(np.concatenate([a[b, :n] for b, n in rows] or [a[0, :0]])[None])

    return row(x), row(y), row(w), tuple(n for _, n in rows)


def batch_shape(samples: list[Sample], batch_size: int, max_seq_len: int) -> tuple[int, int, list[int]]:
    """(seq_len, loss tokens, lengths) of the largest batch `samples` can form: the longest
    sample's padded width (as collate pads), the B largest loss-token counts together, and the
    B largest packed lengths (as pack cuts). With no samples, every token of max_seq_len."""
    if not samples:
        return max_seq_len, batch_size * max_seq_len, [max_seq_len] * batch_size
    width = padded_width(max(len(s.tokens) - 1 for s in samples))
    losses = sorted((sum(s.mask[1:]) for s in samples), reverse=True)
    cuts = sorted((int(packed_lengths([s.mask[1:]])[0]) for s in samples), reverse=True)
    return width, sum(losses[:batch_size]), cuts[:batch_size]


def drawn_indices(n: int, batch_size: int, seed: int, start_step: int = 0):
    """Sample indices of the training batches, forever, a pure function of (seed, step).

    The samples form one endless stream, epoch e in an order seeded by (seed, e); batch k is
    stream items k*B .. k*B+B-1 (a batch may span two epochs), so starting at `start_step`
    yields exactly what continuing from step 0 would have.
    """
    if not n:
        raise ValueError("iterate_batches: no samples")
    if batch_size < 1:
        raise ValueError("iterate_batches: batch_size must be at least 1")
    orders = {}
    step = start_step
    while True:
        batch = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(p, n)
            if epoch not in orders:
                orders = {e: o for e, o in orders.items() if e >= epoch - 1}
                orders[epoch] = _seed(seed, _EPOCH_STREAM, epoch).permutation(n)
            batch.append(int(orders[epoch][i]))
        yield batch
        step += 1


def iterate_batches(samples: list[Sample], batch_size: int, seed: int, start_step: int = 0):
    """The training batches (collated) in drawn_indices' order, forever."""
    for batch in drawn_indices(len(samples), batch_size, seed, start_step):
        yield collate([samples[i] for i in batch])


def drawn_shapes(samples: list[Sample], batch_size: int, seed: int, count: int) -> set[tuple[int, int, tuple[int, ...]]]:
    """The distinct (seq_len, loss tokens, lengths) of the first `count` batches iterate_batches
    draws, each as batch_shape gives the largest one: what this run's steps will really hold."""
    widths = [len(s.tokens) - 1 for s in samples]
    losses = [int(sum(s.mask[1:])) for s in samples]
    cuts = [int(packed_lengths([s.mask[1:]])[0]) for s in samples]
    shapes, drawn = set(), drawn_indices(len(samples), batch_size, seed)
    for _ in range(max(int(count), 1)):
        batch = next(drawn)
        shapes.add((padded_width(max(widths[i] for i in batch)), sum(losses[i] for i in batch),
                    tuple(sorted((cuts[i] for i in batch if cuts[i]), reverse=True))))
    return shapes


def eval_batches(samples: list[Sample], batch_size: int):
    """One pass over `samples` (sorted by length, so batches pad little); the last batch may
    be smaller."""
    ordered = sorted(samples, key=lambda s: len(s.tokens))
    for i in range(0, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size])
