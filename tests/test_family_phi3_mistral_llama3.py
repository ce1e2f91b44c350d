"""phi3, mistral and llama 3.x (llama3 RoPE scaling, tied embeddings): in from a Hugging Face
folder, out as merged f16/q8_0 GGUF and as a LoRA adapter GGUF, each judged by llama.cpp.

Every case is a tiny random model (2 layers, width 64) written as an HF folder:
- phi3: fused qkv_proj / gate_up_proj, neox RoPE (no Q/K permutation), GQA;
- phi3-longrope: Phi-3.5-mini's LongRoPE (long/short factors, attention factor);
- mistral-swa: a sliding window of 16 tokens, shorter than every prompt compared: llama.cpp
  (arch llama) and mlx-lm (no layer_types) both ignore it, and agree beyond it;
- llama3.2: llama3 RoPE scaling (rope_freqs.weight) and tied embeddings.
The "wrong convention" tests write a file with one convention broken and show llama.cpp
then disagrees, so the passing tests would catch that mistake.
"""

import json
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import Keys
from mlx_lm.utils import load_model
from test_export import make_run, quiet
from test_trainer import batches_from, four_examples
from tiny import build_model, make_tiny_folder, tiny_config

from edgeft import backend, lora, trainer
from edgeft import export as E
from edgeft import families as F
from edgeft import gguf_reader as G
from edgeft import rope_scaling as R
from edgeft import verify as V
from edgeft.config import LoRAConfig, TrainConfig
from edgeft.gguf_reader import ModelLoadError
from edgeft.gguf_writer import TensorSpec, write_gguf
from edgeft.loader import load
from edgeft.loss import evaluate
from edgeft.runs import load_tuned

llama_cpp = pytest.importorskip("llama_cpp")

SHORT = [1.0, 1.0625, 1.125, 1.25, 1.5, 1.75, 2.0, 2.5]  # head_dim 16: 8 factors, exact in f32
LONG = [1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 32.0]
LONGROPE = dict(max_position_embeddings=131072, original_max_position_embeddings=4096,
                rope_scaling={"type": "longrope", "long_factor": LONG, "short_factor": SHORT})
