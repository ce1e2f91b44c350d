"""Token-by-token generation with a KV cache, for `edgeft chat` and the tests."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from edgeft.config import ChatConfig


def generate_ids(
    model: nn.Module,
    prompt: list[int],
    max_tokens: int = ChatConfig.max_tokens,
    temperature: float = 0.0,
    stop_ids: set[int] | frozenset = frozenset(),
    seed: int = 0,
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
    for _ in range(max_tokens):
        if temperature <= 0:
            tok = mx.argmax(logits, axis=-1)
        else:
            key, sub = mx.random.split(key)
            tok = mx.random.categorical(logits.astype(mx.float32) / temperature, key=sub)
        t = tok.item()
        if t in stop_ids:
            return
        yield t
        logits = model(tok.reshape(1, 1), cache=cache)[:, -1, :]


def chat(model, tokenizer, messages: list[dict], **kw) -> str:
    """The assistant's reply to `messages`, rendered with the model's chat template."""
    # Chat templates write the BOS token themselves when the model wants one.
    ids = tokenizer.encode(tokenizer.render(messages, add_generation_prompt=True))
    out = list(generate_ids(model, ids, stop_ids=tokenizer.stop_ids, **kw))
    return tokenizer.decode(out)
