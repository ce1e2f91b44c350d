import os

# edgeft must load its BLAS before anything imports mlx.
import edgeft  # noqa: F401

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into edgeft's cache."""
    from edgeft import hub

    return hub.resolve("smollm2-135m-instruct")
