"""edgeft.gguf_reader: key names, header checks, metadata <-> ModelArgs, tensor names, Q/K order."""

import struct

import gguf as gguf_py
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import ARCHS, build_model, make_tiny, tiny_config, write_gguf

from edgeft import gguf_reader as G
from edgeft.gguf_reader import ModelLoadError


# --- key names ---------------------------------------------------------------------------
def test_key_constants_match_gguf_py():
    """Guards against a typo in a key name: llama.cpp would silently ignore the key."""
    K = gguf_py.Keys
    pairs = [
        (G.KEY_ARCHITECTURE, K.General.ARCHITECTURE), (G.KEY_ALIGNMENT, K.General.ALIGNMENT),
        (G.KEY_CONTEXT_LENGTH, K.LLM.CONTEXT_LENGTH), (G.KEY_EMBEDDING_LENGTH, K.LLM.EMBEDDING_LENGTH),
        (G.KEY_BLOCK_COUNT, K.LLM.BLOCK_COUNT), (G.KEY_FEED_FORWARD_LENGTH, K.LLM.FEED_FORWARD_LENGTH),
        (G.KEY_VOCAB_SIZE, K.LLM.VOCAB_SIZE), (G.KEY_HEAD_COUNT, K.Attention.HEAD_COUNT),
        (G.KEY_HEAD_COUNT_KV, K.Attention.HEAD_COUNT_KV), (G.KEY_KEY_LENGTH, K.Attention.KEY_LENGTH),
        (G.KEY_VALUE_LENGTH, K.Attention.VALUE_LENGTH), (G.KEY_RMS_EPS, K.Attention.LAYERNORM_RMS_EPS),
        (G.KEY_ROPE_DIMENSION_COUNT, K.Rope.DIMENSION_COUNT), (G.KEY_ROPE_FREQ_BASE, K.Rope.FREQ_BASE),
        (G.KEY_ROPE_SCALING_TYPE, K.Rope.SCALING_TYPE), (G.KEY_ROPE_SCALING_FACTOR, K.Rope.SCALING_FACTOR),
        (G.KEY_ROPE_SCALING_ORIG_CTX, K.Rope.SCALING_ORIG_CTX_LEN),
        (G.KEY_TOKENIZER_MODEL, K.Tokenizer.MODEL), (G.KEY_TOKENIZER_PRE, K.Tokenizer.PRE),
        (G.KEY_TOKENS, K.Tokenizer.LIST), (G.KEY_SCORES, K.Tokenizer.SCORES),
        (G.KEY_TOKEN_TYPE, K.Tokenizer.TOKEN_TYPE), (G.KEY_MERGES, K.Tokenizer.MERGES),
        (G.KEY_BOS_ID, K.Tokenizer.BOS_ID), (G.KEY_EOS_ID, K.Tokenizer.EOS_ID),
        (G.KEY_EOT_ID, K.Tokenizer.EOT_ID), (G.KEY_UNK_ID, K.Tokenizer.UNK_ID),
        (G.KEY_PAD_ID, K.Tokenizer.PAD_ID), (G.KEY_ADD_BOS, K.Tokenizer.ADD_BOS),
        (G.KEY_ADD_SPACE_PREFIX, K.Tokenizer.ADD_PREFIX), (G.KEY_CHAT_TEMPLATE, K.Tokenizer.CHAT_TEMPLATE),
    ]
    for ours, theirs in pairs:
        assert ours == theirs
    assert G.TOKEN_CONTROL == gguf_py.TokenType.CONTROL
    assert G.TOKEN_USER_DEFINED == gguf_py.TokenType.USER_DEFINED


