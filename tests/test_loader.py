"""edgeft.loader: GGUF files and HF/MLX folders -> the same function as the reference model."""

import ctypes
import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import Keys
from mlx.utils import tree_flatten
from tiny import (
    ARCHS,
    build_model,
    gguf_config,
    gguf_tensors,
    make_tiny,
    make_tiny_folder,
    mlx_tensors,
    tiny_config,
    tiny_weights,
    write_gguf,
)

from edgeft import backend, plan, system, verify
from edgeft import families as F
from edgeft import gguf_reader as G
from edgeft import kquants as K
from edgeft import loader as L
from edgeft import rope_scaling as R
from edgeft.loader import ModelLoadError, load

TOKENS = mx.array([[0, 5, 77, 123, 260, 3, 9, 200, 250, 299, 1, 2]])


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))[0]


def assert_same_function(got: np.ndarray, want: np.ndarray, rel: float, top1: float = 0.9):
    """Max |difference| within `rel` of the largest logit; mostly the same greedy token
    (random tiny models have near-flat logits, so top-1 is fragile under 4-bit rounding)."""
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rel * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= top1


def assert_config(got: dict, want: dict):
    assert got["rms_norm_eps"] == pytest.approx(want["rms_norm_eps"])  # stored as float32
    assert {**got, "rms_norm_eps": 0} == {**want, "rms_norm_eps": 0}