LLAMA3 = dict(max_position_embeddings=131072, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})
# case -> (HF model_type, tied embeddings, config overrides)
CASES = {
    "phi3": ("phi3", False, {}),
    "phi3-longrope": ("phi3", False, LONGROPE),
    "mistral-swa": ("mistral", False, {"sliding_window": 16}),
    "llama3.2": ("llama", True, LLAMA3),
}
POSITIONS = 300


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """case -> (HF folder, run folder with random LoRA values)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for case, (arch, tie, overrides) in CASES.items():
        folder, _, _ = make_tiny_folder(arch, root / case, tie=tie, **overrides)
        # llama.cpp gives the tokens </s> <unk> <s> of a model whose general.name says phi3 or
        # phi-3 special attributes, and fails on a vocabulary without them (ours): no such names
        name = case.replace("phi3", "phi")
        folder = folder.rename(folder.with_name(f"tiny-{name}-hf"))
        out[case] = folder, make_run(folder, root / "runs", name)
    return out


def logits(model, ids=(5, 60, 70, 80, 90, 100, 3, 4, 200, 250, 17, 42)):
    return np.array(model(mx.array([list(ids)])).astype(mx.float32))[0]


@pytest.mark.parametrize("case", CASES)
def test_folder_loads_as_mlx_lm_loads_it(cases, case, tmp_path):
    """edgeft's model of the folder is mlx-lm's own. LongRoPE: mlx-lm applies the long factors
    at every length; edgeft applies the short ones, as HF and llama.cpp do within the
    original context, i.e. mlx-lm's model of the folder with the short factors as its long."""
    folder, _ = cases[case]
    ours = logits(load(folder).model)
    theirs = logits(load_model(folder)[0])
    if case != "phi3-longrope":
        np.testing.assert_array_equal(ours, theirs)
        return
    assert np.abs(ours - theirs).max() > 0.01  # mlx-lm's long factors compute another function
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    config = json.loads((short / "config.json").read_text())
    config["rope_scaling"]["long_factor"] = SHORT
    (short / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(ours, logits(load_model(short)[0]))


@pytest.mark.parametrize("case", CASES)
def test_merged_and_adapter_gguf_run_in_llama_cpp_like_mlx(cases, case, capsys):
    """f16 >= 99% and q8_0 >= 95% top-1 agreement with MLX over >= 300 positions; the adapter on
    the base GGUF gives the merged file's tokens; edgeft reads its own GGUF back."""
    _, run_dir = cases[case]
    results = {q: E.export_run(run_dir, q, log=quiet) for q in ("f16", "q8_0")}
    for q, bar in (("f16", 0.99), ("q8_0", 0.95)):
        p = results[q].parity
        with capsys.disabled():
            print(f"\n{case} {q}: top-1 {p.top1:.1%} over {p.positions} positions, max |dlogit| {p.max_abs:.4f}")
        assert p.top1 >= bar and p.positions >= POSITIONS, p.table()
    assert results["f16"].parity.max_abs < 0.05, results["f16"].parity.table()

    ad = E.export_run(run_dir, "f16", adapter=True, log=quiet)
    with capsys.disabled():
        print(f"{case} adapter: top-1 {ad.parity.top1:.1%}, max |dlogit| {ad.parity.max_abs:.4f}")
    assert ad.parity.top1 >= 0.99 and ad.parity.max_abs < 0.05, ad.parity.table()

    loaded, _ = load_tuned(run_dir)
    ids = V.prompt_ids(loaded.tokenizer)
    scores = lambda path, lora_path=None: np.concatenate(V.llama_cpp_logits(path, ids, lora_path))  # noqa: E731
    merged, applied, base_only = scores(results["f16"].gguf), scores(ad.base, ad.gguf), scores(ad.base)
    assert (applied.argmax(-1) == merged.argmax(-1)).mean() >= 0.99 and np.abs(applied - merged).max() < 0.05
    assert np.abs(base_only - merged).max() > 0.3  # the adapter is what makes them agree

    lora.merge(loaded.model)
    back = load(results["f16"].gguf)
    for chat in ids[:2]:
        np.testing.assert_allclose(V.mlx_logits(back.model, chat), V.mlx_logits(loaded.model, chat), atol=0.05)
    assert back.config.get("rope_scaling") == loaded.config.get("rope_scaling")


def test_phi3_files_follow_llama_cpp_conventions(cases):
    """Fused tensors and their adapters shaped as llama.cpp's phi3 creates them; the LongRoPE
    pair and its metadata as convert_hf_to_gguf writes them."""
    _, run_dir = cases["phi3-longrope"]
    ad = E.export_run(run_dir, "f16", adapter=True, verify=False, log=quiet)
    base = G.read_index(ad.base, with_metadata=True)
    shapes = {t.name: tuple(t.shape) for t in base.tensors}  # ggml order: (in, out)
    assert shapes["blk.0.attn_qkv.weight"] == (64, (4 + 2 * 2) * 16)
    assert shapes["blk.0.ffn_up.weight"] == (64, 2 * 128)
    assert shapes[R.ROPE_FACTORS_LONG] == shapes[R.ROPE_FACTORS_SHORT] == (8,)
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in shapes)
    md = base.metadata
    assert md[Keys.General.ARCHITECTURE] == "phi3"
    assert int(md["phi3.rope.scaling.original_context_length"]) == 4096
    assert int(md["phi3.context_length"]) == 131072 and int(md["phi3.attention.sliding_window"]) == 0
    assert float(md["phi3.rope.scaling.attn_factor"]) == pytest.approx(R.phi3_attn_factor(131072, 4096))
    adapter = {t.name: tuple(t.shape) for t in G.read_index(ad.gguf).tensors}
    assert set(adapter) == {f"blk.{i}.{t}.weight.lora_{p}" for i in (0, 1) for p in "ab"
                            for t in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
    assert adapter["blk.1.attn_qkv.weight.lora_a"] == (64, 4) and adapter["blk.1.attn_qkv.weight.lora_b"] == (4, 128)
    assert adapter["blk.0.ffn_up.weight.lora_b"] == (4, 256)  # rank 4 (make_run)


def test_mistral_and_llama3_files(cases):
    """mistral is written as llama (no window: llama.cpp's converter writes none); llama 3.2
    carries rope_freqs.weight and no output.weight (tied)."""
    for case, tied in (("mistral-swa", False), ("llama3.2", True)):
        r = E.export_run(cases[case][1], "f16", verify=False, log=quiet)
        index = G.read_index(r.gguf, with_metadata=True)
        names = {t.name for t in index.tensors}
        assert index.metadata[Keys.General.ARCHITECTURE] == "llama"
        assert not any("sliding_window" in k for k in index.metadata)
        assert ("output.weight" not in names) == tied
        assert (R.ROPE_FREQS_TENSOR in names) == (case == "llama3.2")
    loaded, _ = load_tuned(cases["mistral-swa"][1])
    assert all(len(ids) > 16 for ids in V.prompt_ids(loaded.tokenizer))  # every chat passes the window


def rewritten(src, dst, edit):
    """`src` (a GGUF) rewritten as f32 with `edit(tensors)` applied: a file with one convention broken."""
    index = G.read_index(src, with_metadata=True)
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
               .reshape(tuple(reversed([int(d) for d in t.shape]))) for t in gguf.GGUFReader(src).tensors}
    tensors = edit(tensors)
    specs = [TensorSpec(n, a.shape, lambda a=a: a) for n, a in tensors.items()]
    write_gguf(dst, index.metadata[Keys.General.ARCHITECTURE], index.metadata, specs, "f32")
    return dst


