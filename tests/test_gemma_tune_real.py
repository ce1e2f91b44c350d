"""The real Gemma 3 270M (a pretrained base, Q4_K_M, no chat template) tuned by `edgeft tune`
on the example brand-voice chats (fixture tuned_gemma3 in conftest.py, the default recipe):
the validation loss falls, and llama.cpp, running the merged q8_0 GGUF and the base GGUF with
the adapter GGUF, answers unseen questions with the brand's sign-off where the base never does,
while plain facts the base completes stay completed."""

import json
from pathlib import Path

import pytest
from gguf import Keys
from test_tune_real import (  # the prompts test_tune_real checks are unseen
    MARKER,
    UNSEEN,
)

from edgeft import export as E
from edgeft import verify
from edgeft.chat_template import BUILTINS

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.real

# Plain-text completions (no chat template): what a pretrained base knows.
FACTS = [
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The largest planet in our solar system is", "Jupiter"),
    ("Water boils at a temperature of 100 degrees", "Celsius"),
]


def test_validation_loss_falls(tuned_gemma3):
    recs = [json.loads(l) for l in (tuned_gemma3 / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if r["kind"] == "valid"]
    assert len(val) >= 2 and val[-1] < 0.8 * val[0], val


def _llm(path, lora=None):
    """llama.cpp on `path`; a GGUF without a chat template (the base, and so base + adapter) gets
    the built-in gemma template the run trained with, as `llama-cli --chat-template gemma` would."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = verify.open_llama(path, lora_path=None if lora is None else str(lora), n_ctx=512,
                            n_threads=2, verbose=False)
    if Keys.Tokenizer.CHAT_TEMPLATE not in llm.metadata:
        llm.chat_handler = Jinja2ChatFormatter(BUILTINS["gemma"].text, eos_token="<end_of_turn>",
                                               bos_token="<bos>").to_chat_handler()
    return llm


def chat_answers(path, lora=None) -> list[str]:
    """llama.cpp's greedy replies, the prompt built from the chat template the GGUF carries."""
    llm = _llm(path, lora)
    try:
        return [llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0,
                                           max_tokens=64)["choices"][0]["message"]["content"] for p in UNSEEN]
    finally:
        llm.close()


def completions(path, lora=None) -> list[str]:
    llm = _llm(path, lora)
    try:
        return [llm(prompt, temperature=0.0, max_tokens=8)["choices"][0]["text"] for prompt, _ in FACTS]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def merged(tuned_gemma3):
    """The q8_0 GGUF the run exported at its end."""
    return tuned_gemma3 / "export" / "gemma-q8_0.gguf"


@pytest.fixture(scope="module")
def adapter(tuned_gemma3):
    return E.export_run(tuned_gemma3, adapter=True, log=print)


def test_base_never_signs_off(gemma3_path):
    answers = chat_answers(gemma3_path)
    assert sum(MARKER in a for a in answers) == 0, answers


def test_merged_q8_0_signs_off_in_llama_cpp(merged):
    answers = chat_answers(merged)
    assert sum(MARKER in a for a in answers) >= 4, answers


def test_adapter_on_the_base_gguf_signs_off_in_llama_cpp(adapter, gemma3_path):
    assert Path(adapter.base).resolve() == Path(gemma3_path).resolve()
    print(adapter.parity.table())
    answers = chat_answers(adapter.base, adapter.gguf)
    assert sum(MARKER in a for a in answers) >= 4, answers


def test_facts_the_base_completes_stay_completed(gemma3_path, merged):
    base = completions(gemma3_path)
    known = [i for i, (_, want) in enumerate(FACTS) if want in base[i]]
    assert len(known) >= 3, base
    tuned = completions(merged)
    kept = [i for i in known if FACTS[i][1] in tuned[i]]
    assert kept == known, (base, tuned)
