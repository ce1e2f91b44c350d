"""gemma3 (text) and gemma2 in and out, judged by mlx-lm's own load and by llama.cpp running the file.

Tiny random models made here as Hugging Face folders (tests/tiny.py: gemma3 has 6 layers, 5
of them sliding with a 24-token window and their own RoPE base; gemma2 soft-caps attention
and logits at small values so that the caps bite). The fixed chats edgeft.verify compares run
to 60-130 tokens, well past gemma3's window. Parity tables are printed (pytest -s shows them).
"""

import mlx.core as mx
import numpy as np
import pytest
from test_export import llama_cpp_top1, make_run, quiet
from tiny import GEMMA_ARCHS, gguf_config, make_tiny, make_tiny_folder

from edgeft import backend, lora, trainer
from edgeft import export as E
from edgeft import families as F
from edgeft import verify as V
from edgeft.config import LoRAConfig, TrainConfig
from edgeft.gguf_writer import write_gguf
from edgeft.loader import load
from edgeft.loss import evaluate
from edgeft.runs import load_tuned

llama_cpp = pytest.importorskip("llama_cpp")

LONG = np.random.default_rng(5).integers(3, 300, size=(2, 120)).tolist()  # past gemma3's window


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run per family on an HF folder base (gemma3 untied; gemma2 is always tied)."""
    root = tmp_path_factory.mktemp("gemma")
    out = {}
    for arch in GEMMA_ARCHS:
        folder, _, _ = make_tiny_folder(arch, root, tie=False)
        out[arch] = make_run(folder, root / "runs", f"tiny-{arch}")
    return out


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_folder_loads_as_mlx_lm_loads_it(tmp_path, arch):
    from mlx_lm.utils import load_model

    folder, _, _ = make_tiny_folder(arch, tmp_path, tie=arch == "gemma2")
    ours = load(folder)
    theirs, _ = load_model(folder)
    for ids in LONG:
        np.testing.assert_array_equal(V.mlx_logits(ours.model, ids), V.mlx_logits(theirs, ids))
    assert ours.qk_layout == "hf" and F.family(ours.config["model_type"]).arch == arch


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_gguf_loads_and_matches_llama_cpp(tmp_path, arch, quant):
    """A gemma GGUF as llama.cpp's converter writes it (norms + 1, gemma metadata): edgeft
    reads the config and the reference's function back, and llama.cpp computes the same."""
    path, ref, cfg = make_tiny(arch, tmp_path, quant, tie=False)
    loaded = load(path)
    assert loaded.config["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"])
    assert {**loaded.config, "rms_norm_eps": 0} == {**gguf_config(cfg), "rms_norm_eps": 0}
    theirs = V.llama_cpp_logits(path, LONG)
    for ids, lc in zip(LONG, theirs):
        ours = V.mlx_logits(loaded.model, ids)
        want = V.mlx_logits(ref, ids)
        np.testing.assert_allclose(ours, want, atol=(0.05 if quant else 1e-4) * np.abs(want).max())
        # q8_0: llama.cpp also rounds activations to 8 bits, which flips near-ties of a random
        # model on random tokens (~94%); the 95% bar holds over the chats (export test below).
        assert (ours.argmax(-1) == lc.argmax(-1)).mean() >= (0.9 if quant else 0.99)


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_exports_run_in_llama_cpp_like_mlx(runs, arch):
    """f16 and q8_0 merged files pass their bars in llama.cpp over > 300 positions; the adapter
    applied by llama.cpp to the base GGUF gives the merged file's tokens; the LoRA matters."""
    run_dir = runs[arch]
    results = {q: E.export_run(run_dir, q, log=quiet) for q in ("f16", "q8_0")}
    for q, bar in (("f16", 0.99), ("q8_0", 0.95)):
        p = results[q].parity
        print(p.table())
        assert p.top1 >= bar and p.positions >= 300, p.table()
        assert max(r.positions for r in p.rows) > 24  # longer than gemma3's window
    assert results["f16"].parity.max_abs < 0.05, results["f16"].parity.table()

    ad = E.export_run(run_dir, "f16", adapter=True, log=quiet)
    print(ad.parity.table())
    assert ad.parity.top1 >= 0.99 and ad.parity.max_abs < 0.05, ad.parity.table()
    assert ad.base.name == f"tiny-{arch}-base-f16.gguf"
    loaded, _ = load_tuned(run_dir)
    ids = V.prompt_ids(loaded.tokenizer)
    merged = llama_cpp_top1(results["f16"].gguf, ids)
    assert (llama_cpp_top1(ad.base, ids, ad.gguf) == merged).mean() >= 0.99
    # the adapter is what agrees (logits: a tied random model mostly repeats its input token,
    # so gemma2's top-1 hardly moves under the random LoRA)
    base_only = V.llama_cpp_logits(ad.base, ids[:2])
    with_merge = V.llama_cpp_logits(results["f16"].gguf, ids[:2])
    assert min(np.abs(a - b).max() for a, b in zip(base_only, with_merge)) > 0.5

    again = load(results["f16"].gguf)  # edgeft reads its own export back
    lora.merge(loaded.model)
    for chat in ids[:2]:
        np.testing.assert_allclose(V.mlx_logits(again.model, chat), V.mlx_logits(loaded.model, chat), atol=0.05)
    md = again.gguf_metadata
    if arch == "gemma2":
        assert float(md["gemma2.final_logit_softcapping"]) == 10.0
        assert float(md["gemma2.attn_logit_softcapping"]) == 5.0
    else:
        assert int(md["gemma3.attention.sliding_window"]) == 24
        assert float(md["gemma3.rope.freq_base_swa"]) == 10000.0


