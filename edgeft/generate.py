"""Token-by-token generation with a KV cache, for `edgeft chat`, `edgeft eval` and the tests.

The repeat penalty is llama.cpp's (what the exported GGUF runs with): each distinct token
among the last `repeat_last_n` generated tokens (the prompt's are not counted) has its logit
divided by the penalty when positive, multiplied when negative.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from edgeft.chat_encode import with_bos
from edgeft.config import GenerateConfig

_DEFAULTS = GenerateConfig()


def _penalize(logits: mx.array, recent: list[int], penalty: float) -> mx.array:
    ids = mx.array(sorted(set(recent)))
    seen = logits[:, ids]
    return logits.at[:, ids].add(mx.where(seen > 0, seen / penalty, seen * penalty) - seen)


def generate_ids(
    model: nn.Module,
    prompt: list[int],
    max_tokens: int = _DEFAULTS.max_tokens,
    temperature: float = _DEFAULTS.temperature,
    stop_ids: set[int] | frozenset = frozenset(),
    seed: int = 0,
    repeat_penalty: float = _DEFAULTS.repeat_penalty,
    repeat_last_n: int = _DEFAULTS.repeat_last_n,
) -> Iterator[int]:
    """Yield new token ids: greedy at temperature 0, sampled otherwise; stops at a stop id
    (not yielded) or after max_tokens. Puts `model` in eval mode (no LoRA dropout), as
    mlx-lm's load does."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    model.eval()
    key = mx.random.key(seed)
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    out: list[int] = []
    for _ in range(max_tokens):
        if repeat_penalty != 1.0 and repeat_last_n > 0 and out:
            logits = _penalize(logits, out[-repeat_last_n:], repeat_penalty)
        if temperature <= 0:
            tok = mx.argmax(logits, axis=-1)
        else:
            key, sub = mx.random.split(key)
            tok = mx.random.categorical(logits.astype(mx.float32) / temperature, key=sub)
        t = tok.item()
        if t in stop_ids:
            return
        out.append(t)
        yield t
        logits = model(tok.reshape(1, 1), cache=cache)[:, -1, :]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens of `messages` rendered with the model's chat template, ready for a reply,
    with BOS as training had it (chat_encode.with_bos)."""
    return with_bos(tokenizer, tokenizer.encode(tokenizer.render(messages, add_generation_prompt=True)))


def chat(model, tokenizer, messages: list[dict], **kw) -> str:
    """The assistant's reply to `messages`, rendered with the model's chat template."""
    out = list(generate_ids(model, prompt_ids(tokenizer, messages), stop_ids=tokenizer.stop_ids, **kw))
    return tokenizer.decode(out)
