"""edgeft.export / verify / modelfile on tiny random models, checked by llama.cpp itself.

Every parity figure here comes from running the exported file in llama.cpp (llama-cpp-python):
a test that reads edgeft's file back with edgeft cannot catch a wrong convention (FACTS).
The tiny models are untied (tie=False): with tied embeddings a tiny random model mostly
predicts its input token, and the LoRA would hardly move the top-1 tokens the tests compare.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import Keys
from tiny import ARCHS, make_tiny, make_tiny_folder

from edgeft import backend, lora
from edgeft import export as E
from edgeft import gguf_reader as G
from edgeft import modelfile as MF
from edgeft import verify as V
from edgeft.chat_template import BUILTINS, CHATML_TEMPLATE, render_template
from edgeft.config import RunConfig
from edgeft.gguf_writer import write_gguf
from edgeft.loader import load
from edgeft.runs import load_tuned

llama_cpp = pytest.importorskip("llama_cpp")

LORA_SCALE = 0.1  # random adapter entries: large enough to move most top-1 tokens


def make_run(base, runs, name, *, rank=4, alpha=8.0, seed=1, system_prompt=None):
    """A run folder as `edgeft tune` leaves it (config.json + adapters/), with random,
    non-zero LoRA values instead of trained ones."""
    cfg = RunConfig()
    cfg.model.name = str(base)
    cfg.lora.rank, cfg.lora.alpha = rank, alpha
    cfg.data.system_prompt = system_prompt
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = load(base)
    backend.prepare(loaded.model)
    lora.apply_lora(loaded.model, cfg.lora)
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(loaded.model):
        for part in ("lora_a", "lora_b"):
            setattr(layer, part, mx.array(LORA_SCALE * rng.standard_normal(getattr(layer, part).shape).astype(np.float32)))
    lora.save_adapters(loaded.model, run_dir / "adapters", lora.adapter_config(loaded.model, cfg.lora, str(base)))
    return run_dir


def llama_cpp_top1(path, ids_list, lora_path=None):
    return np.concatenate([s.argmax(-1) for s in V.llama_cpp_logits(path, ids_list, lora_path)])


def quiet(_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per architecture on a GGUF base, plus a llama run on an HF folder base."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ARCHS:
        base, _, _ = make_tiny(arch, root, tie=False)
        out[arch] = make_run(base, root / "runs", f"tiny-{arch}")
    folder, _, _ = make_tiny_folder("llama", root, tie=False)
    out["llama-hf"] = make_run(folder, root / "runs", "tiny-llama-hf")
    return out


@pytest.mark.parametrize("which", [*ARCHS, "llama-hf"])
def test_merged_and_adapter_run_in_llama_cpp_like_mlx(runs, which):
    """f16 and q8_0 merged files pass their parity bars in llama.cpp; the adapter applied to
    the base GGUF gives the merged f16 file's top-1 tokens; the LoRA really moves them."""
    run_dir = runs[which]
    results = {q: E.export_run(run_dir, q, log=quiet) for q in ("f16", "q8_0")}
    for q, bar in (("f16", 0.99), ("q8_0", 0.95)):
        p = results[q].parity
        assert p.top1 >= bar and p.positions > 400, p.table()
        assert results[q].gguf.is_file() and results[q].modelfile.is_file()
    assert results["f16"].parity.max_abs < 0.05, results["f16"].parity.table()

    ad = E.export_run(run_dir, "f16", adapter=True, log=quiet)
    assert ad.parity.top1 >= 0.99 and ad.parity.max_abs < 0.05, ad.parity.table()
    if which == "llama-hf":
        assert ad.base.name == "tiny-llama-hf-base-f16.gguf"  # a folder base is exported beside it

    loaded, _ = load_tuned(run_dir)
    ids = V.prompt_ids(loaded.tokenizer)
    merged = llama_cpp_top1(results["f16"].gguf, ids)
    applied = llama_cpp_top1(ad.base, ids, ad.gguf)
    base_only = llama_cpp_top1(ad.base, ids)
    assert (applied == merged).mean() >= 0.99
    assert (base_only == merged).mean() < 0.8  # the adapter is what makes them agree



