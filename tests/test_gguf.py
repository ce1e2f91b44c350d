"""edgeft.gguf_reader: header checks, bounds, the tensor table and metadata values."""

import struct

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import Keys
from tiny import make_tiny, tiny_config, write_gguf

from edgeft import gguf_reader as G
from edgeft.gguf_reader import ModelLoadError


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


# --- metadata values: written (edgeft.gguf_writer) and read back with their types ----------
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
    assert md[Keys.Tokenizer.TOKEN_TYPE].dtype == np.int32  # llama.cpp reads token types as int32
    reader = gguf.GGUFReader(path)  # gguf-py agrees with our parser
    assert reader.fields["qwen3.attention.head_count"].parts[-1][0] == 4