def _qk_permuted(t):
    """phi3's qkv rows permuted as for llama's RoPE (phi3 is neox: llama.cpp wants none)."""
    out = dict(t)
    for name, w in t.items():
        if name.endswith("attn_qkv.weight"):
            q, k, v = np.split(w, [64, 96])
            out[name] = np.concatenate([F.permute_qk(q, 4), F.permute_qk(k, 2), v])
    return out


def _gate_up_swapped(t):
    return {n: (np.concatenate(np.split(w, 2)[::-1]) if n.endswith("ffn_up.weight") else w) for n, w in t.items()}


def _factors_swapped(t):
    return {**t, R.ROPE_FACTORS_LONG: t[R.ROPE_FACTORS_SHORT], R.ROPE_FACTORS_SHORT: t[R.ROPE_FACTORS_LONG]}


def _no_rope_freqs(t):
    return {n: w for n, w in t.items() if n != R.ROPE_FREQS_TENSOR}


def _qk_unpermuted(t):
    out = dict(t)
    for name, w in t.items():
        if ".attn_q." in name or ".attn_k." in name:  # llama.cpp's row order undone
            heads = 4 if ".attn_q." in name else 2
            out[name] = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
    return out


@pytest.mark.parametrize("case, edit", [
    ("phi3", _qk_permuted), ("phi3", _gate_up_swapped), ("phi3-longrope", _factors_swapped),
    ("llama3.2", _no_rope_freqs), ("mistral-swa", _qk_unpermuted),
])
def test_a_wrong_convention_would_be_caught(cases, case, edit, tmp_path):
    loaded, _ = load_tuned(cases[case][1])
    lora.merge(loaded.model)
    good = tmp_path / "good.gguf"
    write_gguf(good, F.family(loaded.config["model_type"]).arch, E.model_metadata(loaded, "t", "f32", log=quiet),
               E.model_tensors(loaded.model, loaded.config, loaded.qk_layout), "f32")
    reference = V.file_model(good)
    assert V.compare(good, reference, loaded.tokenizer).top1 >= 0.99
    p = V.compare(rewritten(good, tmp_path / "bad.gguf", edit), reference, loaded.tokenizer)
    assert p.max_abs > 0.3, p.table()  # the f16 bar above is 0.05
    tied = CASES[case][1]  # a tied tiny model mostly predicts its input: top-1 hardly moves
    assert tied or p.top1 < 0.95, p.table()


