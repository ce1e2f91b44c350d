"""edgeft.families: metadata <-> ModelArgs, RoPE scaling, tensor names, Q/K order."""

import mlx.core as mx
import numpy as np
import pytest
from gguf import Keys
from mlx.utils import tree_flatten
from tiny import ARCHS, GEMMA_ARCHS, build_model, gguf_config, tiny_config

from edgeft import families as F
from edgeft import rope_scaling as R
from edgeft.gguf_reader import ModelLoadError


# --- metadata <-> config -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 2.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}],
)
def test_config_metadata_round_trip(arch, scaling):
    cfg = {**tiny_config(arch, tie=False), "rope_traditional": F.family(arch).rope_traditional}
    if scaling:
        cfg["rope_scaling"] = scaling
    md = F.config_to_metadata(cfg)
    names = {"output.weight", "token_embd.weight"}
    back = F.metadata_to_config(md, names)
    assert back == cfg


def test_metadata_values_as_mx_arrays_and_defaults():
    """mx.load gives numbers as mx.array scalars; vocab size falls back to the token list."""
    cfg = tiny_config("llama")
    md = {k: (mx.array(v) if isinstance(v, (int, float)) else v) for k, v in F.config_to_metadata(cfg).items()}
    del md["llama.vocab_size"]
    md[Keys.Tokenizer.LIST] = ["a"] * 123
    out = F.metadata_to_config(md, {"token_embd.weight"})
    assert out["vocab_size"] == 123
    assert out["tie_word_embeddings"] is True
    assert out["rope_traditional"] is True  # llama.cpp permuted Q/K rows
    assert out["head_dim"] == 16


def test_unsupported_architecture_message():
    with pytest.raises(ModelLoadError) as e:
        F.metadata_to_config({Keys.General.ARCHITECTURE: "falcon"}, [])
    assert str(e.value) == "unsupported architecture falcon; supported: llama, qwen2, qwen3, phi3, gemma3, gemma2"


def test_family_of_a_model_type():
    """mistral folders load as llama; a config of any other type is refused in the same words."""
    assert F.family("mistral").arch == "llama" and F.family("mistral").rope_traditional
    assert [F.family(a).arch for a in F.ARCHITECTURES] == list(F.ARCHITECTURES)
    for bad in ("falcon", None):
        with pytest.raises(ModelLoadError, match=f"unsupported architecture {bad}; supported: llama, qwen2, qwen3, phi3, gemma3, gemma2"):
            F.family(bad)


def test_llama3_rope_freqs_round_trip():
    cfg = {**tiny_config("llama", hidden_size=512, num_attention_heads=4), "rope_theta": 500000.0}
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    freqs = R.llama3_rope_freqs(cfg)
    assert freqs.shape == (64,) and freqs.min() == 1.0 and freqs.max() == 32.0
    assert R.llama3_scaling_from_rope_freqs(freqs, 500000.0, 128) == cfg["rope_scaling"]
    with pytest.raises(ModelLoadError):
        R.llama3_scaling_from_rope_freqs(freqs[::-1], 500000.0, 128)


