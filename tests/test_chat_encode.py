"""edgeft.chat_encode: loss masks through the real chat template, exactly on the assistant
turns and their end-of-turn token, with the tokenizer's BOS.

Tokenizers are the project's own, built from the tiny GGUF tokenizer metadata (tests/tiny.py);
one test uses the real SmolLM2 tokenizer.
"""

import mlx.core as mx
import pytest
from chats import CHAT3, loss_runs, tiny_tok
from tiny import spm_tokenizer_metadata, tiny_tokenizer_metadata

from edgeft.chat_encode import encode_chat
from edgeft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tok()


# --- loss masks ---------------------------------------------------------------------------
def test_mask_is_exactly_every_assistant_turn_and_its_end_token(tok):
    tokens, mask = encode_chat(tok, CHAT3)
    contents = [m["content"] for m in CHAT3 if m["role"] == "assistant"]
    assert loss_runs(tok, tokens, mask) == [c + "<|im_end|>" for c in contents]
    # the tokens are the template's rendering tokenized whole, as at inference
    assert tokens == tok.encode(tok.render(CHAT3))
    # and nothing else carries loss: the unmasked text is the rest of the rendering
    rest = tok.decode([t for t, m in zip(tokens, mask) if not m], skip_special=False)
    full = tok.render(CHAT3)
    for c in contents:
        full = full.replace(c + "<|im_end|>", "", 1)
    assert rest == full


def test_mask_when_template_is_not_prefix_consistent(tok):
    # SmolLM2-style: a default system message only when the chat does not start with one, so
    # rendering the empty prefix before a leading assistant turn is not a prefix of the whole.
    odd = Tokenizer.from_gguf_metadata({
        **tiny_tokenizer_metadata(),
        "tokenizer.chat_template": (
            "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
            "{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
    })
    messages = [{"role": "assistant", "content": "Welcome in!"}] + CHAT3[1:]
    tokens, mask = encode_chat(odd, messages)
    assert loss_runs(odd, tokens, mask) == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert tokens == odd.encode(odd.render(messages))


def test_assistant_weight_zero_is_not_trained(tok):
    messages = [dict(m) for m in CHAT3]
    messages[2]["weight"] = 0
    tokens, mask = encode_chat(tok, messages)
    assert loss_runs(tok, tokens, mask) == [messages[4]["content"] + "<|im_end|>", messages[6]["content"] + "<|im_end|>"]


def test_sentencepiece_tokenizer_gets_bos_and_exact_mask():
    spm = Tokenizer.from_gguf_metadata(spm_tokenizer_metadata())
    # (SentencePiece decoding drops a run's leading space, so no content starts with one here)
    messages = [{**m, "content": m["content"].lstrip()} for m in CHAT3]
    tokens, mask = encode_chat(spm, messages)
    assert tokens[0] == spm.bos_id and not mask[0]
    assert tokens == [spm.bos_id] + spm.encode(spm.render(messages))
    # this vocabulary has no <|im_end|> token: the whole turn the template writes is trained
    assert loss_runs(spm, tokens, mask) == [
        m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"
    ]


# --- the real tokenizer -------------------------------------------------------------------
@pytest.mark.real
def test_real_smollm2_mask_on_a_three_turn_chat(smollm2_path):
    _, md = mx.load(str(smollm2_path), return_metadata=True)
    real = Tokenizer.from_gguf_metadata(md)
    tokens, mask = encode_chat(real, CHAT3)
    assert loss_runs(real, tokens, mask) == [m["content"] + "<|im_end|>" for m in CHAT3 if m["role"] == "assistant"]
    assert tokens == real.encode(real.render(CHAT3))
    # without a system message SmolLM2's template adds its own; the mask is still exact
    tokens, mask = encode_chat(real, CHAT3[1:])
    assert loss_runs(real, tokens, mask) == [m["content"] + "<|im_end|>" for m in CHAT3 if m["role"] == "assistant"]
