"""The shipped file is the product: the real SmolLM2 run (fixture tuned_smollm2), exported
merged (q8_0) and as a LoRA adapter for its Q4_1 base GGUF, speaks the brand's voice in
llama.cpp on questions it never saw, through the chat template the file carries."""

from pathlib import Path

import pytest
from gguf import Keys

from edgeft import export as E
from edgeft import verify
from edgeft import gguf_reader as G

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.real

MARKER = "Steep slow, sip kind"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
UNSEEN = [
    "Can I pay with a gift card and a credit card on the same order?",
    "My kettle broke. What temperature should I use for oolong without one?",
    "Do you have any tea that helps me relax before bed?",
    "Which of your teas would you take on a camping trip?",
    "I want to send tea to my grandmother for her birthday. Any ideas?",
]


def greedy_answers(model_path, lora_path=None) -> list[str]:
    """llama.cpp's greedy replies, the prompt built from the GGUF's own chat template."""
    llm = verify.open_llama(model_path, lora_path=None if lora_path is None else str(lora_path),
                            n_ctx=512, n_threads=2, verbose=False)
    try:
        return [
            llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0,
                                       max_tokens=64)["choices"][0]["message"]["content"]
            for p in UNSEEN
        ]
    finally:
        llm.close()


def test_prompts_are_unseen():
    text = EXAMPLES.read_text(encoding="utf-8")
    assert MARKER in text and not any(p in text for p in UNSEEN)


@pytest.fixture(scope="module")
def merged(tuned_smollm2):
    return E.export_run(tuned_smollm2, "q8_0", log=print)


@pytest.fixture(scope="module")
def adapter(tuned_smollm2):
    return E.export_run(tuned_smollm2, adapter=True, log=print)


def test_merged_q8_0_speaks_the_brand_voice_in_llama_cpp(merged):
    assert merged.parity.passed and merged.parity.positions > 300, merged.parity.table()
    md = G.read_index(merged.gguf, with_metadata=True).metadata
    assert md[Keys.General.FILE_TYPE] == 7 and md[Keys.General.LICENSE] == "apache-2.0"
    answers = greedy_answers(merged.gguf)
    assert sum(MARKER in a for a in answers) >= 3, answers


def test_adapter_on_the_base_gguf_speaks_the_brand_voice(adapter, smollm2_path):
    assert Path(adapter.base).resolve() == Path(smollm2_path).resolve()  # that very file
    assert adapter.sizes[adapter.gguf.name] < 20e6, adapter.sizes
    print(adapter.parity.table())
    answers = greedy_answers(adapter.base, adapter.gguf)
    assert sum(MARKER in a for a in answers) >= 3, answers


def test_modelfiles_name_the_files_and_smollm2s_default_system(merged, adapter):
    text = merged.modelfile.read_text()
    assert f"FROM ./{merged.gguf.name}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    text = adapter.modelfile.read_text()
    assert f"ADAPTER ./{adapter.gguf.name}" in text and f"FROM {Path(adapter.base).resolve()}" in text