def test_llama3_rope_freqs_match_mlx_lm():
    """Our tensor reproduces mlx-lm's Llama3RoPE frequencies (llama.cpp divides by them)."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    cfg = {**tiny_config("llama", hidden_size=512, num_attention_heads=4), "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    rope = Llama3RoPE(128, base=500000.0, scaling_config=cfg["rope_scaling"])
    base = 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(np.array(rope._freqs) / base, R.llama3_rope_freqs(cfg), rtol=1e-4)


# --- tensor names ------------------------------------------------------------------------
LLAMA_PATHS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)


def test_tensor_name_maps_round_trip():
    names = []
    for layer in (0, 17):
        for path in LLAMA_PATHS:
            names += [f"model.layers.{layer}.{path}.{s}" for s in F.SUFFIXES]
    names += [f"{p}.{s}" for p in ("model.embed_tokens", "model.norm", "lm_head") for s in F.SUFFIXES]
    by_gguf = F.mlx_names_by_gguf(names, "qwen3")
    for name in names:
        gguf_name = F.mlx_to_gguf_name(name, "qwen3")
        assert gguf_name is not None and by_gguf[gguf_name] == name
    assert F.mlx_to_gguf_name("model.layers.3.self_attn.q_proj.weight", "llama") == "blk.3.attn_q.weight"
    assert F.mlx_to_gguf_name("model.layers.3.mlp.down_proj.scales", "llama") == "blk.3.ffn_down.scales"
    assert by_gguf["output.weight"] == "lm_head.weight"
    assert by_gguf["blk.0.attn_norm.weight"] == "model.layers.0.input_layernorm.weight"
    assert by_gguf["blk.0.ffn_norm.weight"] == "model.layers.0.post_attention_layernorm.weight"
    for unknown in ("rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.x.attn_q.weight", "output.foo"):
        assert unknown not in by_gguf
    assert F.mlx_to_gguf_name("model.layers.0.self_attn.rope.weight", "llama") is None
    assert F.mlx_to_gguf_name("model.layers.0.self_attn.q_proj.weight", "no-such-arch") is None
    assert F.mlx_to_gguf_name("model.layers.0.self_attn.q_proj.lora_a", "llama") is None


def test_names_follow_the_architecture():
    """The same Hugging Face name is a different GGUF tensor in another family (gguf-py's map)."""
    name = "model.layers.2.post_attention_layernorm.weight"
    assert F.mlx_to_gguf_name(name, "llama") == "blk.2.ffn_norm.weight"
    assert F.mlx_to_gguf_name(name, "gemma3") == "blk.2.post_attention_norm.weight"
    assert F.mlx_to_gguf_name("model.layers.2.pre_feedforward_layernorm.weight", "gemma3") == "blk.2.ffn_norm.weight"
    assert F.mlx_to_gguf_name("model.layers.2.self_attn.qkv_proj.weight", "phi3") == "blk.2.attn_qkv.weight"
    assert F.mlx_to_gguf_name("model.layers.2.mlp.gate_up_proj.weight", "phi3") == "blk.2.ffn_up.weight"


def test_every_tiny_parameter_has_a_gguf_name():
    for arch in ARCHS:
        names = [n for n, _ in tree_flatten(build_model(tiny_config(arch, tie=False)).parameters())]
        by_gguf = F.mlx_names_by_gguf(names, F.family(arch).arch)
        for name in names:
            assert by_gguf[F.mlx_to_gguf_name(name, F.family(arch).arch)] == name


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp row order -> HF's: the inverse of `permute_qk`, written out on its own."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_heads, head_dim, cols", [(4, 16, 64), (2, 16, 64), (9, 64, 8), (3, 8, 0)])
def test_qk_permutation_round_trip(n_heads, head_dim, cols):
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p = F.permute_qk(w, n_heads)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_heads), w)
    np.testing.assert_array_equal(F.permute_qk(unpermute_qk(w, n_heads), n_heads), w)


