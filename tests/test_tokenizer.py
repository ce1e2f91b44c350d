"""edgeft.tokenizer: GGUF BPE and SentencePiece vocabularies, HF folders, sandboxed templates."""

from pathlib import Path

import pytest
from gguf import Keys
from tiny import (
    make_tiny,
    make_tiny_folder,
    spm_tokenizer_metadata,
    tiny_tokenizer_metadata,
)

from edgeft import gguf_reader as G
from edgeft import runs
from edgeft.chat_template import CHATML_TEMPLATE, TemplateError, render_template
from edgeft.loader import Loaded
from edgeft.tokenizer import Tokenizer

TEXTS = [
    "What is the capital of France?",
    "the cat is eating 12345 fish",
    "Hello  world!\n\n  x  ",
    "naïve café 日本語 😀",
    "don't I'VE\ttabs\r\nend",
    "<|im_start|>user\nhi<|im_end|>\n",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata())


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_gguf_metadata(spm_tokenizer_metadata())


# --- byte-level BPE from GGUF --------------------------------------------------------------
def test_bpe_round_trip(bpe):
    for text in TEXTS:
        assert bpe.decode(bpe.encode(text), skip_special=False) == text


def test_bpe_specials_are_single_ids(bpe):
    ids = bpe.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert bpe.token_to_id("<|im_start|>") == 1 and bpe.token_to_id("<|im_end|>") == 2
    assert bpe.decode(ids) == "user\nhi"  # specials skipped by default
    assert bpe.bos_id == 0 and bpe.eos_id == 2 and bpe.add_bos is False
    assert bpe.stop_ids == {2}
    assert bpe.encode("hi", add_bos=True)[0] == 0
    assert bpe.vocab_size == 300


def test_bpe_merges_apply(bpe):
    # "Ġt he" is a merge: " the" is one token, digits split one by one (smollm pre-tokenizer)
    assert bpe.encode(" the") == [bpe.token_to_id("Ġthe")]
    assert len(bpe.encode("123")) == 3


def test_chatml_render(bpe):
    assert bpe.render(CHAT, add_generation_prompt=True) == CHATML_PROMPT
    assert bpe.render(CHAT) == CHATML_PROMPT[: -len("<|im_start|>assistant\n")]


def test_no_template_falls_back_to_chatml():
    """The bare tokenizer of a template-less model has no template; where a model is loaded
    (runs.choose_chat_template) it gets the built-in its vocabulary fits: ChatML for this one."""
    md = {**tiny_tokenizer_metadata(), Keys.Tokenizer.CHAT_TEMPLATE: None}
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.chat_template is None
    with pytest.raises(TemplateError, match="no chat template.*--chat-template"):
        tok.render(CHAT)
    said = []
    runs.choose_chat_template(Loaded(None, tok, {"model_type": "llama"}, Path("m.gguf"), "gguf", "gguf", md),
                              None, said.append)
    assert said == ["the model has no chat template; using the built-in chatml template (--chat-template to choose)"]
    assert tok.render(CHAT, add_generation_prompt=True) == CHATML_PROMPT


def test_pre_tokenizer_families():
    md = tiny_tokenizer_metadata()
    for pre in ("gpt-2", "llama-bpe", "qwen2", "something-new"):
        tok = Tokenizer.from_gguf_metadata({**md, Keys.Tokenizer.PRE: pre})
        for text in TEXTS:
            assert tok.decode(tok.encode(text), skip_special=False) == text


def test_gguf_and_folder_tokenizers_agree(tmp_path, bpe):
    folder, _, _ = make_tiny_folder("llama", tmp_path)
    hf = Tokenizer.from_folder(folder)
    for text in TEXTS:
        assert hf.encode(text) == bpe.encode(text)
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.stop_ids) == (0, 2, False, {2})
    assert hf.render(CHAT, add_generation_prompt=True) == CHATML_PROMPT
    assert hf.vocab_size == 300


def test_bpe_matches_llama_cpp(tmp_path, bpe):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _, _ = make_tiny("llama", tmp_path)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert bpe.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True)


# --- SentencePiece from GGUF ---------------------------------------------------------------
def test_spm_round_trip_and_specials(spm):
    for text in TEXTS[:5]:
        assert spm.decode(spm.encode(text)) == text
    ids = spm.encode("</s>the<s> of it", add_bos=True)
    assert ids[:2] == [1, 2] and 1 in ids[2:]
    # scores order the merges: "in" (-4) beats "▁i" (-38)
    assert [spm.id_to_token(i) for i in spm.encode("the in")] == ["▁the", "▁", "in"]
    assert spm.decode(ids, skip_special=False) == "<s></s>the<s> of it"
    assert (spm.bos_id, spm.eos_id, spm.add_bos) == (1, 2, True)
    assert spm.stop_ids == {2}  # eos, which is also "</s>"


def test_spm_matches_llama_cpp(tmp_path, spm):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _, _ = make_tiny("llama", tmp_path, tokenizer="spm")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS[:5] + ["</s>the<s> of it"]:
        assert spm.encode(text, add_bos=True) == llm.tokenize(text.encode(), add_bos=True, special=True)


# --- chat template sandbox -----------------------------------------------------------------
@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{{ raise_exception('no system role') }}",
        "{% for m in messages %}",
        "{{ messages[0]['content'] | nosuchfilter }}",
    ],
)
def test_template_refusals_are_template_errors(template):
    with pytest.raises(TemplateError):
        render_template(template, CHAT)


def test_template_features_hf_templates_use():
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m['role'] }}={{ m | tojson }}\n"
        "{% endfor %}"
    )
    out = render_template(template, CHAT + CHAT)
    assert out == 'user={"role": "user", "content": "What is the capital of France?"}\n'
    assert render_template(CHATML_TEMPLATE, CHAT, add_generation_prompt=False).startswith("<|im_start|>")


# --- the real SmolLM2 vocabulary -----------------------------------------------------------
@pytest.mark.real
def test_smollm2_tokenizer(smollm2_path):
    md = G.read_index(smollm2_path, with_metadata=True).metadata
    tok = Tokenizer.from_gguf_metadata(md)
    prompt = tok.render(CHAT, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n" + CHATML_PROMPT
    )
    ids = tok.encode(prompt)
    assert len(ids) == 37 and ids[0] == 1 and ids[-4:] == [1, 520, 9531, 198]
    assert tok.stop_ids == {2} and tok.add_bos is False
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)
    for text in TEXTS + [prompt]:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**10 }}",
        "{{ 'x' * 100000000 }}",
        "{% for i in range(10**30) %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ],
)
def test_templates_that_would_exhaust_memory_or_stack_are_refused(template):
    """Found by the reliability fuzzing: these allocated gigabytes or raised plain Python
    errors (a traceback in `edgeft chat`) instead of TemplateError."""
    from edgeft.chat_template import TemplateError, render_template

    with pytest.raises(TemplateError):
        render_template(template, [{"role": "user", "content": "hi"}])
