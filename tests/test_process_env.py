"""Importing edgeft tunes this process only: the settings it gives MKL's OpenMP runtime and MLX
never reach the environment that child processes (pip, llama.cpp, other programs) inherit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = ("KMP_BLOCKTIME", "MLX_BFS_MAX_WIDTH")

PROBE = """
import ctypes, json, os, subprocess, sys, threading
import edgeft, edgeft.backend, mlx.core as mx
from edgeft import _blas
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
child = subprocess.run([sys.executable, "-c", "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))",
                        *%r], capture_output=True, text=True, check=True).stdout
blocktime = None
if _blas.LOADED[0] == "MKL":  # what a thread MKL starts later (MLX's) gets from the OpenMP runtime
    iomp = ctypes.CDLL("libiomp5.so")
    seen = []
    t = threading.Thread(target=lambda: seen.append(iomp.kmp_get_blocktime()))
    t.start(); t.join()
    blocktime = seen[0]
print(json.dumps({"here": {k: os.environ.get(k) for k in %r}, "child": json.loads(child), "blocktime": blocktime}))
""" % (VARIABLES, VARIABLES)


def run_probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="edgeft sets these on Linux only")
def test_import_edgeft_leaves_the_environment_alone():
    r = run_probe()
    assert r["here"] == {k: None for k in VARIABLES}
    assert r["child"] == {k: None for k in VARIABLES}
    assert r["blocktime"] in (None, 0)  # the setting still applies in this process


@pytest.mark.skipif(sys.platform != "linux", reason="edgeft sets these on Linux only")
def test_the_users_own_settings_are_kept_and_inherited():
    mine = {"KMP_BLOCKTIME": "7", "MLX_BFS_MAX_WIDTH": "30"}
    r = run_probe(**mine)
    assert r["here"] == mine and r["child"] == mine
    assert r["blocktime"] in (None, 7)