# --- header checks -----------------------------------------------------------------------
def _header(magic=b"GGUF", version=3, n_tensors=0, n_kv=0):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"GGU", "shorter than a GGUF header"),
        (_header(magic=b"GGML"), "not a GGUF file"),
        (_header(version=1), "version 1"),
        (_header(version=4), "version 4"),
        (_header(n_tensors=1 << 40), "corrupt"),
        (_header(n_kv=1 << 33), "corrupt"),
        (_header(n_tensors=1000, n_kv=10), "truncated"),
    ],
)
def test_header_refusals_name_the_file(tmp_path, data, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + (b"\0" * 64 if len(data) >= G.HEADER_SIZE else b""))
    with pytest.raises(ModelLoadError) as e:
        G.check_header(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_header_of_good_file(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path)
    header = G.check_header(path)
    assert header.version == 3 and header.n_tensors == 2 * 9 + 2


def test_truncated_tensor_data_is_refused_naming_the_tensor(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"tensor \S+ ends past the end of the file"):
        G.read_index(path)


def test_truncated_metadata_is_refused(tmp_path):
    path, _, _ = make_tiny("llama", tmp_path)
    path.write_bytes(path.read_bytes()[:2000])  # inside the token list
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF header"):
        G.read_index(path)


def test_read_index_metadata_matches_mx_load(tmp_path):
    path, _, _ = make_tiny("qwen2", tmp_path, "q8_0")
    index = G.read_index(path, with_metadata=True)
    weights, md = mx.load(str(path), return_metadata=True)
    assert set(index.metadata) == set(md)
    for key, value in md.items():
        ours = index.metadata[key]
        if isinstance(value, mx.array):
            np.testing.assert_array_equal(np.asarray(ours), np.array(value))
        else:
            assert ours == value
    assert {t.name for t in index.tensors} == {k for k in weights if not k.endswith((".scales", ".biases"))}
    assert index.type_names() == {"F32", "Q8_0"}


# --- metadata <-> config -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 2.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}],
)
def test_config_metadata_round_trip(arch, scaling):
    cfg = {**tiny_config(arch, tie=False), "rope_traditional": G.ROPE_TRADITIONAL[arch]}
    if scaling:
        cfg["rope_scaling"] = scaling
    md = G.config_to_metadata(cfg)
    names = {"output.weight", "token_embd.weight"}
    back = G.metadata_to_config(md, names)
    assert back == cfg


def test_metadata_values_as_mx_arrays_and_defaults():
    """mx.load gives numbers as mx.array scalars; vocab size falls back to the token list."""
    cfg = tiny_config("llama")
    md = {k: (mx.array(v) if isinstance(v, (int, float)) else v) for k, v in G.config_to_metadata(cfg).items()}
    del md["llama.vocab_size"]
    md[G.KEY_TOKENS] = ["a"] * 123
    out = G.metadata_to_config(md, {"token_embd.weight"})
    assert out["vocab_size"] == 123
    assert out["tie_word_embeddings"] is True
    assert out["rope_traditional"] is True  # llama.cpp permuted Q/K rows
    assert out["head_dim"] == 16


def test_unsupported_architecture_message():
    with pytest.raises(ModelLoadError) as e:
        G.metadata_to_config({G.KEY_ARCHITECTURE: "gemma3"}, [])
    assert str(e.value) == "unsupported architecture gemma3; supported: llama, qwen2, qwen3"


def test_llama3_rope_freqs_round_trip():
    cfg = {**tiny_config("llama", hidden_size=512, num_attention_heads=4), "rope_theta": 500000.0}
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    freqs = G.llama3_rope_freqs(cfg)
    assert freqs.shape == (64,) and freqs.min() == 1.0 and freqs.max() == 32.0
    assert G.llama3_scaling_from_rope_freqs(freqs, 500000.0, 128) == cfg["rope_scaling"]
    with pytest.raises(ModelLoadError):
        G.llama3_scaling_from_rope_freqs(freqs[::-1], 500000.0, 128)


