"""MLX's products through edgeft/_sgemm.c (loaded by edgeft/_blas.py). Wide fp32 products reach
MKL in column blocks: the blocks cover the product exactly, the results equal the whole
product's, and without the library (no C compiler at install, or EDGEFT_SGEMM_SPLIT=0) MLX calls
MKL directly. Inside _blas.bf16() the larger products take bfloat16 inputs: rounded to nearest
even, multiplied exactly as the rounded values with fp32 sums, the small ones left in fp32, and
fixed weights rounded once."""

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from edgeft import _blas

ROOT = Path(__file__).resolve().parent.parent
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

pytestmark = pytest.mark.skipif(_blas.LOADED[0] != "MKL", reason="the split is made for MKL (Linux x86_64)")

SGEMM = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int)


def test_the_install_built_it_and_mlx_calls_it():
    assert _blas.SPLIT.startswith("outputs >="), _blas.SPLIT


@pytest.fixture
def own_copy(tmp_path):
    """A second instance of the library (its own settings), calling a recorder that forwards to MKL."""
    spec = importlib.util.find_spec("edgeft._sgemm")
    path = tmp_path / "sgemm_copy.so"
    shutil.copy(spec.origin, path)
    lib = ctypes.CDLL(str(path))
    mkl = ctypes.CDLL(_blas.LOADED[1])
    calls = []

    def record(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        calls.append((m, n, k, b, c))
        mkl.cblas_sgemm(layout, ta, tb, m, n, k, ctypes.c_float(alpha), ctypes.c_void_p(a), lda,
                        ctypes.c_void_p(b), ldb, ctypes.c_float(beta), ctypes.c_void_p(c), ldc)

    recorder = SGEMM(record)
    lib.recorder = recorder  # kept alive as long as the library
    lib.edgeft_sgemm_next(recorder, 256, 1024, 64)
    return lib, calls


def sgemm(lib, a, b, trans_b):
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    c = np.full((m, n), np.nan, np.float32)
    lib.cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k, ctypes.c_float(1.0),
                    a.ctypes.data_as(ctypes.c_void_p), k, b.ctypes.data_as(ctypes.c_void_p), b.shape[1],
                    ctypes.c_float(0.0), c.ctypes.data_as(ctypes.c_void_p), n)
    return c


@pytest.mark.parametrize("trans_b", [False, True], ids=["B is KxN", "B is NxK"])
def test_blocks_cover_the_product_exactly(own_copy, trans_b):
    lib, calls = own_copy
    rng = np.random.default_rng(0)
    a = rng.standard_normal((70, 40), dtype=np.float32)
    b = rng.standard_normal((1100, 40) if trans_b else (40, 1100), dtype=np.float32)
    c = sgemm(lib, a, b, trans_b)
    assert [n for _, n, _, _, _ in calls] == [256, 256, 256, 256, 76]
    step_b = 40 * 4 if trans_b else 4  # bytes from one output column's B to the next's
    assert [bp - calls[0][3] for *_, bp, _ in calls] == [j * step_b for j in range(0, 1100, 256)]
    assert [cp - calls[0][4] for *_, cp in calls] == [j * 4 for j in range(0, 1100, 256)]
    np.testing.assert_allclose(c, a @ (b.T if trans_b else b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(70, 40, 1000), (63, 40, 1100), (70, 40, 256)], ids=["narrow", "few rows", "one block"])
def test_small_products_go_whole(own_copy, shape):
    lib, calls = own_copy
    m, k, n = shape
    rng = np.random.default_rng(1)
    c = sgemm(lib, rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32), False)
    assert [(cm, cn) for cm, cn, *_ in calls] == [(m, n)] and not np.isnan(c).any()


