"""The built-in chat templates, --chat-template, the default for a template-less model, and
its end-of-turn token as the stop in training, generation, the exported GGUF and the
Modelfile; llama.cpp formats chats for the export as edgeft trained on them."""

import ctypes
import json

import pytest
from click.testing import CliRunner
from gguf import Keys, TokenType
from test_cli import write_chats
from tiny import (
    MERGES,
    gguf_config,
    gguf_tensors,
    make_tiny,
    make_tiny_folder,
    tiny_config,
    tiny_tokens,
    tiny_weights,
    write_gguf,
)

from edgeft import generate, runs, verify
from edgeft import gguf_reader as G
from edgeft import modelfile as MF
from edgeft.chat_encode import encode_chat
from edgeft.chat_template import (
    BUILTINS,
    TemplateError,
    default_builtin,
    read_template,
    render_template,
)
from edgeft.cli import main
from edgeft.config import ConfigError
from edgeft.export import model_metadata
from edgeft.flags import build_config, resume_config

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tea?"},
]
# Each built-in on CHAT with the generation prompt, BOS "<s>" and EOS "</s>" given as text.
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nTea?<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nTea?<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nTea?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] Tea?[/INST]",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nTea?<|end|>\n"
            "<|assistant|>\n",
}


def test_each_builtin_renders_its_format():
    assert sorted(BUILTINS) == sorted(EXPECTED)
    for name, want in EXPECTED.items():
        got = render_template(BUILTINS[name].text, CHAT, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
        assert got == want, name
    # without the generation prompt, Phi-3 closes the chat with EOS (as its Hugging Face template)
    assert render_template(BUILTINS["phi3"].text, CHAT[:3], eos_token="</s>").endswith("Hello!<|end|>\n</s>")


@pytest.mark.parametrize("name", ["gemma", "mistral", "phi3"])
def test_formats_without_tool_turns_refuse_them_clearly(name):
    chat = [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]
    with pytest.raises(TemplateError, match=f"built-in {name} chat template has no tool turns"):
        render_template(BUILTINS[name].text, chat, bos_token="", eos_token="")


def _cpp_apply(template: str, messages, llama_cpp) -> str:
    """llama.cpp's own rendering: it detects the format from the template's text."""
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), True, buf, len(buf))
    assert 0 <= n < len(buf)
    return buf.raw[:n].decode()


def test_llama_cpp_recognizes_each_builtin():
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, want in EXPECTED.items():
        assert _cpp_apply(BUILTINS[name].text, CHAT, llama_cpp) == want.removeprefix("<s>"), name


