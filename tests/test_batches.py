"""edgeft.batches: the seeded split, padded batches, and batch streams that resume exactly."""

import mlx.core as mx
import numpy as np

from edgeft import batches as B
from edgeft.records import Sample


# --- split --------------------------------------------------------------------------------
def fake_samples(lengths):
    return [Sample(list(range(1, n + 1)), [False] + [True] * (n - 1), i + 1) for i, n in enumerate(lengths)]


def test_split_is_seeded_disjoint_and_never_empties_either_side():
    samples = fake_samples([5] * 50)
    train, valid = B.split(samples, 0.1, seed=3)
    assert len(valid) == 5 and len(train) == 45
    assert sorted(s.line for s in train + valid) == list(range(1, 51))
    assert [s.line for s in valid] == sorted(s.line for s in valid)  # file order kept
    assert B.split(samples, 0.1, seed=3) == (train, valid)
    assert B.split(samples, 0.1, seed=4)[1] != valid
    assert len(B.split(samples[:3], 0.01, 0)[1]) == 1  # at least one validation sample
    assert [len(x) for x in B.split(samples[:2], 0.9, 0)] == [1, 1]  # train never empty
    assert B.split(samples[:1], 0.5, 0) == (samples[:1], [])
    assert B.split(samples, 0.0, 0) == (samples, [])


# --- batches ------------------------------------------------------------------------------
def take(it, k):
    return [tuple(np.array(a) for a in next(it)) for _ in range(k)]


def test_batches_pad_to_a_multiple_of_8_and_shift_targets():
    samples = fake_samples([4, 11])
    inputs, targets, mask = B.collate(samples)
    assert inputs.dtype == mx.int32 and targets.dtype == mx.int32 and mask.dtype == mx.float32
    assert inputs.shape == (2, 16)
    inputs, targets, mask = np.array(inputs), np.array(targets), np.array(mask)
    assert inputs[0, :3].tolist() == [1, 2, 3] and targets[0, :3].tolist() == [2, 3, 4]
    assert (inputs[0, 3:] == 0).all() and (targets[0, 3:] == 0).all() and (mask[0, 3:] == 0).all()
    assert mask[1].tolist() == [1.0] * 10 + [0.0] * 6


def test_iterate_batches_is_deterministic_and_resumes_exactly():
    samples = fake_samples([3, 5, 7, 9, 11, 13, 15])
    a = take(B.iterate_batches(samples, 3, seed=1), 12)
    b = take(B.iterate_batches(samples, 3, seed=1), 12)
    assert all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    resumed = take(B.iterate_batches(samples, 3, seed=1, start_step=5), 7)
    assert all(np.array_equal(x, y) for p, q in zip(a[5:], resumed) for x, y in zip(p, q))
    other = take(B.iterate_batches(samples, 3, seed=2), 12)
    assert any(not np.array_equal(p[0], q[0]) for p, q in zip(a, other))


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    samples = fake_samples(range(2, 14))  # 12 samples of distinct lengths
    seen = [int((m > 0).sum()) + 1 for batch in take(B.iterate_batches(samples, 4, seed=0), 9) for m in batch[2]]
    epochs = [seen[i : i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == list(range(2, 14)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_eval_batches_cover_every_sample_once():
    samples = fake_samples([3, 9, 5, 7, 4])
    batches = list(B.eval_batches(samples, 2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert sum(float(b[2].sum()) for b in batches) == sum(n - 1 for n in [3, 9, 5, 7, 4])


def test_batch_shape_is_what_collate_and_pack_make_of_the_largest_batch():
    # loss ends early in some samples: packing cuts them there, padding does not
    samples = [Sample(list(range(1, n + 1)), [False] + [True] * k + [False] * (n - 1 - k), i + 1)
               for i, (n, k) in enumerate([(6, 5), (20, 3), (13, 12), (9, 0)])]
    width, loss_tokens, lengths = B.batch_shape(samples, 2, 512)
    inputs, targets, mask = B.collate(samples)
    assert width == inputs.shape[1] == 24
    _, _, _, packed = B.pack(inputs, targets, mask)
    assert sorted(packed, reverse=True)[:2] == lengths == [12, 5]
    assert loss_tokens == 12 + 5
    assert B.batch_shape([], 3, 64) == (64, 192, [64, 64, 64])


def test_drawn_shapes_are_those_of_the_batches_iterate_batches_draws():
    rng = np.random.default_rng(3)
    samples = []
    for i, n in enumerate(rng.integers(4, 60, size=23)):
        k = int(rng.integers(0, n - 1))
        samples.append(Sample(list(range(1, n + 1)), [False] * (n - k) + [True] * k, i + 1))
    count, size = 17, 3
    it = B.iterate_batches(samples, size, seed=5)
    want = set()
    for _ in range(count):
        inputs, targets, mask = next(it)
        _, _, _, packed = B.pack(inputs, targets, mask)
        want.add((inputs.shape[1], int(np.asarray(mask).sum()), tuple(sorted(packed, reverse=True))))
    assert B.drawn_shapes(samples, size, seed=5, count=count) == want
    # the largest batch the data could form is at least as large as any drawn
    width, loss_tokens, lengths = B.batch_shape(samples, size, 512)
    assert all(w <= width and k <= loss_tokens and sum(c) <= sum(lengths) for w, k, c in want)