def test_a_tuned_model_with_dropout_answers_without_it(tmp_path):
    """load_tuned (what export, verify and chat compare with) is in eval mode: a run trained
    with LoRA dropout gives the same logits every time, those of the adapters without it."""
    base, _, _ = make_tiny("llama", tmp_path, tie=False)
    run_dir = make_run(base, tmp_path / "runs", "dropout")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["lora"]["dropout"] = 0.3
    (run_dir / "config.json").write_text(json.dumps(cfg))
    adapter_cfg = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    adapter_cfg["lora_parameters"]["dropout"] = 0.3
    (run_dir / "adapters" / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    loaded, _ = load_tuned(run_dir)
    assert all(isinstance(layer.dropout, nn.Dropout) for _, layer in lora.lora_layers(loaded.model))
    x = mx.array([V.prompt_ids(loaded.tokenizer)[0]])
    first, second = loaded.model(x), loaded.model(x)
    loaded.model.train()
    dropped = loaded.model(x)
    assert mx.array_equal(first, second)
    assert not mx.allclose(first, dropped)  # dropout would have changed them

def test_sentencepiece_base_with_bos(tmp_path):
    """An SPM vocabulary whose tokenizer adds BOS: the export keeps scores/types/add_bos and
    the chats are fed with their BOS, as training fed them."""
    base, _, _ = make_tiny("llama", tmp_path, tie=False, tokenizer="spm")
    r = E.export_run(make_run(base, tmp_path / "runs", "spm"), "f16", log=quiet)
    assert r.parity.top1 >= 0.99 and r.parity.max_abs < 0.05, r.parity.table()
    md = G.read_index(r.gguf, with_metadata=True).metadata
    assert md[Keys.Tokenizer.MODEL] == "llama" and bool(md[Keys.Tokenizer.ADD_BOS]) and len(md[Keys.Tokenizer.SCORES]) == 300
    tok = load(r.gguf, tokenizer_only=True).tokenizer
    assert all(ids[0] == tok.bos_id for ids in V.prompt_ids(tok))


def test_wrong_qk_order_would_be_caught(runs, tmp_path):
    """Guards the test above: an adapter whose Q/K lora_b rows are permuted once too often
    (a GGUF base treated as HF-ordered) visibly disagrees in llama.cpp."""
    loaded, _ = load_tuned(runs["llama"])
    specs, alpha = E.adapter_tensors(loaded.model, loaded.config, "hf")  # wrong: base is "gguf"
    path = tmp_path / "wrong.gguf"
    write_gguf(path, "llama", E.adapter_metadata(loaded, "wrong", alpha), specs, "f32")
    p = V.compare(loaded.path, loaded.model, loaded.tokenizer, lora=path)
    assert p.max_abs > 0.5, p.table()


def test_adapter_file_follows_llama_cpp_conventions(runs):
    ad = E.export_run(runs["qwen2"], "f16", adapter=True, verify=False, log=quiet)
    index = G.read_index(ad.gguf, with_metadata=True)
    md = index.metadata
    assert (md["general.type"], md["adapter.type"], md[Keys.General.ARCHITECTURE]) == ("adapter", "lora", "qwen2")
    assert md["adapter.lora.alpha"] == pytest.approx(8.0)  # edgeft scale 2.0 * rank 4
    base = {t.name: t.shape for t in G.read_index(ad.base).tensors}
    shapes = {t.name: t.shape for t in index.tensors}
    assert len(shapes) == 2 * 2 * 7  # 2 layers x 7 projections x (a, b)
    for name, (n_in, rank) in ((n, s) for n, s in shapes.items() if n.endswith(".lora_a")):
        target = name.removesuffix(".lora_a")
        b_rank, n_out = shapes[f"{target}.lora_b"]
        assert base[target] == (n_in, n_out) and rank == b_rank == 4  # ggml ne order


@pytest.mark.parametrize("quant", ["bf16", "q4_0", "q4_1", "q4_k_m"])
def test_other_quants_report_parity(tmp_path, quant):
    """bf16 must pass 99%; 4-bit types only report (and warn). K-quants need rows of 256."""
    wide = dict(hidden_size=256, intermediate_size=512) if quant == "q4_k_m" else {}
    base, _, _ = make_tiny("qwen3", tmp_path, tie=False, **wide)
    run_dir = make_run(base, tmp_path / "runs", "wide")
    logs = []
    r = E.export_run(run_dir, quant, log=logs.append)
    assert r.gguf.name == f"wide-{quant}.gguf" and r.parity is not None
    types = G.read_index(r.gguf).type_names()
    if quant == "bf16":
        assert r.parity.top1 >= 0.99 and types == {"F32", "BF16"}
    elif quant == "q4_k_m":
        assert "Q4_K" in types and "writing f16 intermediate" in logs[0]
        assert not list(r.gguf.parent.glob(".*"))  # the intermediate is gone
    else:
        assert types == {"F32", quant.upper(), "Q8_0"}  # embedding and output stay 8-bit
        infos = {t.name: G.ggml_type_name(t.ggml_type) for t in G.read_index(r.gguf).tensors}
        assert infos["token_embd.weight"] == infos["output.weight"] == "Q8_0"
    assert r.parity.top1 > 0.5, r.parity.table()


def test_failed_verification_leaves_nothing(runs, monkeypatch):
    """Below the bar: ExportError, and neither the GGUF nor a temporary file remains."""
    monkeypatch.setitem(V.THRESHOLDS, V.Q8, (1.01, True))
    out = runs["qwen3"] / "export" / "strict.gguf"
    with pytest.raises(E.ExportError, match="below 101%"):
        E.export_run(runs["qwen3"], "q8_0", out=out, log=quiet)
    assert not out.exists() and not list(out.parent.glob(".strict*"))



def test_the_modelfile_carries_the_runs_generation_settings(tmp_path):
    base, _, _ = make_tiny("llama", tmp_path, tie=False)
    run_dir = make_run(base, tmp_path / "runs", "gen")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["generate"] = {"max_tokens": 77, "repeat_penalty": 1.3, "repeat_last_n": 32}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    for adapter in (False, True):
        r = E.export_run(run_dir, "f16", adapter=adapter, verify=False, log=quiet)
        mf = r.modelfile.read_text()
        assert "PARAMETER repeat_penalty 1.3" in mf and "PARAMETER repeat_last_n 32" in mf
        assert "PARAMETER num_predict 77" in mf

def test_without_llama_cpp_export_still_works(runs, monkeypatch):
    """Without llama-cpp-python: non-K types export unverified and say how to verify."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    logs = []
    r = E.export_run(runs["qwen2"], "q8_0", out=runs["qwen2"] / "x.gguf", log=logs.append)
    assert r.parity is None and r.gguf.is_file()
    assert any("pip install 'edgeft[llama]'" in line for line in logs)
    with pytest.raises(V.LlamaCppMissing, match=r"pip install 'edgeft\[llama\]'"):
        E.export_run(runs["qwen2"], "q4_k_m", log=quiet)


def test_exported_files_get_the_mode_a_plain_write_would(runs):
    """The temporary file is private while written; the shipped GGUF and Modelfile are not
    (Ollama's server reads them as its own user)."""
    old = os.umask(0o022)
    try:
        r = E.export_run(runs["qwen2"], "f16", out=runs["qwen2"] / "modes" / "m.gguf", verify=False, log=quiet)
    finally:
        os.umask(old)
    for f in (r.gguf, E.modelfile_path(r.gguf)):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- metadata ---------------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, (list, np.ndarray)) or isinstance(b, (list, np.ndarray)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (float, np.floating)) or isinstance(b, (float, np.floating)):
        return np.float32(a) == np.float32(b)
    return G.scalar(a) == G.scalar(b)


@pytest.mark.parametrize("which", ["llama", "llama-hf"])
def test_metadata_round_trip_and_reimport(runs, which):
    """What edgeft reads from its GGUF equals what it wrote, key by key, and the file is a
    valid training base again (edgeft.loader.load) computing the merged model."""
    run_dir = runs[which]
    loaded, cfg = load_tuned(run_dir)
    md = E.model_metadata(loaded, run_dir.name, "f16", log=quiet)
    r = E.export_run(run_dir, "f16", out=run_dir / "rt.gguf", verify=False, log=quiet)
    got = G.read_index(r.gguf, with_metadata=True).metadata
    assert set(got) == set(md)
    for key, value in md.items():
        assert _same(got[key], value), key
        assert type(G.scalar(got[key])) is type(G.scalar(value)) or isinstance(value, (list, np.ndarray)), key
    if which == "llama":
        base = loaded.gguf_metadata
        changed = {k for k in base if k not in got or not _same(got[k], base[k])}
        assert Keys.General.NAME in changed  # the tiny base has no file type or fine-tune label
        assert changed <= {Keys.General.NAME, Keys.General.FINETUNE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
    assert got[Keys.General.FINETUNE] == run_dir.name and got[Keys.General.FILE_TYPE] == 1

    again = load(r.gguf)
    assert again.qk_layout == "gguf" and again.config["tie_word_embeddings"] is False
    lora.merge(loaded.model)
    ids = V.prompt_ids(loaded.tokenizer)[0]
    assert again.tokenizer.encode("hello <|im_end|>") == loaded.tokenizer.encode("hello <|im_end|>")
    np.testing.assert_allclose(V.mlx_logits(again.model, ids), V.mlx_logits(loaded.model, ids), atol=0.05)


def test_system_prompt_becomes_the_default(tmp_path):
    base, _, _ = make_tiny("qwen2", tmp_path, tie=False)
    run_dir = make_run(base, tmp_path / "runs", "sys", system_prompt='Be "brief".\nAlways.')
    r = E.export_run(run_dir, "q8_0", log=quiet)
    md = G.read_index(r.gguf, with_metadata=True).metadata
    user = [{"role": "user", "content": "hi"}]
    text = render_template(md[Keys.Tokenizer.CHAT_TEMPLATE], user, add_generation_prompt=True)
    assert text.startswith('<|im_start|>system\nBe "brief".\nAlways.<|im_end|>\n<|im_start|>user\nhi')
    from llama_cpp.llama_chat_format import (
        Jinja2ChatFormatter,  # what llama-cpp-python runs
    )

    lcp = Jinja2ChatFormatter(md[Keys.Tokenizer.CHAT_TEMPLATE], eos_token="<|im_end|>", bos_token="<|endoftext|>")
    assert lcp(messages=user).prompt == text
    own = [{"role": "system", "content": "Mine."}, *user]
    assert render_template(md[Keys.Tokenizer.CHAT_TEMPLATE], own).startswith("<|im_start|>system\nMine.<|im_end|>")
    mf = r.modelfile.read_text()
    assert 'SYSTEM """Be "brief".\nAlways."""' in mf and "FROM ./sys-q8_0.gguf" in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf


# --- Ollama templates -------------------------------------------------------------------------
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# template, family, BOS text (stripped: llama.cpp adds it), EOS text
FAMILIES = [
    (CHATML_TEMPLATE, MF.CHATML, "", "<|im_end|>"),
    (SMOLLM2, MF.CHATML, "", "<|im_end|>"),
    (MF.with_default_system(CHATML_TEMPLATE, "Steep slow."), MF.CHATML, "", "<|im_end|>"),
    (LLAMA3, MF.LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    (LLAMA2, MF.LLAMA2, "<s>", "</s>"),
    (MISTRAL, MF.MISTRAL, "<s>", "</s>"),
    *[(BUILTINS[name].text, family, bos, eos) for name, family, bos, eos in (
        ("chatml", MF.CHATML, "", "<|im_end|>"), ("llama3", MF.LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        ("gemma", MF.GEMMA, "<bos>", "<eos>"), ("phi3", MF.PHI3, "", "<|endoftext|>"),
        ("mistral", MF.MISTRAL_V3, "<s>", "</s>"))],
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tea?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
GO_RENDER = """package main
import ("encoding/json"; "os"; "strings"; "text/template")
type Msg struct { Role string; Content string }
type Case struct { Template string; System string; Messages []Msg }
func main() {
  var cases []Case
  if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil { panic(err) }
  out := []string{}
  for _, c := range cases {
    t := template.Must(template.New("").Parse(c.Template))
    var b strings.Builder
    if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil { panic(err) }
    out = append(out, b.String())
  }
  json.NewEncoder(os.Stdout).Encode(out)
}
"""


def test_family_detection_and_default_system():
    for template, family, _, _ in FAMILIES:
        assert MF.detect_family(template) == family
    assert MF.default_system(SMOLLM2, MF.CHATML).startswith("You are a helpful AI assistant named SmolLM")
    assert MF.default_system(CHATML_TEMPLATE, MF.CHATML) is None
    assert MF.supports_system(LLAMA2) and not MF.supports_system(MISTRAL)
    mf = MF.build("./m.gguf", LLAMA3, None, ["<|eot_id|>"], adapter="./a.gguf").text
    assert mf.splitlines()[:2] == ["FROM ./m.gguf", "ADAPTER ./a.gguf"]
    assert mf.count('PARAMETER stop "<|eot_id|>"') == 1


@pytest.mark.skipif(shutil.which("go") is None, reason="Go (apt install golang-go) renders Ollama's templates")
def test_ollama_templates_render_like_the_jinja_templates(tmp_path):
    """Go's text/template (what Ollama runs) on the Modelfile's TEMPLATE gives the Jinja
    template's text, BOS aside, with Ollama's inputs: .System is the chat's system message or
    the Modelfile's SYSTEM, .Messages the whole chat."""
    cases, want = [], []
    for template, family, bos, eos in FAMILIES:
        default = MF.default_system(template, family)
        if family == MF.CHATML and template.startswith("{%- if not messages"):
            default = "Steep slow."
        for chat in CHATS:
            if not MF.supports_system(template) and chat[0]["role"] == "system":
                continue
            system = "\n\n".join(m["content"] for m in chat if m["role"] == "system") or default or ""
            text = render_template(template, chat, add_generation_prompt=True, bos_token=bos, eos_token=eos)
            want.append(text.removeprefix(bos))
            cases.append({"Template": MF.GO_TEMPLATES[family], "System": system,
                          "Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]})
    (tmp_path / "render.go").write_text(GO_RENDER)
    env = {"GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "GO111MODULE": "off"}
    done = subprocess.run(["go", "run", str(tmp_path / "render.go")], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert len(got) == len(want) > 15
    for g, w, c in zip(got, want, cases):
        assert g == w, (c["Template"][:30], c["Messages"])


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_export_and_verify(runs):
    from edgeft.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["export", str(runs["qwen3"]), "--quant", "q8_0"])
    assert res.exit_code == 0, res.output
    assert "top-1" in res.output and "ollama create" in res.output
    gguf = runs["qwen3"] / "export" / "tiny-qwen3-q8_0.gguf"
    res = runner.invoke(main, ["verify", str(gguf)])  # finds its run from where it lies
    assert res.exit_code == 0, res.output
    assert "ok: top-1 agreement" in res.output
    adapter = E.export_run(runs["qwen3"], adapter=True, verify=False, log=quiet).gguf
    res = runner.invoke(main, ["verify", str(adapter)])
    assert res.exit_code == 0 and "tiny-qwen3-lora.gguf" in res.output, res.output
    res = runner.invoke(main, ["export", str(runs["qwen3"]), "--quant", "q3"])
    assert res.exit_code != 0 and "unknown --quant" in res.output


def test_near_ties_forgive_only_flips_within_a_hundredth_of_the_logit_range():
    ours = np.array([[10.0, 9.95, 0.0, -10.0],   # range 20: a 0.05 gap is a near-tie (<= 0.2)
                     [10.0, 9.0, 0.0, -10.0],    # a 1-logit gap is not
                     [1.0, 0.0, 3.0, -1.0]])     # exact agreement counts too
    theirs = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert V.near_ties(ours, theirs) == 2
    p = V.Parity("x.gguf", V.Q8, rows=[V.Row("1", 3, 1, 0.5, agree_near=2)])
    assert p.top1 == pytest.approx(1 / 3) and p.top1_near == pytest.approx(2 / 3) and not p.passed
