"""The real Gemma 3 270M (Q4_K_M GGUF, fixture gemma3_path): edgeft's tokenizer of its 262,144
SentencePiece tokens against llama.cpp's on real texts, and edgeft's MLX model of the file
against llama.cpp running the same file.

Real texts: the seed tasks of ../shared/data when that folder is beside the project, and the
project's own README, examples and code; plus hand-written edge cases.
"""

import json
import time
from pathlib import Path

import pytest

from edgeft import gguf_reader as G
from edgeft.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
SEED_TASKS = ROOT.parent / "shared" / "data" / "seed_tasks.jsonl"

EDGE_CASES = [
    "", " ", "  ", "hello", " hello", "  two  spaces  between  ", "trailing   ",
    "a\tb\t\tc\n\n\nd\n", "\t" * 40 + "x", " " * 70 + "y", "\n" * 35 + "z", "\r\n\r\n",
    "12345 3.14159 -0.5e-3 1,000,000 0x1F 2026-12-03 10:45",
    "emoji 😀🎉 👍🏽 🇫🇷 👨‍👩‍👧 ✓",
    "naïve café Ünïcödé — “quotes” « guillemets » 中文 日本語 한국어 العربية עברית",
    "\u00a0no-break\u200bzero-width\ufeffbom",
    "<start_of_turn>user\nWhat is tea?<end_of_turn>\n<start_of_turn>model\nA drink.<end_of_turn>\n",
    "<bos>text<eos> <pad> <unk> <mask> <unused0><unused6241> [multimodal]",
    "<table><tr><td>1</td></tr></table> <b>bold</b> <s>struck</s> <code>x</code>",
    "    def f(x):\n        return x ** 2  # square\n",
    "x" * 500,
]


def seed_texts() -> list[str]:
    if not SEED_TASKS.is_file():
        return []
    out = []
    for line in SEED_TASKS.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        out += [task["instruction"], task["instances"][0]["input"], task["instances"][0]["output"]]
    return out


def project_texts() -> list[str]:
    files = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.jsonl")),
             ROOT / "edgeft" / "tokenizer.py", ROOT / "edgeft" / "wheels.py"]
    return [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture(scope="module")
def tokenizers(gemma3_path):
    md = G.read_index(gemma3_path, with_metadata=True).metadata
    t0 = time.perf_counter()
    ours = Tokenizer.from_gguf_metadata(md)
    print(f"\nedgeft's tokenizer of {ours.vocab_size:,} tokens built in "
          f"{time.perf_counter() - t0:.2f} s (metadata read apart)")
    theirs = llama_cpp.Llama(str(gemma3_path), vocab_only=True, verbose=False)
    yield ours, theirs
    theirs.close()


def test_tokenizer_encodes_and_decodes_like_llama_cpp(tokenizers):
    ours, theirs = tokenizers
    assert ours.vocab_size == theirs.n_vocab() == 262_144
    assert ours.chat_template is None  # a base model: no template in the file
    assert ours.add_bos and ours.bos_id == theirs.token_bos() == 2
    assert ours.eos_id == theirs.token_eos() == 1
    assert ours.token_to_id("<start_of_turn>") == 105 and ours.token_to_id("<end_of_turn>") == 106

    texts = EDGE_CASES + seed_texts() + project_texts()
    differ, tokens = [], 0
    for text in texts:
        ids = ours.encode(text)
        tokens += len(ids)
        if ids != theirs.tokenize(text.encode("utf-8"), add_bos=False, special=True):
            differ.append(text[:60])
        assert ours.decode(ids, skip_special=False) == text
        assert theirs.detokenize(ids, special=True).decode("utf-8") == text
    print(f"{len(texts) - len(differ)} of {len(texts)} texts ({tokens:,} tokens) tokenized as "
          f"llama.cpp does (seed tasks {'in' if SEED_TASKS.is_file() else 'absent'})")
    assert not differ, f"{len(differ)} texts differ, the first: {differ[:3]}"
    # BOS as llama.cpp adds it
    assert (ours.encode("Tea time.", add_bos=True)
            == theirs.tokenize(b"Tea time.", add_bos=True, special=True))


def agreement_texts(tokenizer, n: int = 3, length: int = 128) -> list[list[int]]:
    """`n` token lists of `length` tokens (BOS first) of real English: seed tasks when present,
    else the README's prose."""
    if SEED_TASKS.is_file():
        pieces = [f"{t['instruction']}\n{t['instances'][0]['input']}\n{t['instances'][0]['output']}"
                  for t in map(json.loads, SEED_TASKS.read_text(encoding="utf-8").splitlines())]
    else:
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        pieces = [p for p in text.split("\n\n") if p[:1].isalpha()]
    ids = tokenizer.encode("\n\n".join(pieces))
    assert len(ids) >= n * (length - 1)
    return [[tokenizer.bos_id] + ids[i * (length - 1):(i + 1) * (length - 1)] for i in range(n)]


# Measured 95.3% (384 positions; the file's exact weights in fp32 agree 96.3%): Q4_K, Q5_0 and
# Q8_0 load exactly, Q6_K (ffn_down) is re-quantized to 8 bits. Re-quantizing all of it: 87.4%.
TOP1_FLOOR = 0.94


def test_mlx_on_the_q4_k_m_file_agrees_with_llama_cpp(gemma3_path):
    """edgeft's model of the file (as `edgeft tune` loads it) against llama.cpp on the same
    file: the next-token top-1 over >= 300 positions of real text, and the largest logit gap."""
    from edgeft import verify
    from edgeft.loader import load

    loaded = load(gemma3_path)
    ids_list = agreement_texts(loaded.tokenizer)
    theirs = verify.llama_cpp_logits(gemma3_path, ids_list)
    parity = verify.Parity(Path(gemma3_path), verify.precision_class(gemma3_path))
    for i, (ids, lc) in enumerate(zip(ids_list, theirs), 1):
        ours = verify.mlx_logits(loaded.model, ids)
        assert ours.shape == lc.shape == (len(ids), 262_144)
        agree = int((ours.argmax(-1) == lc.argmax(-1)).sum())
        parity.rows.append(verify.Row(str(i), len(ids), agree, float(abs(ours - lc).max())))
    print("\n" + parity.table())
    assert parity.positions >= 300
    assert parity.top1 >= TOP1_FLOOR, parity.table()
