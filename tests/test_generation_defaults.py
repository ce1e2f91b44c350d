"""The generation settings measured by `edgeft eval` are the defaults of chat, eval and the
exported Modelfile; the MLX repeat penalty is llama.cpp's."""

import mlx.core as mx
import numpy as np

from edgeft import generate, modelfile
from edgeft.config import GenerateConfig, RunConfig


def test_modelfile_carries_the_generation_defaults():
    gen = GenerateConfig()
    text = modelfile.build("./m.gguf", None).text
    assert f"PARAMETER repeat_penalty {gen.repeat_penalty:g}\n" in text
    assert f"PARAMETER repeat_last_n {gen.repeat_last_n}\n" in text
    assert f"PARAMETER num_predict {gen.max_tokens}\n" in text
    other = modelfile.build("./m.gguf", None, generation=GenerateConfig(repeat_penalty=1.5)).text
    assert "PARAMETER repeat_penalty 1.5\n" in other


def test_run_config_has_the_sections():
    d = RunConfig().to_dict()
    assert d["generate"] == {"max_tokens": GenerateConfig().max_tokens,
                             "temperature": GenerateConfig().temperature,
                             "repeat_penalty": GenerateConfig().repeat_penalty,
                             "repeat_last_n": GenerateConfig().repeat_last_n}
    assert d["eval"]["enabled"] is True


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = mx.array([[2.0, -1.0, 3.0, 0.5]])
    out = np.array(generate._penalize(logits, [0, 1, 0], 2.0))
    assert np.allclose(out, [[1.0, -2.0, 3.0, 0.5]])


class Echo:
    """A stand-in model whose next token is always token 3 by a margin of 0.2 over token 5."""

    def eval(self):  # generation puts the model in eval mode, as mlx-lm's modules take it
        return self

    def __call__(self, x, cache=None):
        logits = mx.zeros((1, x.shape[1], 8))
        return logits.at[:, :, 3].add(1.2).at[:, :, 5].add(1.0)


def test_penalty_breaks_a_one_token_loop(monkeypatch):
    monkeypatch.setattr(generate, "make_prompt_cache", lambda model: None)
    plain = list(generate.generate_ids(Echo(), [1], max_tokens=4, repeat_penalty=1.0))
    assert plain == [3, 3, 3, 3]
    penalized = list(generate.generate_ids(Echo(), [1], max_tokens=4, repeat_penalty=1.3))
    assert penalized[:2] == [3, 5]