def test_phi3_lora_targets_name_the_fused_layers():
    """Recipes name Hugging Face's split projections; phi3 holds them fused."""
    model = build_model(tiny_config("phi3"))
    assert lora.layer_keys(model, ["q_proj", "v_proj"]) == ["self_attn.qkv_proj"]
    assert lora.layer_keys(model, LoRAConfig().targets) == [
        "mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
    assert lora.layer_keys(model, ["gate_up_proj"]) == ["mlp.gate_up_proj"]
    with pytest.raises(lora.LoRAError, match="known: down_proj, gate_up_proj, o_proj, qkv_proj"):
        lora.layer_keys(model, ["w1"])


def test_training_a_tiny_phi3_lowers_the_loss(cases):
    model = backend.prepare(load(cases["phi3"][0], quantize_bits=4).model, cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=8, alpha=16))
    cfg = TrainConfig(steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_every=0, save_every=0)
    seqs = four_examples()
    first = evaluate(model, [next(batches_from(seqs, 4))])
    trainer.train(model, cfg, lambda s: batches_from(seqs, 4, s), progress=trainer.Progress(30, every=1000))
    assert evaluate(model, [next(batches_from(seqs, 4))]) < 0.9 * first


@pytest.mark.parametrize("overrides", [{}, {"partial_rotary_factor": 0.5, "sliding_window": 2047}, LONGROPE])
def test_phi3_config_metadata_round_trip(overrides):
    cfg = tiny_config("phi3", tie=False, **overrides)
    md = F.config_to_metadata(cfg)
    back = F.metadata_to_config(md, {"output.weight"}, R.rope_tensors(cfg))
    assert back == cfg


def test_phi3_refusals():
    cfg = tiny_config("phi3", **LONGROPE)
    md = F.config_to_metadata(cfg)
    tensors = R.rope_tensors(cfg)
    with pytest.raises(ModelLoadError, match="only one of rope_factors_long.weight"):
        F.metadata_to_config(md, set(), {R.ROPE_FACTORS_LONG: tensors[R.ROPE_FACTORS_LONG]})
    with pytest.raises(ModelLoadError, match="attn_factor is 2, but LongRoPE"):
        F.metadata_to_config({**md, "phi3.rope.scaling.attn_factor": 2.0}, set(), tensors)
    with pytest.raises(ModelLoadError, match="long_factor must hold 8 values"):
        F.config_to_metadata({**cfg, "rope_scaling": {**cfg["rope_scaling"], "long_factor": [1.0]}})
    with pytest.raises(ModelLoadError, match="phi3 RoPE scaling 'yarn' is not supported"):
        F.config_to_metadata({**cfg, "rope_scaling": {"type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize("case", ["phi3-longrope", "llama3.2"])
def test_a_run_on_a_gguf_base_exports_to_llama_cpp(cases, case, tmp_path):
    """GGUF in (LongRoPE factors / rope_freqs folded into the config): a run on the GGUF base,
    its adapter applied by llama.cpp to that very file, and its merged file, agree with MLX."""
    base = E.export_run(cases[case][1], "f16", adapter=True, verify=False, log=quiet).base
    loaded = load(base)
    assert loaded.config["rope_scaling"] == CASES[case][2]["rope_scaling"]
    run_dir = make_run(base, tmp_path / "runs", f"gguf-{case.replace('phi3', 'phi')}", seed=2)
    ad = E.export_run(run_dir, "f16", adapter=True, log=quiet)
    assert ad.base == base and ad.parity.top1 >= 0.99 and ad.parity.max_abs < 0.05, ad.parity.table()
    merged = E.export_run(run_dir, "q8_0", log=quiet)
    assert merged.parity.top1 >= 0.95 and merged.parity.positions >= POSITIONS, merged.parity.table()
    names = {t.name for t in G.read_index(merged.gguf).tensors}
    assert set(R.rope_tensors(loaded.config)) <= names and R.rope_tensors(loaded.config)