# --- GGUF ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", [None, "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_gguf_reads_back_as_written(tmp_path, arch, quant):
    path, ref, cfg = make_tiny(arch, tmp_path, quant, tie=arch != "qwen2")
    loaded = load(path)
    assert loaded.fmt == "gguf" and loaded.path == path
    assert loaded.qk_layout == ("gguf" if arch == "llama" else "hf")
    assert loaded.gguf_metadata[Keys.General.ARCHITECTURE] == arch
    assert_config(loaded.config, cfg)
    if quant is None:
        np.testing.assert_allclose(logits(loaded.model), logits(ref), rtol=1e-5, atol=1e-5)
        return
    # MLX dequantizes through its fp16 scales: ~1e-3 relative against gguf-py's fp32 values.
    assert_same_function(logits(loaded.model), logits(ref), rel=3e-3 if quant.startswith("q") else 1e-4)
    if quant.startswith("q"):
        q_proj = loaded.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.group_size == 32
        assert q_proj.bits == (8 if quant == "q8_0" else 4)
        assert isinstance(loaded.model.model.embed_tokens, nn.QuantizedEmbedding)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_llama_cpp(tmp_path, arch):
    """The only check of the Q/K convention that does not trust edgeft's own writer."""
    pytest.importorskip("llama_cpp")
    path, ref, _ = make_tiny(arch, tmp_path, tie=arch != "qwen2")
    llm = verify.open_llama(path, logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    ids = TOKENS[0].tolist()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    np.testing.assert_allclose(logits(load(path).model), theirs, atol=2e-3 * np.abs(theirs).max())


def test_open_llama_turns_off_the_amx_repacking_only_on_amx_cpus(tmp_path):
    """llama.cpp's AMX weight repacking segfaulted in decode on these tiny models (Intel Xeon with
    AMX): edgeft opens every GGUF without it there, and as llama.cpp would elsewhere."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp import llama as module

    defaults = module.llama_cpp.llama_model_default_params
    path, _, _ = make_tiny("llama", tmp_path)
    llm = verify.open_llama(path, verbose=False, n_ctx=64)
    try:
        assert llm.model_params.use_extra_bufts == ("amx_int8" not in system.cpu_flags())
        llm.eval(TOKENS[0].tolist()[:8])
    finally:
        llm.close()
    assert module.llama_cpp.llama_model_default_params is defaults  # put back after loading
    assert llama_cpp.llama_model_default_params().use_extra_bufts


def _llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _dequantized_reference(path: Path, cfg: dict):
    """The model as gguf-py dequantizes the file: independent of edgeft's reader."""
    reader = gguf.GGUFReader(path)
    weights = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        weights[t.name] = w.reshape(tuple(reversed([int(d) for d in t.shape])))
    return build_model(cfg, mlx_tensors(cfg, weights))


# ggml types whose blocks are MLX affine quantization, and their bytes per block of values
AFFINE_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
                 "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176)}


@pytest.mark.parametrize("kind", sorted(AFFINE_BLOCKS))
def test_affine_blocks_become_triplets_of_the_exact_values(kind):
    """Random blocks (random bits, finite fp16 scales): the MLX triplet dequantizes to exactly
    gguf-py's float32 values (max |difference| 0), and computes with them exactly."""
    block, size = AFFINE_BLOCKS[kind]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (8, 512 // block, size), dtype=np.uint8)
    d = (rng.standard_normal((8, 512 // block, 2)) * 0.02).astype(np.float16)  # d and m/dmin
    raw[..., :4] = d.view(np.uint8).reshape(8, 512 // block, 4)
    raw = raw.reshape(8, -1)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    w, scales, biases = K.triplet(kind, raw)
    bits = K.AFFINE_BITS[kind]
    assert scales.dtype == biases.dtype == mx.float32 and w.shape == (8, 512 * bits // 32)
    got = np.array(mx.dequantize(w, scales, biases, group_size=32, bits=bits))
    assert got.dtype == np.float32 and np.abs(got - want).max() == 0
    x = mx.array(rng.standard_normal((3, 512)).astype(np.float32))
    quantized = np.array(mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=bits))
    # the same products, summed in another order: within fp32's rounding of the sum of |terms|
    # (rtol 1e-5 failed once on an Intel Xeon, by 1.27e-5)
    bound = np.abs(np.array(x)) @ np.abs(want).T
    assert (np.abs(quantized - np.array(x @ mx.array(want).T)) <= 1e-5 * bound).all()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
def test_affine_blocks_read_as_mx_load_reads_them(tmp_path, quant):
    """The block-by-block reader and `mx.load` make the same packed values (mx.load's scales are
    float16, exact for these types)."""
    path, _, _ = make_tiny("llama", tmp_path, quant)
    native = mx.load(str(path))
    index = G.read_index(path)
    for t in index.tensors:
        kind = G.ggml_type_name(t.ggml_type)
        if kind == "F32":
            continue
        held = L._held(path, index, t)
        base = t.name.removesuffix(".weight")
        np.testing.assert_array_equal(np.array(held[t.name]), np.array(native[t.name]))
        for part in ("scales", "biases"):
            np.testing.assert_array_equal(np.array(held[f"{base}.{part}"]),
                                          np.array(native[f"{base}.{part}"].astype(mx.float32)))


@pytest.mark.parametrize("ftype, types", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q5_0", {"Q5_0", "Q6_K"}),
                                          ("Q5_K_M", {"Q5_K", "Q6_K"}), ("Q5_1", {"Q5_1", "Q6_K"})])
def test_k_quant_gguf_is_read_block_by_block(tmp_path, ftype, types):
    """mx.load turns Q4_K/Q6_K into full fp16 and refuses Q5_0/Q5_K/Q3_K...: edgeft reads the
    blocks. Q4_K, Q5_K, Q5_0, Q5_1 (and Q8_0/Q4_0/Q4_1 beside them) are MLX affine quantization
    already: held at their own bits with the file's exact values (a behaviour change: Q5_0 and
    Q5_K were re-quantized to 8 bits, Q4_K to 4 and the token embedding to 8). Q6_K, with
    sub-blocks of 16, is still dequantized and re-quantized to 8 bits."""
    src, _, cfg = make_tiny("llama", tmp_path, hidden_size=256, intermediate_size=512, tie=False)
    path = _llama_quantize(src, tmp_path / f"tiny-{ftype}.gguf", ftype)
    index = G.read_index(path)
    assert types <= index.type_names()
    loaded = load(path)
    modules = dict(loaded.model.named_modules())
    by_gguf = F.mlx_names_by_gguf([n for n, _ in tree_flatten(loaded.model.parameters())], "llama")
    reference = gguf.GGUFReader(path)
    for t in index.tensors:
        kind = G.ggml_type_name(t.ggml_type)
        if kind == "F32":
            continue
        module = modules[by_gguf[t.name].removesuffix(".weight")]
        assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        bits = K.AFFINE_BITS.get(kind, 8 if kind == "Q6_K" or t.name == "token_embd.weight" else 4)
        assert (module.bits, module.group_size) == (bits, 32), t.name
        if kind in K.AFFINE_BITS:  # exactly gguf-py's values
            r = next(r for r in reference.tensors if r.name == t.name)
            want = gguf.quants.dequantize(r.data, r.tensor_type).reshape(module.scales.shape[0], -1)
            got = mx.dequantize(module.weight, module.scales, module.biases, group_size=32, bits=bits)
            assert np.abs(np.array(got) - want).max() == 0, t.name
    want = logits(_dequantized_reference(path, cfg))
    assert_same_function(logits(loaded.model), want, rel=0.08, top1=0.5)  # Q6_K re-quantized
    # The memory plan's rule is the loader's
    backend.prepare(loaded.model, cpu=True)
    from_model = plan.quant_info_from_model(loaded.model, "cpu")
    assert plan.quant_info_from_gguf(path, device="cpu").weight_bytes == from_model.weight_bytes


@pytest.mark.parametrize("ftype", ["Q4_K_S", "Q5_0", "Q5_K_S", "Q5_1"])
def test_exact_block_files_compute_as_gguf_pys_values(tmp_path, ftype):
    """With no Q6_K tensor re-quantized (output.weight, Q6_K in the mixes, is kept f32 here),
    the loaded model is the gguf-py-dequantized reference within float32 rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src, _, cfg = make_tiny("llama", tmp_path, hidden_size=256, intermediate_size=512, tie=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    path = tmp_path / f"tiny-{ftype}-exact.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)) == 0
    assert G.read_index(path).type_names() <= {"F32"} | K.AFFINE_BITS.keys()
    want = logits(_dequantized_reference(path, cfg))
    np.testing.assert_allclose(logits(load(path).model), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantize_bits_on_gguf_load(tmp_path):
    path, ref, _ = make_tiny("qwen3", tmp_path)
    loaded = load(path, quantize_bits=8)
    assert loaded.model.model.layers[1].mlp.up_proj.bits == 8
    assert loaded.model.model.embed_tokens.bits == 8
    assert_same_function(logits(loaded.model), logits(ref), rel=2e-2)


def test_llama3_rope_freqs_tensor(tmp_path):
    """llama 3.1+ files carry RoPE scaling as rope_freqs.weight; it becomes rope_scaling."""
    base = tiny_config("llama", max_position_embeddings=131072)
    cfg = gguf_config({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    tensors = gguf_tensors(cfg, tiny_weights(cfg))
    tensors[R.ROPE_FREQS_TENSOR] = R.llama3_rope_freqs(cfg)
    path = tmp_path / "llama3.gguf"
    write_gguf(path, cfg, tensors)
    loaded = load(path)
    assert loaded.config["rope_scaling"] == cfg["rope_scaling"]
    ref = build_model(cfg, mlx_tensors(cfg, tensors))
    np.testing.assert_allclose(logits(loaded.model), logits(ref), rtol=1e-5, atol=1e-5)


def test_tokenizer_only(tmp_path):
    path, _, cfg = make_tiny("qwen2", tmp_path, "q4_0")
    loaded = load(path, tokenizer_only=True)
    assert loaded.model is None and loaded.tokenizer.eos_id == 2
    assert_config(loaded.config, cfg)


# --- GGUF refusals ---------------------------------------------------------------------------
def _tensors(arch="llama"):
    cfg = gguf_config(tiny_config(arch))
    return cfg, gguf_tensors(cfg, tiny_weights(tiny_config(arch)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("blk.1.ffn_up.weight"), r"tensor blk\.1\.ffn_up\.weight is missing"),
        (lambda t: t.update({"blk.0.attn_k.weight": np.zeros((16, 64), np.float32)}),
         r"tensor blk\.0\.attn_k\.weight has shape \(16, 64\), expected \(32, 64\)"),
        (lambda t: t.update({"blk.2.attn_q.weight": np.zeros((64, 64), np.float32)}),
         r"unexpected tensor blk\.2\.attn_q\.weight"),
        (lambda t: t.update({"mystery.weight": np.zeros((4,), np.float32)}),
         r"tensor mystery\.weight has no place in a llama model"),
    ],
)
def test_tensor_problems_name_file_and_tensor(tmp_path, edit, message):
    cfg, tensors = _tensors()
    edit(tensors)
    path = tmp_path / "broken.gguf"
    write_gguf(path, cfg, tensors)
    with pytest.raises(ModelLoadError, match=message) as e:
        load(path)
    assert str(path) in str(e.value)


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as e:
        load(path)
    assert str(e.value) == f"{path}: unsupported architecture gemma; supported: llama, qwen2, qwen3, phi3, gemma3, gemma2"


def test_truncated_and_missing_files(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path, "q8_0")
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(path)
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load(tmp_path / "junk.gguf")


# --- folders -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_equals_reference_and_gguf(tmp_path, arch):
    """Same weights as HF folder (HF Q/K order) and as GGUF (llama.cpp order): same logits."""
    folder, ref, cfg = make_tiny_folder(arch, tmp_path, tie=arch == "qwen3")
    loaded = load(folder)
    assert (loaded.fmt, loaded.qk_layout, loaded.gguf_metadata) == ("folder", "hf", None)
    assert loaded.tokenizer.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>")
    np.testing.assert_allclose(logits(loaded.model), logits(ref), rtol=1e-5, atol=1e-5)
    gguf_path, _, _ = make_tiny(arch, tmp_path, tie=arch == "qwen3")
    np.testing.assert_allclose(logits(load(gguf_path).model), logits(ref), rtol=1e-4, atol=1e-4)


def test_folder_bf16_and_quantize_on_load(tmp_path):
    folder, ref, _ = make_tiny_folder("llama", tmp_path, dtype="bfloat16")
    loaded = load(folder)
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert_same_function(logits(loaded.model), logits(ref), rel=2e-2)
    q4 = load(folder, quantize_bits=4)
    assert isinstance(q4.model.model.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    assert q4.model.model.layers[0].self_attn.o_proj.bits == 4


def test_mlx_quantized_folder(tmp_path):
    folder, _, cfg = make_tiny_folder("qwen2", tmp_path)
    q = load(folder, quantize_bits=4).model
    out = tmp_path / "mlx-4bit"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((folder / name).read_bytes())
    (out / "config.json").write_text(json.dumps({**cfg, "quantization": {"group_size": 32, "bits": 4}}))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(q.parameters())))
    loaded = load(out)
    assert loaded.model.model.layers[1].mlp.down_proj.bits == 4
    np.testing.assert_array_equal(logits(loaded.model), logits(q))


def test_folder_without_tie_flag_follows_weights(tmp_path):
    folder, ref, cfg = make_tiny_folder("llama", tmp_path, tie=False)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load(folder)
    assert loaded.config["tie_word_embeddings"] is False
    np.testing.assert_allclose(logits(loaded.model), logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unsupported architecture gpt2; supported: llama, qwen2, qwen3, phi3, gemma3, gemma2"),
        ({"quantization_config": {"quant_method": "gptq"}}, "gptq-quantized checkpoints are not supported"),
        ({"intermediate_size": 96}, r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"),
    ],
)
def test_folder_refusals(tmp_path, change, message):
    folder, _, _ = make_tiny_folder("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        load(folder)


def test_folder_with_one_gguf(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path)
    assert load(tmp_path).path == path


# --- the real SmolLM2 ----------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_answers_paris(smollm2_path):
    from mlx_lm.models.cache import make_prompt_cache

    loaded = load(smollm2_path)
    assert loaded.config["model_type"] == "llama" and loaded.config["rope_traditional"] is True
    assert loaded.model.model.layers[0].self_attn.q_proj.bits == 4
    tok = loaded.tokenizer
    prompt = tok.render([{"role": "user", "content": "What is the capital of France?"}],
                        add_generation_prompt=True)
    ids = tok.encode(prompt, add_bos=tok.add_bos)
    cache = make_prompt_cache(loaded.model)
    out = []
    step = mx.array(ids)[None]
    for _ in range(12):
        nxt = mx.argmax(loaded.model(step, cache=cache)[0, -1]).item()
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
        step = mx.array([[nxt]])
    assert "Paris" in tok.decode(out)