def _variant(loaded, path, md_changes=None, shift=True, monkeypatch=None):
    """The merged model written as f16 GGUF with a convention broken on purpose."""
    if not shift:
        monkeypatch.setattr(F, "norm_offset", lambda name, arch: 0.0)
    md = {**E.model_metadata(loaded, "wrong", "f16", log=quiet), **(md_changes or {})}
    arch = F.family(loaded.config["model_type"]).arch
    write_gguf(path, arch, {k: v for k, v in md.items() if v is not None},
               E.model_tensors(loaded.model, loaded.config, loaded.qk_layout), "f16")
    return path


@pytest.mark.parametrize("arch, broken", [
    ("gemma3", "no norm shift"), ("gemma2", "no norm shift"),
    ("gemma3", "no sliding window"), ("gemma3", "global RoPE base on local layers"),
    ("gemma2", "llama.cpp's default soft-caps"),
])
def test_a_wrong_convention_would_be_caught(runs, tmp_path, monkeypatch, arch, broken):
    """Guards the parity tests: each convention, broken, visibly disagrees in llama.cpp."""
    loaded, _ = load_tuned(runs[arch])
    lora.merge(loaded.model)
    changes = {
        "no sliding window": {"gemma3.attention.sliding_window": None},
        "global RoPE base on local layers": {"gemma3.rope.freq_base_swa": 1_000_000.0},
        "llama.cpp's default soft-caps": {"gemma2.final_logit_softcapping": None,
                                          "gemma2.attn_logit_softcapping": None},
    }.get(broken)
    path = _variant(loaded, tmp_path / "wrong.gguf", changes, broken != "no norm shift", monkeypatch)
    p = V.compare(path, loaded.model, loaded.tokenizer)
    assert p.max_abs > 0.5, p.table()  # f16 with the right conventions: < 0.05


@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_training_lowers_the_loss(tmp_path, arch):
    folder, _, _ = make_tiny_folder(arch, tmp_path, tie=arch == "gemma2")
    model = backend.prepare(load(folder).model, cpu=True)
    lora.apply_lora(model, LoRAConfig(rank=8, alpha=16))
    seqs = np.random.default_rng(1).integers(3, 300, size=(4, 40))
    mask = np.ones((4, 39), dtype=np.float32)
    mask[:, :10] = 0

    def batches(_start=0):
        while True:
            yield mx.array(seqs[:, :-1]), mx.array(seqs[:, 1:]), mx.array(mask)

    first = evaluate(model, [next(batches())])
    cfg = TrainConfig(steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_every=0, save_every=0)
    trainer.train(model, cfg, batches, progress=trainer.Progress(30, every=1000))
    last = evaluate(model, [next(batches())])
    assert last < 0.7 * first, (first, last)


def test_gemma2_loss_uses_the_capped_logits(tmp_path):
    """The training loss is the cross-entropy of the logits the model gives (soft-capped)."""
    import mlx.nn as nn

    folder, _, _ = make_tiny_folder("gemma2", tmp_path)
    model = backend.prepare(load(folder).model, cpu=True)
    seqs = np.random.default_rng(2).integers(3, 300, size=(2, 30))
    inputs, targets, mask = mx.array(seqs[:, :-1]), mx.array(seqs[:, 1:]), mx.ones((2, 29))
    want = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets).mean().item()
    got = evaluate(model, [(inputs, targets, mask)])
    assert got == pytest.approx(want, rel=1e-4)

