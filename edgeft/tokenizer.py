"""Tokenizers rebuilt from GGUF metadata or read from a Hugging Face folder.

GGUF `tokenizer.ggml.model == "gpt2"` becomes a byte-level BPE in the `tokenizers` library with
llama.cpp's pre-tokenizer regex for `tokenizer.ggml.pre`; `"llama"` becomes a SentencePiece
model built from the token/score/type lists. Chat templates render in edgeft.chat_template's
sandbox: the model's own, or one given in its place (use_chat_template), whose end-of-turn
token becomes a stop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from gguf import Keys, TokenType

from edgeft import gguf_reader as G
from edgeft.chat_template import (
    END_OF_TURN_TOKENS,
    TemplateError,
    builtin_names,
    render_template,
)
from edgeft.gguf_reader import ModelLoadError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre. Applied in
# order, each splitting the pieces the previous one left.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES = {
    "gpt2": (_GPT2_REGEX,),
    "smollm": (r"\p{N}", _GPT2_REGEX),
    "llama3": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
}
PRE_TOKENIZER_ALIASES = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm", "command-r": "smollm",
    "codeshell": "smollm", "exaone": "smollm",
    "llama-bpe": "llama3", "llama3": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
# llama.cpp matches whole words against the vocabulary before merging for these
IGNORE_MERGES_PRE = {"llama3"}


# --- backends: text <-> ids without special-token handling -------------------------------
class _HFBackend:
    """A `tokenizers.Tokenizer`; it splits special tokens out of text itself."""

    def __init__(self, tk):
        self.tk = tk

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tk.token_to_id(s)


class _SPBackend:
    """SentencePiece; special and user-defined tokens are split out here (longest first at
    each position), as llama.cpp does for SPM vocabs."""

    def __init__(self, sp, specials: dict[str, int]):
        self.sp = sp
        self.specials = specials
        self._split = re.compile("(" + longest_match_regex(specials) + ")") if specials else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        out: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self.specials[part])
            elif part:
                out.extend(self.sp.encode(part))
        return out

    def decode(self, ids: list[int]) -> str:
        # SentencePiece renders control pieces as "" and the unknown one as " ⁇ ": keep their
        # text, as llama.cpp does, and decode the runs between.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append(self.sp.decode(run) if run else "")
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run) if run else "")
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    def token_to_id(self, s: str) -> int | None:
        if s in self.specials:
            return self.specials[s]
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.sp.id_to_piece(i) else i


def longest_match_regex(words: Iterable[str]) -> str:
    """A regex matching the longest of `words` at a position, as a trie: re tries alternatives
    one by one, so a flat one over Gemma's 6,400 specials costs that many tries at every space."""
    trie: dict = {}
    for w in filter(None, words):  # "" would match everywhere
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def branch(node: dict) -> str:
        out = ""
        while len(node) == 1 and "" not in node:  # a chain: one literal, no nesting
            (ch, node), = node.items()
            out += re.escape(ch)
        alts = [re.escape(ch) + branch(child) for ch, child in node.items() if ch]
        if alts:
            out += "(?:" + "|".join(alts) + (")?" if "" in node else ")")
        return out

    return branch(trie)


