"""MLX's wide fp32 products reach MKL in column blocks (edgeft/_sgemm.c, loaded by edgeft/_blas.py):
the blocks cover the product exactly, the results equal the whole product's, and without the
library (no C compiler at install, or EDGEFT_SGEMM_SPLIT=0) MLX calls MKL directly."""

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