def test_qk_permutation_direction():
    """llama.cpp's order interleaves HF's two rotary halves: row 2i <- i, row 2i+1 <- i + d/2."""
    n_heads, d = 2, 8
    w = np.arange(n_heads * d)
    p = F.permute_qk(w, n_heads)
    for h in range(n_heads):
        for i in range(d // 2):
            assert p[h * d + 2 * i] == h * d + i
            assert p[h * d + 2 * i + 1] == h * d + i + d // 2


def test_qk_permutation_commutes_with_packed_rows():
    """Rows move whole, so permuting MLX-packed 4-bit weights equals quantizing permuted ones."""
    w = mx.random.normal((64, 64))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    p = lambda a: mx.array(F.permute_qk(np.array(a), 4))  # noqa: E731
    got = mx.dequantize(p(packed), p(scales), p(biases), group_size=32, bits=4)
    want = mx.dequantize(packed, scales, biases, group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(got), F.permute_qk(np.array(want), 4))


# --- gemma2 / gemma3 ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", GEMMA_ARCHS)
def test_gemma_config_metadata_round_trip(arch):
    """What llama.cpp reads from the keys written is the model's config (sliding window,
    pattern, local RoPE base, soft-caps; the attention scale from the shape)."""
    cfg = gguf_config(tiny_config(arch, tie=False))
    md = F.config_to_metadata(cfg)
    k = lambda key: key.format(arch=arch)  # noqa: E731
    if arch == "gemma3":
        assert md[k(Keys.Attention.SLIDING_WINDOW)] == 24 and md[k(Keys.Attention.SLIDING_WINDOW_PATTERN)] == 6
        assert md[k(Keys.Rope.FREQ_BASE_SWA)] == 10000.0 and md[k(Keys.Rope.FREQ_BASE)] == 1e6
    else:
        assert md[k(Keys.LLM.ATTN_LOGIT_SOFTCAPPING)] == 5.0 and md[k(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)] == 10.0
    names = {"token_embd.weight"} | ({"output.weight"} if arch == "gemma3" else set())
    assert F.metadata_to_config(md, names) == cfg


def test_gemma_metadata_defaults_are_llama_cpps():
    """Keys a converter's file may lack take the values llama.cpp's runtime assumes."""
    md = F.config_to_metadata(gguf_config(tiny_config("gemma3")))
    for key in (Keys.Attention.SLIDING_WINDOW_PATTERN, Keys.Rope.FREQ_BASE_SWA):
        del md[key.format(arch="gemma3")]
    cfg = F.metadata_to_config(md, [])
    assert (cfg["sliding_window_pattern"], cfg["rope_local_base_freq"]) == (6, 10000.0)
    del md["gemma3.attention.sliding_window"]  # no window: llama.cpp makes every layer global
    assert F.metadata_to_config(md, [])["sliding_window_pattern"] == 1
    md2 = F.config_to_metadata(gguf_config(tiny_config("gemma2")))
    for key in ("gemma2.attention.sliding_window", "gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping"):
        del md2[key]
    cfg2 = F.metadata_to_config(md2, [])
    assert (cfg2["sliding_window"], cfg2["attn_logit_softcapping"], cfg2["final_logit_softcapping"]) == (4096, 50.0, 30.0)


def test_gemma_sliding_pattern_as_llama_cpp_stores_it():
    """llama.cpp takes the pattern as a count n (layer i slides iff i % n < n - 1, 0: all) or
    as one flag per layer; mlx-lm's p has layer i global iff i % p == p - 1: the same rule."""
    assert F.gemma_swa_pattern([True] * 5 + [False] + [True] * 5 + [False]) == 6
    assert F.gemma_swa_pattern([True, False, True, False]) == 2
    assert F.gemma_swa_pattern([False] * 3) == 1 and F.gemma_swa_pattern([True] * 3) == 4
    with pytest.raises(ModelLoadError, match="every-n-th-layer-global"):
        F.gemma_swa_pattern([False, True, True, False])
    md = F.config_to_metadata(gguf_config(tiny_config("gemma3")))
    md["gemma3.attention.sliding_window_pattern"] = np.array([True, True, False] * 2)
    assert F.metadata_to_config(md, [])["sliding_window_pattern"] == 3
    md["gemma3.attention.sliding_window_pattern"] = 0
    assert F.metadata_to_config(md, [])["sliding_window_pattern"] == 7


def test_gemma_values_llama_cpp_would_compute_differently_are_refused():
    with pytest.raises(ModelLoadError, match="query_pre_attn_scalar 32 is not supported.*1/sqrt\\(16\\)"):
        F.config_to_metadata(tiny_config("gemma3", query_pre_attn_scalar=32))
    with pytest.raises(ModelLoadError, match="gemma3 with final_logit_softcapping is not supported"):
        F.gemma_folder_config(tiny_config("gemma3", final_logit_softcapping=30.0))
    with pytest.raises(ModelLoadError, match="gemma2 without attn_logit_softcapping"):
        F.gemma_folder_config(tiny_config("gemma2", attn_logit_softcapping=None))
    bad = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3
    with pytest.raises(ModelLoadError, match="layer_types do not follow sliding_window_pattern 6"):
        F.gemma_folder_config(tiny_config("gemma3", layer_types=bad))
    md = F.config_to_metadata(gguf_config(tiny_config("gemma3")))
    md["gemma3.final_logit_softcapping"] = 30.0
    with pytest.raises(ModelLoadError, match="final logit soft-capping"):
        F.metadata_to_config(md, [])
    # the 27B shape: llama.cpp scales by hidden/heads, so that is what the config must say
    deep = tiny_config("gemma3", num_hidden_layers=62, query_pre_attn_scalar=16.0)
    with pytest.raises(ModelLoadError, match="1/sqrt\\(32\\)"):  # 128 / 4 heads
        F.config_to_metadata({**deep, "hidden_size": 128})
    assert F.config_to_metadata({**deep, "hidden_size": 128, "query_pre_attn_scalar": 32})


def test_gemma_folder_configs_as_mlx_lm_reads_them():
    text = {k: v for k, v in tiny_config("gemma3").items() if k != "sliding_window_pattern"}
    text["layer_types"] = (["sliding_attention"] * 2 + ["full_attention"]) * 2
    got = F.gemma_folder_config({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    assert got["model_type"] == "gemma3_text" and got["sliding_window_pattern"] == 3
    assert F.gemma_folder_config(tiny_config("gemma2")) == tiny_config("gemma2")


def test_gemma_norms_are_stored_shifted():
    assert F.norm_offset("model.layers.3.self_attn.q_norm.weight", "gemma3") == 1.0
    assert F.norm_offset("model.norm.weight", "gemma2") == 1.0
    assert F.norm_offset("model.layers.0.pre_feedforward_layernorm.weight", "gemma3") == 1.0
    assert F.norm_offset("model.layers.0.mlp.up_proj.weight", "gemma3") == 0.0
    assert F.norm_offset("model.norm.weight", "llama") == 0.0
    for arch in GEMMA_ARCHS:
        names = [n for n, _ in tree_flatten(build_model(tiny_config(arch, tie=False)).parameters())]
        by_gguf = F.mlx_names_by_gguf(names, arch)
        for name in names:
            assert by_gguf[F.mlx_to_gguf_name(name, arch)] == name