def test_llama3_rope_freqs_match_mlx_lm():
    """Our tensor reproduces mlx-lm's Llama3RoPE frequencies (llama.cpp divides by them)."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    cfg = {**tiny_config("llama", hidden_size=512, num_attention_heads=4), "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    rope = Llama3RoPE(128, base=500000.0, scaling_config=cfg["rope_scaling"])
    base = 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(np.array(rope._freqs) / base, G.llama3_rope_freqs(cfg), rtol=1e-4)


def test_write_metadata_keeps_types(tmp_path):
    cfg = tiny_config("qwen3")
    extra = {"general.file_type": np.uint32(7), "test.i8": np.int8(-3), "test.f64": np.float64(0.5),
             "test.arr": np.array([1, 2, 3], dtype=np.int16)}
    path = tmp_path / "t.gguf"
    write_gguf(path, {**cfg, "rope_traditional": False}, {}, extra_metadata=extra)
    md = G.read_index(path, with_metadata=True).metadata
    for key, value in extra.items():
        assert np.asarray(md[key]).dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(md[key], value)
    assert md[G.KEY_TOKEN_TYPE].dtype == np.int32  # llama.cpp reads token types as int32
    reader = gguf_py.GGUFReader(path)  # gguf-py agrees with our parser
    assert reader.fields["qwen3.attention.head_count"].parts[-1][0] == 4


# --- tensor names ------------------------------------------------------------------------
def test_tensor_name_maps_round_trip():
    names = []
    for layer in (0, 17):
        for path in G.BLOCK_TENSORS.values():
            names += [f"model.layers.{layer}.{path}.{s}" for s in G.SUFFIXES]
    names += [f"{p}.{s}" for p in G.GLOBAL_TENSORS.values() for s in G.SUFFIXES]
    for name in names:
        gguf_name = G.mlx_to_gguf_name(name)
        assert gguf_name is not None and G.gguf_to_mlx_name(gguf_name) == name
    assert G.mlx_to_gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert G.mlx_to_gguf_name("model.layers.3.mlp.down_proj.scales") == "blk.3.ffn_down.scales"
    assert G.gguf_to_mlx_name("output.weight") == "lm_head.weight"
    assert G.gguf_to_mlx_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert G.gguf_to_mlx_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    for unknown in ("rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.x.attn_q.weight", "output.foo"):
        assert G.gguf_to_mlx_name(unknown) is None
    assert G.mlx_to_gguf_name("model.layers.0.self_attn.rope.weight") is None


def test_every_tiny_parameter_has_a_gguf_name():
    for arch in ARCHS:
        for name, _ in tree_flatten(build_model(tiny_config(arch, tie=False)).parameters()):
            assert G.gguf_to_mlx_name(G.mlx_to_gguf_name(name)) == name


# --- Q/K permutation ---------------------------------------------------------------------
@pytest.mark.parametrize("n_heads, head_dim, cols", [(4, 16, 64), (2, 16, 64), (9, 64, 8), (3, 8, 0)])
def test_qk_permutation_round_trip(n_heads, head_dim, cols):
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p = G.permute_qk(w, n_heads)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(G.unpermute_qk(p, n_heads), w)
    np.testing.assert_array_equal(G.permute_qk(G.unpermute_qk(w, n_heads), n_heads), w)


def test_qk_permutation_direction():
    """llama.cpp's order interleaves HF's two rotary halves: row 2i <- i, row 2i+1 <- i + d/2."""
    n_heads, d = 2, 8
    w = np.arange(n_heads * d)
    p = G.permute_qk(w, n_heads)
    for h in range(n_heads):
        for i in range(d // 2):
            assert p[h * d + 2 * i] == h * d + i
            assert p[h * d + 2 * i + 1] == h * d + i + d // 2


def test_qk_permutation_commutes_with_packed_rows():
    """Rows move whole, so permuting MLX-packed 4-bit weights equals quantizing permuted ones."""
    w = mx.random.normal((64, 64))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    p = lambda a: mx.array(G.permute_qk(np.array(a), 4))  # noqa: E731
    got = mx.dequantize(p(packed), p(scales), p(biases), group_size=32, bits=4)
    want = mx.dequantize(packed, scales, biases, group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(got), G.permute_qk(np.array(want), 4))
