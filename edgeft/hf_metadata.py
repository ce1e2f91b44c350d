"""GGUF metadata for a Hugging Face / MLX folder base: its architecture, name and license, and
its tokenizer in llama.cpp's form (what convert_hf_to_gguf.py writes), so that an export of a
model tuned from a folder runs in llama.cpp as the folder's own tokenizer encodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import Keys, TokenType

from edgeft.errors import UserError
from edgeft.families import config_to_metadata
from edgeft.gguf_reader import ModelLoadError
from edgeft.tokenizer import Tokenizer


class FolderMetadataError(UserError, ValueError):
    """A folder base whose architecture or tokenizer cannot be written as GGUF metadata."""


# Texts whose encodings must agree between the folder's tokenizer and the one rebuilt from the
# metadata: they pick llama.cpp's pre-tokenizer (tokenizer.ggml.pre) among PRE_CANDIDATES.
PROBE_TEXTS = [
    "Hello world! It's 2024, isn't it? They'll say: \"we've done 12345 things\".",
    "  leading spaces,\ttabs\tand\n\nnew lines   \n end",
    "Ünïcödé, 你好世界, émojis 🙂🚀 and numbers 3.14159 / 1,000,000",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]
PRE_CANDIDATES = ("smollm", "gpt-2", "llama-bpe", "qwen2")


def folder_metadata(loaded) -> dict:
    """Architecture + tokenizer metadata for a Hugging Face / MLX folder base.

    Byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) vocabularies are
    supported; the result is checked by rebuilding edgeft's tokenizer from it and comparing
    encodings with the folder's own tokenizer."""
    try:
        md = config_to_metadata(loaded.config)
    except ModelLoadError as e:
        raise FolderMetadataError(f"{loaded.path}: {e}") from None
    path = Path(loaded.path)
    tok = loaded.tokenizer
    md[Keys.General.NAME] = path.name
    license_ = _readme_license(path)
    if license_:
        md[Keys.General.LICENSE] = license_
    vocab_size = int(loaded.config["vocab_size"])
    if (path / "tokenizer.json").is_file() and _is_byte_level_bpe(path / "tokenizer.json"):
        tk_md = _bpe_metadata(path / "tokenizer.json", vocab_size)
        candidates = PRE_CANDIDATES
    elif (path / "tokenizer.model").is_file():
        tk_md = _spm_metadata(path / "tokenizer.model", vocab_size)
        candidates = (None,)
    else:
        raise FolderMetadataError(
            f"{path}: only byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) "
            "vocabularies can be written to GGUF; convert the base with llama.cpp's "
            "convert_hf_to_gguf.py and tune from that GGUF"
        )
    tk_md.update({
        Keys.Tokenizer.ADD_BOS: bool(tok.add_bos),
        **({Keys.Tokenizer.BOS_ID: np.uint32(tok.bos_id)} if tok.bos_id is not None else {}),
        **({Keys.Tokenizer.EOS_ID: np.uint32(tok.eos_id)} if tok.eos_id is not None else {}),
        **({Keys.Tokenizer.CHAT_TEMPLATE: tok.chat_template} if tok.chat_template else {}),
    })
    want = [tok.encode(t) for t in PROBE_TEXTS]
    for pre in candidates:
        trial = dict(tk_md, **({Keys.Tokenizer.PRE: pre} if pre else {}))
        try:
            rebuilt = Tokenizer.from_gguf_metadata(trial)
        except ModelLoadError:
            continue
        if [rebuilt.encode(t) for t in PROBE_TEXTS] == want:
            md.update(trial)
            return md
    raise FolderMetadataError(
        f"{path}: the tokenizer's pre-tokenizer matches none llama.cpp knows of "
        f"({', '.join(c for c in candidates if c)}); convert the base with llama.cpp's "
        "convert_hf_to_gguf.py and tune from that GGUF"
    )


def _is_byte_level_bpe(file: Path) -> bool:
    j = json.loads(file.read_text(encoding="utf-8"))
    return (j.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(
        [j.get("pre_tokenizer"), j.get("decoder")])


def _bpe_metadata(file: Path, vocab_size: int) -> dict:
    j = json.loads(file.read_text(encoding="utf-8"))
    model = j["model"]
    n = max(vocab_size, max(model["vocab"].values()) + 1,
            max((t["id"] + 1 for t in j.get("added_tokens", [])), default=0))
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, TokenType.NORMAL
    for t in j.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        Keys.Tokenizer.MODEL: "gpt2",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.TOKEN_TYPE: np.array(types, dtype=np.int32),
        Keys.Tokenizer.MERGES: merges,
    }


def _spm_metadata(file: Path, vocab_size: int) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(file))
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(max(n, vocab_size)):
        if i >= n:
            tokens.append(f"[PAD{i}]"); scores.append(-1000.0); types.append(TokenType.UNUSED)  # noqa: E702
            continue
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i)
                     else TokenType.NORMAL)
    md = {
        Keys.Tokenizer.MODEL: "llama",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.SCORES: np.array(scores, dtype=np.float32),
        Keys.Tokenizer.TOKEN_TYPE: np.array(types, dtype=np.int32),
        Keys.Tokenizer.ADD_PREFIX: True,
    }
    if sp.unk_id() >= 0:
        md[Keys.Tokenizer.UNK_ID] = np.uint32(sp.unk_id())
    return md


def _readme_license(folder: Path) -> str | None:
    """`license:` from a Hugging Face README's YAML front matter."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if not m:
        return None
    import yaml

    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None
