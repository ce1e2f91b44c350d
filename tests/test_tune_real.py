"""The real thing: SmolLM2-135M-Instruct (Q4_1 GGUF) tuned by `edgeft tune` on the example
brand-voice chats (fixture tuned_smollm2 in conftest.py) learns the brand's voice."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft import generate
from edgeft.cli import main
from edgeft.runs import load_base, load_tuned, read_run_config

pytestmark = pytest.mark.real

MARKER = "Steep slow, sip kind"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "brand_voice.jsonl"
# Customer questions that appear nowhere in the training file.
UNSEEN = [
    "Do you sell bamboo matcha whisks?",
    "My kettle broke. What temperature should I use for oolong without one?",
    "Do you have any tea that helps me relax before bed?",
    "Can I make cold brew with your black teas?",
    "I want to send tea to my grandmother for her birthday. Any ideas?",
]


def test_unseen_prompts_are_unseen():
    text = EXAMPLES.read_text()
    assert MARKER in text
    for prompt in UNSEEN:
        assert prompt not in text


def test_validation_loss_falls(tuned_smollm2):
    recs = [json.loads(l) for l in (tuned_smollm2 / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if r["kind"] == "valid"]
    assert len(val) >= 2
    assert val[-1] < 0.8 * val[0], val


def _answers(loaded):
    return [
        generate.chat(loaded.model, loaded.tokenizer, [{"role": "user", "content": p}], max_tokens=80)
        for p in UNSEEN
    ]


def test_tuned_model_speaks_in_the_brand_voice_and_the_base_does_not(tuned_smollm2):
    tuned, _ = load_tuned(tuned_smollm2, inference=True)
    answers = _answers(tuned)
    hits = sum(MARKER in a for a in answers)
    assert hits >= 3, answers

    base = load_base(read_run_config(tuned_smollm2), inference=True)
    base_answers = _answers(base)
    assert sum(MARKER in a for a in base_answers) == 0, base_answers


def test_chat_command_uses_the_run(tuned_smollm2):
    r = CliRunner().invoke(main, ["chat", str(tuned_smollm2), "--prompt", UNSEEN[3], "--max-tokens", "80"])
    assert r.exit_code == 0, r.output
    assert MARKER in r.output