# --- the tokenizer -----------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids for one model, with its specials and chat template."""

    def __init__(self, backend, *, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, special_ids: Iterable[int], extra_stop_ids: Iterable[int] = (),
                 chat_template: str | None = None):
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, bool(add_bos)
        self.special_ids = set(special_ids)  # control tokens: skipped by decode(skip_special)
        self.chat_template = chat_template  # the model's own until use_chat_template
        self.chat_template_name: str | None = None  # a built-in's name or a file, when given
        self.end_of_turn_id: int | None = None  # that template's end-of-turn token
        stops = {eos_id, *extra_stop_ids}
        stops.update(self.token_to_id(t) for t in END_OF_TURN_TOKENS)
        self.stop_ids = {i for i in stops if i is not None}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it (e.g. "<|im_start|>") become their ids."""
        ids = self._backend.encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    def is_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary and encodes as that token (after
        SentencePiece's dummy prefix, if it adds one)."""
        i = self.token_to_id(text)
        return i is not None and self.encode(text)[-1:] == [i]

    def use_chat_template(self, template: str, name: str, end_of_turn: str | None) -> None:
        """Render chats with `template` (`name`: a built-in's or a file) in place of the model's
        own; its `end_of_turn` token, when one of the vocabulary, ends every assistant turn and
        stops generation."""
        self.chat_template, self.chat_template_name = template, name
        self.end_of_turn_id = self.token_to_id(end_of_turn) if end_of_turn and self.is_token(end_of_turn) else None
        if self.end_of_turn_id is not None:
            self.stop_ids.add(self.end_of_turn_id)

    def template_context(self) -> dict:
        """The special tokens a chat template is given as text."""
        tok = lambda i: (self.id_to_token(i) or "") if i is not None else ""  # noqa: E731
        return {"bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id)}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **context) -> str:
        """The conversation as text, through the chat template."""
        if self.chat_template is None:
            raise TemplateError(f"the model has no chat template: give one with --chat-template "
                                f"(built-in: {builtin_names()}) or a FILE.jinja")
        return render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               **self.template_context(), **context)

    # --- constructors ---
    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "Tokenizer":
        kind = G.scalar(md.get(Keys.Tokenizer.MODEL))
        tokens = list(md.get(Keys.Tokenizer.LIST) or [])
        if not tokens:
            raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens: no tokenizer to load")
        types = G.as_list(md.get(Keys.Tokenizer.TOKEN_TYPE)) or [TokenType.NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _bpe_from_gguf(md, tokens, types)
            default_add_bos = False
        elif kind == "llama":
            backend = _spm_from_gguf(md, tokens, types)
            default_add_bos = True
        else:
            raise ModelLoadError(
                f"tokenizer model {kind!r} is not supported (gpt2 byte-level BPE, llama SentencePiece)"
            )
        get = lambda k: G.scalar(md.get(k))  # noqa: E731
        add_bos = get(Keys.Tokenizer.ADD_BOS)
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_id=_opt_int(get(Keys.Tokenizer.BOS_ID)),
            eos_id=_opt_int(get(Keys.Tokenizer.EOS_ID)),
            add_bos=default_add_bos if add_bos is None else bool(add_bos),
            special_ids=[i for i, t in enumerate(types) if t == TokenType.CONTROL],
            extra_stop_ids=[i for i in [_opt_int(get(Keys.Tokenizer.EOT_ID))] if i is not None],
            chat_template=get(Keys.Tokenizer.CHAT_TEMPLATE),
        )

    @classmethod
    def from_folder(cls, path) -> "Tokenizer":
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exception subclasses
                raise ModelLoadError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from e
            backend = _HFBackend(tk)
            vocab_size = tk.get_vocab_size(with_added_tokens=True)
            special_ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        elif (path / "tokenizer.model").is_file():
            backend, vocab_size, special_ids = _spm_from_file(path / "tokenizer.model")
        else:
            raise ModelLoadError(f"{path}: no tokenizer.json or tokenizer.model in the folder")
        bos_id = _folder_token_id(backend, cfg.get("bos_token"), gen.get("bos_token_id"))
        eos_id = _folder_token_id(backend, cfg.get("eos_token"), gen.get("eos_token_id"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds_bos(backend, bos_id)
        gen_eos = gen.get("eos_token_id")
        return cls(
            backend,
            vocab_size=vocab_size,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos,
            special_ids=special_ids,
            extra_stop_ids=gen_eos if isinstance(gen_eos, list) else [],
            chat_template=_folder_chat_template(path, cfg),
        )


# --- GGUF builders -----------------------------------------------------------------------
def pre_tokenizer_regexes(pre: str | None) -> tuple[str, ...]:
    """llama.cpp's split regexes for a tokenizer.ggml.pre name (GPT-2's when unknown)."""
    return PRE_TOKENIZER_REGEXES[PRE_TOKENIZER_ALIASES.get(pre or "default", "gpt2")]


def _bpe_from_gguf(md: dict, tokens: list[str], types: list[int]) -> _HFBackend:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in md.get(Keys.Tokenizer.MERGES) or []]
    pre = G.scalar(md.get(Keys.Tokenizer.PRE))
    family = PRE_TOKENIZER_ALIASES.get(pre or "default", "gpt2")
    try:
        tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=family in IGNORE_MERGES_PRE))
    except Exception as e:
        raise ModelLoadError(f"GGUF BPE tokenizer is inconsistent (vocab/merges): {e}") from e
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre_tokenizer_regexes(pre)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types) if t == TokenType.CONTROL and tokens[i]
    ])
    tk.add_tokens([
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types) if t == TokenType.USER_DEFINED and tokens[i]
    ])
    return _HFBackend(tk)


def _spm_from_gguf(md: dict, tokens: list[str], types: list[int]) -> _SPBackend:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = G.as_list(md.get(Keys.Tokenizer.SCORES)) or [0.0] * len(tokens)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = TokenType.BYTE in types
    unk = _opt_int(G.scalar(md.get(Keys.Tokenizer.UNK_ID)))
    if unk is None:
        unk = types.index(TokenType.UNKNOWN) if TokenType.UNKNOWN in types else 0
    m.trainer_spec.unk_id = unk
    for key, field in ((Keys.Tokenizer.BOS_ID, "bos_id"), (Keys.Tokenizer.EOS_ID, "eos_id"),
                       (Keys.Tokenizer.PAD_ID, "pad_id")):
        setattr(m.trainer_spec, field, _opt_int(G.scalar(md.get(key))) if md.get(key) is not None else -1)
    add_prefix = G.scalar(md.get(Keys.Tokenizer.ADD_PREFIX))
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True if add_prefix is None else bool(add_prefix)
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    kinds = [t if t in (1, 3, 4, 5, 6) else pb.ModelProto.SentencePiece.NORMAL for t in types]
    if 0 <= unk < len(kinds):
        kinds[unk] = pb.ModelProto.SentencePiece.UNKNOWN
    add = m.pieces.add  # one call per piece: Gemma has 262,144 of them
    for piece, score, kind in zip(tokens, scores, kinds):
        add(piece=piece, score=float(score), type=kind)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(m.SerializeToString())
    except Exception as e:
        raise ModelLoadError(f"GGUF SentencePiece vocabulary is inconsistent: {e}") from e
    # llama.cpp splits these out of the raw text before SentencePiece sees it; SentencePiece
    # would match user-defined ones only after escaping spaces, so Gemma's "  " never would.
    split = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    specials = {tokens[i]: i for i, t in enumerate(types) if t in split and tokens[i]}
    return _SPBackend(sp, specials)


def _spm_from_file(path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    control = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i)}
    return _SPBackend(sp, control), n, set(control.values())


# --- HF folder helpers -------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _folder_token_id(backend, token, fallback) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and (i := backend.token_to_id(token)) is not None:
        return i
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return _opt_int(fallback)


def _post_processor_adds_bos(backend, bos_id) -> bool:
    """HF folders without add_bos_token say it through tokenizer.json's post-processor."""
    if bos_id is None or not isinstance(backend, _HFBackend):
        return isinstance(backend, _SPBackend) and bos_id is not None
    with_specials = backend.tk.encode("a", add_special_tokens=True).ids
    return with_specials[:1] == [bos_id] and backend.encode("a")[:1] != [bos_id]


def _folder_chat_template(path: Path, cfg: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template
