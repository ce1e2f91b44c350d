import os

import pytest

# The tests pick the compute path themselves (tests/test_gpu_path.py): a setting left in the
# shell must not turn the CPU path's tests into the GPU path's.
os.environ.pop("EDGEFT_COMPUTE_PATH", None)

# edgeft must load its BLAS before anything imports mlx.
import edgeft  # noqa: F401


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty edgeft home and working folder, the Hub offline: what a CLI test runs in."""
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into edgeft's cache."""
    from edgeft import hub

    return hub.resolve("smollm2-135m-instruct", log=print)


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma 3 270M Q4_K_M GGUF (a base model, Gemma terms), fetched once into
    edgeft's cache."""
    from edgeft import hub

    return hub.resolve("gemma3-270m", log=print)


BRAND_STEPS = 40


@pytest.fixture(scope="session")
def tuned_smollm2(tmp_path_factory, smollm2_path):
    """One real `edgeft tune` of SmolLM2-135M on the example brand-voice chats, shared by the
    tests that need a tuned model (learning, chat, export). Returns the run folder."""
    from pathlib import Path

    from click.testing import CliRunner

    from edgeft.cli import main

    runs = tmp_path_factory.mktemp("runs")
    data = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
    result = CliRunner().invoke(
        main,
        ["tune", "--data", str(data), "--model", str(smollm2_path), "--steps", str(BRAND_STEPS),
         "--eval-every", "20", "--save-every", "20", "--no-export", "--name", "brand", "--runs-dir", str(runs)],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return runs / "brand"


@pytest.fixture(scope="session")
def tuned_gemma3(tmp_path_factory, gemma3_path):
    """One real `edgeft tune --model gemma3-270m --data examples/brand_voice.jsonl` with the
    default recipe (its q8_0 export, checked in llama.cpp, included; the evaluation left to the
    tests). Returns the run folder."""
    from pathlib import Path

    from click.testing import CliRunner

    from edgeft.cli import main

    runs = tmp_path_factory.mktemp("runs")
    data = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
    result = CliRunner().invoke(
        main, ["tune", "--data", str(data), "--model", "gemma3-270m", "--no-eval",
               "--name", "gemma", "--runs-dir", str(runs)],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    print(result.output)
    return runs / "gemma"