def test_the_default_follows_the_family_then_the_vocabulary():
    def vocab(*tokens):
        return lambda t: t in tokens

    every = vocab("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>",
                  "<|end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "</s>")
    assert default_builtin("gemma3", every).name == "gemma"
    assert default_builtin("gemma2", every).name == "gemma"
    assert default_builtin("phi3", every).name == "phi3"
    assert default_builtin("llama", every).name == "llama3"
    assert default_builtin("qwen2", vocab("<|im_start|>", "<|im_end|>")).name == "chatml"
    assert default_builtin("gemma3", vocab("<|im_start|>", "<|im_end|>")).name == "chatml"  # vocabulary first
    assert default_builtin("llama", vocab("[INST]", "[/INST]", "</s>")).name == "mistral"
    assert default_builtin("llama", vocab("<s>", "</s>")) is None


def test_unknown_names_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(TemplateError) as e:
        read_template("gemma4")
    assert str(e.value) == ("chat template 'gemma4': no such built-in template or file; the built-in ones "
                            "are chatml, gemma, llama3, mistral, phi3, or give a FILE.jinja")
    with pytest.raises(TemplateError, match=r"'nope.jinja': no such file; the built-in ones are chatml, gemma"):
        read_template("nope.jinja")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_template(str(tmp_path / "t.jinja")) == ("{{ messages[0]['content'] }}", None)
    assert read_template("llama3") == (BUILTINS["llama3"].text, "<|eot_id|>")


# --- a template-less base whose vocabulary is Gemma's ----------------------------------------
GEMMA_SPECIALS = ("<bos>", "<start_of_turn>", "<end_of_turn>")
BOS, START, EOT, EOS = 0, 1, 2, 299


def gemma_vocab_metadata() -> dict:
    """The tiny BPE with <bos> <start_of_turn> <end_of_turn> for its three specials and <eos>
    for its last merge (Gemma's specials), add_bos on, no chat template."""
    tokens = list(GEMMA_SPECIALS) + tiny_tokens()[3:-1] + ["<eos>"]
    types = [TokenType.NORMAL] * len(tokens)
    for i in (BOS, START, EOT, EOS):
        types[i] = TokenType.CONTROL
    return {Keys.Tokenizer.LIST: tokens, Keys.Tokenizer.TOKEN_TYPE: types, Keys.Tokenizer.MERGES: list(MERGES[:-1]),
            Keys.Tokenizer.BOS_ID: BOS, Keys.Tokenizer.EOS_ID: EOS, Keys.Tokenizer.PAD_ID: BOS,
            Keys.Tokenizer.ADD_BOS: True, Keys.Tokenizer.CHAT_TEMPLATE: None}


@pytest.fixture()
def gemma_base(tmp_path):
    cfg = gguf_config(tiny_config("llama", tie=False))
    path = tmp_path / "gemma-vocab.gguf"
    write_gguf(path, cfg, gguf_tensors(cfg, tiny_weights(tiny_config("llama", tie=False))), "q8_0",
               extra_metadata=gemma_vocab_metadata())
    return path


def tune(home, *args):
    return CliRunner().invoke(main, ["tune", "--data", str(write_chats(home / "chats.jsonl")), "--runs-dir",
                                     str(home / "runs"), "--steps", "2", "--batch-size", "2", "--eval-every", "0",
                                     "--save-every", "0", "--no-eval", *args])


def test_the_end_of_turn_token_is_trained_and_stops_generation(gemma_base):
    tok = runs.load_model(gemma_base, tokenizer_only=True).tokenizer
    assert tok.chat_template_name == "gemma" and tok.end_of_turn_id == EOT and EOT in tok.stop_ids
    ids, mask = encode_chat(tok, CHAT[1:3])
    trained = [i for i, m in zip(ids, mask) if m]
    assert ids[0] == BOS and ids.count(BOS) == 1  # the template's BOS, not a second one
    assert trained[-1] == EOT and tok.decode(trained[:-1]) == "Hello!"
    assert ids[: len(generate.prompt_ids(tok, CHAT[1:2]))] == generate.prompt_ids(tok, CHAT[1:2])


def test_a_template_less_base_tunes_and_exports_what_it_trained(home, gemma_base):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    r = tune(home, "--model", str(gemma_base), "--name", "g")
    assert r.exit_code == 0, r.output
    line = "the model has no chat template; using the built-in gemma template (--chat-template to choose)"
    assert r.output.splitlines()[0] == line and r.output.count(line) == 1
    run = home / "runs" / "g"
    # the default is recorded, so export, chat and eval of the run keep it whatever the rule becomes
    assert json.loads((run / "config.json").read_text())["data"]["chat_template"] == "gemma"
    gguf = run / "export" / "g-q8_0.gguf"
    md = G.read_index(gguf, with_metadata=True).metadata
    assert G.scalar(md[Keys.Tokenizer.CHAT_TEMPLATE]) == BUILTINS["gemma"].text
    assert G.scalar(md[Keys.Tokenizer.EOS_ID]) == G.scalar(md[Keys.Tokenizer.EOT_ID]) == EOT
    modelfile = (run / "export" / "g-q8_0.Modelfile").read_text()
    assert f'TEMPLATE """{MF.GO_TEMPLATES[MF.GEMMA]}"""' in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile

    tok = runs.load_tuned(run)[0].tokenizer
    llm = verify.open_llama(gguf, n_ctx=256, verbose=False)
    try:
        assert llm.token_eos() == EOT and llm.chat_format == "chat_template.default"
        for chat in (CHAT[1:2], CHAT, CHAT[1:4]):
            want = generate.prompt_ids(tok, chat)  # what edgeft chat and eval feed the model
            trained = encode_chat(tok, [*chat, {"role": "assistant", "content": "Sure."}])[0]
            assert trained[: len(want)] == want and trained[len(want):] == tok.encode("Sure.<end_of_turn>\n")
            # llama-cpp-python's chat completion: the GGUF's template in Jinja, BOS from it
            fmt = Jinja2ChatFormatter(llm.metadata[Keys.Tokenizer.CHAT_TEMPLATE], eos_token="<end_of_turn>",
                                      bos_token="<bos>", add_generation_prompt=True)(messages=chat)
            assert llm.tokenize(fmt.prompt.encode(), add_bos=not fmt.added_special, special=True) == want
            # llama.cpp's own (llama-cli, llama-server without --jinja): the format it detects
            text = _cpp_apply(llama_cpp.llama_model_chat_template(llm.model, None).decode(), chat, llama_cpp)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
        out = llm.create_chat_completion(CHAT[1:2], max_tokens=1)
        assert out["usage"]["prompt_tokens"] == len(generate.prompt_ids(tok, CHAT[1:2]))
    finally:
        llm.close()


def test_chat_template_flag_errors_are_one_line_and_leave_nothing(home, gemma_base):
    for value, why in (("gemma4", "'gemma4': no such built-in template or file; the built-in ones are chatml, gemma"),
                       ("mine.jinja", "'mine.jinja': no such file"),
                       ("chatml", "it ends assistant turns with <|im_end|>, which is not a token of")):
        r = tune(home, "--model", str(gemma_base), "--name", "x", "--chat-template", value)
        assert r.exit_code != 0 and r.output.count("\n") == 1 and why in r.output, r.output
        assert not (home / "runs" / "x").exists()
    r = CliRunner().invoke(main, ["data", "check", str(home / "chats.jsonl"), "--model", str(gemma_base),
                                  "--chat-template", "gemma4"])
    assert r.exit_code != 0 and "no such built-in template or file" in r.output


def test_a_template_file_is_recorded_and_used_by_the_run(home, gemma_base):
    (home / "turns.jinja").write_text(
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    r = tune(home, "--model", str(gemma_base), "--name", "f", "--chat-template", "turns.jinja", "--no-export")
    assert r.exit_code == 0, r.output
    assert "no chat template" not in r.output
    cfg = runs.read_run_config(home / "runs" / "f")
    assert cfg.data.chat_template == str((home / "turns.jinja").resolve())  # found from any folder
    tok = runs.load_base(cfg).tokenizer
    assert tok.chat_template_name == cfg.data.chat_template and tok.end_of_turn_id == EOT
    assert tok.render(CHAT[1:2], add_generation_prompt=True) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>assistant\n"
    with pytest.raises(ConfigError, match="a resumed run keeps its data.chat_template"):
        resume_config(cfg, None, None, {"chat_template": "gemma"})
    assert build_config(None, None, {"chat_template": "gemma"}).data.chat_template == "gemma"


def test_export_metadata_carries_a_chosen_template_and_keeps_a_base_own(tmp_path):
    folder, _, _ = make_tiny_folder("qwen2", tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    said = []
    loaded = runs.load_model(folder, tokenizer_only=True, log=said.append)
    assert said == ["the model has no chat template; using the built-in chatml template (--chat-template to choose)"]
    md = model_metadata(loaded, "r", "q8_0", log=said.append)
    assert md[Keys.Tokenizer.CHAT_TEMPLATE] == BUILTINS["chatml"].text
    assert int(md[Keys.Tokenizer.EOS_ID]) == int(md[Keys.Tokenizer.EOT_ID]) == 2  # <|im_end|>
    own = runs.load_model(make_tiny("llama", tmp_path)[0], tokenizer_only=True)
    md = model_metadata(own, "r", "q8_0", log=said.append)
    assert Keys.Tokenizer.EOT_ID not in md and own.tokenizer.chat_template_name is None