@pytest.mark.parametrize("transposed", [False, True])
def test_mlx_products_equal_the_whole_ones(transposed):
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((300, 576), dtype=np.float32))
    w = mx.array(rng.standard_normal((1500, 576) if transposed else (576, 1500), dtype=np.float32))
    product = lambda: np.array(x @ (w.T if transposed else w))  # noqa: E731
    split = product()
    with _blas.split(0):
        whole = product()
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-4)
    reference = np.asarray(x, np.float64) @ np.asarray(w.T if transposed else w, np.float64)
    np.testing.assert_allclose(split, reference, rtol=1e-4, atol=1e-3)


PROBE = """
import edgeft, mlx.core as mx, numpy as np
from edgeft import _blas
x = mx.array(np.arange(300 * 64, dtype=np.float32).reshape(300, 64) / 1e4)
w = mx.array(np.ones((64, 2000), np.float32))
assert np.allclose(np.array(x @ w), np.asarray(x) @ np.asarray(w), rtol=1e-5)
print(_blas.LOADED[0], "|", _blas.SPLIT)
"""


def probe(env: dict, pythonpath: Path = ROOT, first: str = "") -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "EDGEFT_SGEMM_SPLIT"}
    base["PYTHONPATH"] = os.pathsep.join([str(pythonpath), base.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", first + PROBE], env={**base, **env}, capture_output=True,
                          text=True, timeout=300, cwd=pythonpath)  # `-c` puts the working folder first


def test_turned_off_mlx_calls_mkl_directly():
    out = probe({"EDGEFT_SGEMM_SPLIT": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "MKL | off (EDGEFT_SGEMM_SPLIT=0)"


def test_a_bad_setting_is_one_clear_error():
    out = probe({"EDGEFT_SGEMM_SPLIT": "wide"})
    assert out.returncode != 0
    assert "EDGEFT_SGEMM_SPLIT=wide: give output columns per call (e.g. 256), or 0 for none" in out.stderr


def test_without_the_built_library_mlx_calls_mkl_directly(tmp_path):
    """An install that found no C compiler: the package without its extension."""
    shutil.copytree(ROOT / "edgeft", tmp_path / "edgeft", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # an editable install's finder would still find the one built in the source tree
    out = probe({}, pythonpath=tmp_path, first="import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "MKL | off (edgeft._sgemm was not built: the install found no C compiler)"


# --- bfloat16 products (train.matmul bf16) ----------------------------------------------------


def to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (nearest, ties to even), as fp32 values."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    return r.view(np.float32)


def test_rounding_to_bf16_is_to_nearest_even_and_keeps_nan_and_inf():
    lib = ctypes.CDLL(importlib.util.find_spec("edgeft._sgemm").origin)
    one = 0x3F800000
    bits = np.array([one, one + 0x7FFF, one + 0x8000, one + 0x8001, one + 0x18000, 0x7F800000, 0xFF800000,
                     0x7F800001, 0x7FC00000, 0x7F7FFFFF, 0x00000001, 0x80000000], np.uint32)
    x = np.concatenate([bits.view(np.float32), np.random.default_rng(3).standard_normal(1000, dtype=np.float32)])
    x = x.reshape(4, -1)  # rows with a stride: the first 200 columns of each
    out = np.zeros((4, 200), np.uint16)
    lib.edgeft_to_bf16(x.ctypes.data_as(ctypes.c_void_p), 4, 200, x.shape[1], out.ctypes.data_as(ctypes.c_void_p))
    got = (out.astype(np.uint32) << 16).view(np.float32)
    h = out.ravel()[:12]
    assert list(h[:5]) == [0x3F80, 0x3F80, 0x3F80, 0x3F81, 0x3F82]  # down, tie to even (down), up, tie to even (up)
    assert list(h[5:7]) == [0x7F80, 0xFF80]  # +-inf stay
    assert np.isnan(got.ravel()[7:9]).all()  # a NaN whose top bits read as inf stays NaN
    assert h[9] == 0x7F80  # the largest float rounds up to inf, as bfloat16 must
    assert list(h[10:12]) == [0x0000, 0x8000]
    finite = np.isfinite(x[:, :200])
    np.testing.assert_array_equal(got[finite], to_bf16(x[:, :200])[finite])


@pytest.fixture
def bf16_copy(own_copy):
    """own_copy with bf16 on (MKL's bf16 GEMM, products with every side >= 32)."""
    lib, calls = own_copy
    mkl = ctypes.CDLL(_blas.LOADED[1])
    lib.edgeft_sgemm_bf16(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p), 32)
    return lib, calls


@pytest.mark.parametrize("trans_b", [False, True], ids=["B is KxN", "B is NxK"])
@pytest.mark.parametrize("n", [300, 1100, 90_000], ids=["narrow", "wide", "over 16 MB (a buffer of its own)"])
def test_bf16_products_are_the_rounded_inputs_product_in_fp32(bf16_copy, trans_b, n):
    lib, calls = bf16_copy
    rng = np.random.default_rng(4)
    a = rng.standard_normal((70, 96), dtype=np.float32)
    b = rng.standard_normal((n, 96) if trans_b else (96, n), dtype=np.float32)
    c = sgemm(lib, a, b, trans_b)
    assert calls == []  # none went to sgemm
    exact = to_bf16(a).astype(np.float64) @ to_bf16(b.T if trans_b else b).astype(np.float64)
    np.testing.assert_allclose(c, exact, rtol=1e-5, atol=1e-4)
    assert np.abs(c - a.astype(np.float64) @ (b.T if trans_b else b)).max() > 1e-3  # so it was rounded


@pytest.mark.parametrize("shape", [(70, 8, 1100), (8, 96, 300), (70, 96, 8)], ids=["k 8", "m 8", "n 8"])
def test_products_with_a_side_under_32_stay_fp32(bf16_copy, shape):
    lib, calls = bf16_copy
    m, k, n = shape
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    c = sgemm(lib, a, b, False)
    assert calls  # sgemm did them
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_mlx_products_inside_bf16_and_only_there():
    rng = np.random.default_rng(6)
    x = mx.array(rng.standard_normal((300, 576), dtype=np.float32))
    w = mx.array(rng.standard_normal((1500, 576), dtype=np.float32))
    lora_a = mx.array(rng.standard_normal((576, 8), dtype=np.float32))
    exact = to_bf16(np.asarray(x)).astype(np.float64) @ to_bf16(np.asarray(w)).astype(np.float64).T
    fp32 = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    with _blas.bf16():
        inside, low_rank = np.array(x @ w.T), np.array(x @ lora_a)
    np.testing.assert_allclose(inside, exact, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(low_rank, np.asarray(x, np.float64) @ np.asarray(lora_a), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(x @ w.T), fp32, rtol=1e-5, atol=1e-3)  # off again after the block
    assert 0 < _blas.bf16_speedup() < 100


def test_fixed_weights_are_rounded_once_and_forgotten_after_the_block():
    """fix(): the first product makes the weight's bfloat16 copy and the later ones use it, so a
    change to the weight's memory (never made in a run, where the base is fixed) is not seen
    until the block ends and the copies are freed."""
    rng = np.random.default_rng(7)
    x = mx.array(rng.standard_normal((300, 576), dtype=np.float32))
    w = mx.array(rng.standard_normal((1500, 576), dtype=np.float32))
    mx.eval(x, w)
    exact = to_bf16(np.asarray(x)).astype(np.float64) @ to_bf16(np.asarray(w)).astype(np.float64).T
    memory = np.frombuffer(memoryview(w), dtype=np.float32)
    kept = memory.copy()
    with _blas.bf16():
        _blas.fix([w, w])
        first = np.array(x @ w.T)
        memory[:] = 0.0
        again, backward = np.array(x @ w.T), np.array(mx.ones((300, 1500)) @ w)
    after = np.array(x @ w.T)
    memory[:] = kept
    np.testing.assert_allclose(first, exact, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(again, first)  # the copy, made before the change
    np.testing.assert_allclose(backward, to_bf16(kept.reshape(1500, 576)).sum(axis=0)[None].repeat(300, 0), rtol=1e-4)
    assert not after.any()  # the block is over: fp32, from the memory as it is now
    with _blas.bf16():
        np.testing.assert_allclose(np.array(x @ w.T), exact, rtol=1e-5, atol=1e-3)  # no copy left over


def test_released_weights_give_their_memory_back_and_multiply_from_their_copy():
    """fix(release=True), as a run's kept weights: the fp32 pages go back to the system at once (the
    process holds ~2 of the 4 bytes a weight), every product with the weight goes in bf16 from the
    copy, the narrow ones and those of a view into it too (the fp32 values are gone), and at the
    block's end an array still held gets its bf16 values back."""
    from edgeft import system

    rng = np.random.default_rng(8)
    x = mx.array(rng.standard_normal((300, 576), dtype=np.float32))
    w = mx.array(rng.standard_normal((40_000, 576), dtype=np.float32))  # 92 MB
    mx.eval(x, w)
    original = np.array(w)
    kept = to_bf16(original)
    exact = to_bf16(np.asarray(x)).astype(np.float64) @ kept.astype(np.float64).T
    before = system.current_rss()
    with _blas.bf16():
        _blas.fix([w], release=True)
        given_back = before - system.current_rss()
        whole, narrow = np.array(x @ w.T), np.array(x[:5] @ w.T)  # 5 rows: fp32 if w were not released
        view = np.array(x @ w[1000:1100].T)
        backward = np.array(mx.ones((3, 40_000)) @ w)
    after = np.array(w).ravel()
    start = np.asarray(w).ctypes.data
    lo, hi = (-(-start // 4096) * 4096 - start) // 4, ((start + w.nbytes) // 4096 * 4096 - start) // 4
    # 4 bytes a weight out, up to 2 in (a long test process may have the copy's pages already)
    assert 0.4 * w.nbytes < given_back < 1.05 * w.nbytes
    np.testing.assert_allclose(whole, exact, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(narrow, exact[:5], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(view, exact[:, 1000:1100], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(backward, kept.astype(np.float64).sum(axis=0)[None].repeat(3, 0), rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(after[lo:hi], kept.ravel()[lo:hi])  # the whole pages: bf16 values
    np.testing.assert_array_equal(after[:lo], original.ravel()[:lo])  # the partial ones: never given back
    np.testing.assert_array_equal(after[hi:], original.ravel()[hi:])


def test_flash_attention_tiles_go_in_bf16_inside_the_block_only():
    """edgeft/_kernels.cpp's attention takes MKL's bf16 GEMM for its tile products while bf16 is
    on (its operands rounded once each): values and gradients within bf16's error of fp32's, and
    fp32's exactly again after the block."""
    from edgeft import cpu_kernels

    assert cpu_kernels.flash_attention()
    mx.random.seed(1)
    q, k, v = mx.random.normal((1, 6, 200, 64)), mx.random.normal((1, 2, 260, 64)), mx.random.normal((1, 2, 260, 64))
    w = mx.random.normal(q.shape)
    grad = mx.value_and_grad(lambda q, k, v: (cpu_kernels.attention(q, k, v, 0.125, True) * w).sum(), argnums=(0, 1, 2))
    fp32 = grad(q, k, v)
    mx.eval(fp32)
    with _blas.bf16():
        bf16 = grad(q, k, v)
        mx.eval(bf16)
    after = grad(q, k, v)
    for a, b, c in zip([fp32[0], *fp32[1]], [bf16[0], *bf16[1]], [after[0], *after[1]]):
        error = (mx.abs(a - b).max() / mx.abs(a).max()).item()
        assert 1e-4 < error < 2e-2  # rounded, to bf16's precision
        assert mx.array_equal(a, c).item()


def test_the_kernels_self_test_passes_inside_bf16(monkeypatch):
    """A run's first step, inside _blas.bf16(), runs cpu_kernels' one self-test: its attention
    (4 and 10 wide, under bf16's smallest side) stays fp32, so the test compares like with like."""
    from edgeft import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_compiled_ok", None)
    with _blas.bf16():
        assert cpu_kernels.compiled_usable()
