"""Does a GGUF answer like the MLX model it came from? Run it in llama.cpp and compare.

A few fixed chats are rendered with the model's chat template and tokenized by edgeft; both
llama.cpp (through llama-cpp-python, on the GGUF) and MLX score every position, and we
compare the next-token distributions: how often the top-1 token agrees, and the largest
absolute logit difference.

Two MLX references, two questions:
- the file's own weights (gguf-py dequantizes them into an mlx-lm model): does llama.cpp
  run this file as edgeft means it (names, Q/K row order, metadata, tokenizer, adapter
  scale)? This figure gates the export.
- the tuned model (base + LoRA, fp32, as trained): how much did quantizing to this type
  cost? Shown in the "vs tuned" column.

Even on identical weights llama.cpp differs from MLX: it multiplies quantized weights
against 8-bit-quantized activations (f16 weights against f16 activations), so the bar
depends on the weight types (FACTS: a Q4_1 file agrees ~95% with MLX on its own weights;
measured on SmolLM2, every q8_0 disagreement sat at a top-2 gap under 0.25 logits):

    f32/f16/bf16   top-1 agreement >= 99%, else the export fails
    q8_0           >= 95%, else the export fails
    4/5/6-bit      reported; a warning below 85% (either figure)

    edgeft verify runs/brand/export/brand-q8_0.gguf
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft import system
from edgeft.errors import UserError

INSTALL_HINT = "pip install 'edgeft[llama]'"

FLOAT, Q8, LOW_BIT = "f16", "q8_0", "4-6 bit"
# precision class -> (minimum top-1 agreement, whether falling below fails the export)
THRESHOLDS = {FLOAT: (0.99, True), Q8: (0.95, True), LOW_BIT: (0.85, False)}
# The gate counts llama.cpp's pick as agreeing when MLX rates it within this share of the
# position's logit range (max - min over the vocabulary) of its own top token: a near-tie that
# either runtime's rounding can flip. Gemma 3 270M's own Q4_K_M file, its exact weights in fp32
# against llama.cpp: every one of the 5% disagreements was such a tie (MLX gaps of 0.01-0.36
# logits in a range of ~40, while llama.cpp's logits differ from MLX's by ~0.9 per position);
# a wrong convention moves the pick by whole logits.
NEAR_TIE = 0.01
FLOAT_TYPES = {"F32", "F16", "BF16"}

# Fixed chats: short, varied, none from any training file; each includes the answer so
# every kind of position (prompt, turn markers, reply) is compared.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."},
     {"role": "assistant", "content": "Red leaves drift and fall,\nwhispering to the cold ground:\nsummer says goodbye."}],
    [{"role": "user", "content": "How do I reverse a list in Python?"},
     {"role": "assistant", "content": "Use my_list[::-1] for a new list, or my_list.reverse() to reverse it in place."}],
    [{"role": "user", "content": "Hi! Can you recommend a book for a long flight?"},
     {"role": "assistant", "content": "Try \"The Martian\" by Andy Weir: funny, fast, and hard to put down."},
     {"role": "user", "content": "Thanks. Anything shorter?"},
     {"role": "assistant", "content": "\"Of Mice and Men\" by John Steinbeck is about 100 pages."}],
    [{"role": "user", "content": "Convert 37 degrees Celsius to Fahrenheit."},
     {"role": "assistant", "content": "37 C is 98.6 F (multiply by 9/5, then add 32)."}],
]


class VerifyError(UserError, RuntimeError):
    """Verification could not run (missing run, base or llama.cpp)."""


class LlamaCppMissing(VerifyError):
    def __init__(self, what: str = "verify a GGUF in llama.cpp"):
        super().__init__(f"llama-cpp-python is not installed: {INSTALL_HINT} to {what}")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llama_cpp(what: str = "verify a GGUF in llama.cpp"):
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing(what) from None
    return llama_cpp


_open_lock = threading.Lock()


def open_llama(path, **kwargs):
    """llama_cpp.Llama(path, **kwargs), the way edgeft opens every GGUF. On a CPU with AMX it
    turns off llama.cpp's extra weight buffers (use_extra_bufts): their AMX repacking segfaulted
    in decode on the test suite's small models (llama-cpp-python 0.3.36, Intel Xeon with AMX,
    also llama.cpp issue 20824). They only lay the same weights out for speed. llama-cpp-python
    does not take the setting, so its default parameters are wrapped while the model loads."""
    llama_cpp = require_llama_cpp()
    if "amx_int8" not in system.cpu_flags():
        return llama_cpp.Llama(str(path), **kwargs)
    from llama_cpp import llama as module

    defaults = module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    with _open_lock:
        module.llama_cpp.llama_model_default_params = params
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        finally:
            module.llama_cpp.llama_model_default_params = defaults


@dataclass
class Row:
    label: str
    positions: int
    agree: int  # with the reference holding the file's weights
    max_abs: float
    agree_tuned: int | None = None  # with the tuned model, when that is another model
    agree_near: int | None = None  # `agree`, plus near-ties (NEAR_TIE); None: as agree


@dataclass
class Parity:
    """The comparison of one GGUF (plus adapter) in llama.cpp with an MLX model."""

    file: Path
    kind: str  # precision class: FLOAT, Q8 or LOW_BIT
    rows: list[Row] = field(default_factory=list)
    lora: Path | None = None

    @property
    def positions(self) -> int:
        return sum(r.positions for r in self.rows)

    @property
    def top1(self) -> float:
        return sum(r.agree for r in self.rows) / max(self.positions, 1)

    @property
    def top1_near(self) -> float:
        """Top-1 agreement with near-ties (NEAR_TIE) counted as agreeing: what the gate reads."""
        near = sum(r.agree if r.agree_near is None else r.agree_near for r in self.rows)
        return near / max(self.positions, 1)

    @property
    def max_abs(self) -> float:
        return max((r.max_abs for r in self.rows), default=0.0)

    @property
    def top1_tuned(self) -> float | None:
        if any(r.agree_tuned is None for r in self.rows) or not self.rows:
            return None
        return sum(r.agree_tuned for r in self.rows) / max(self.positions, 1)

    @property
    def threshold(self) -> float:
        return THRESHOLDS[self.kind][0]

    @property
    def fatal(self) -> bool:
        return THRESHOLDS[self.kind][1]

    @property
    def passed(self) -> bool:
        """The gate: llama.cpp against MLX on the same weights, near-ties forgiven."""
        return self.top1_near >= self.threshold

    @property
    def warning(self) -> str | None:
        """For 4-6 bit files: either figure below the bar (the export is kept)."""
        if self.fatal:
            return None
        low = min(x for x in (self.top1_near, self.top1_tuned) if x is not None)
        if low >= self.threshold:
            return None
        return (f"{self.file.name} agrees with the MLX model on only {low:.1%} of next tokens "
                f"(bar {self.threshold:.0%} for {self.kind} weights); try --quant q8_0")

    def verdict(self) -> str:
        if not self.passed and self.fatal:
            return (f"FAILED: top-1 agreement {self.top1_near:.1%} (near-ties counted) is below "
                    f"{self.threshold:.0%} for {self.kind} weights")
        if self.warning:
            return f"warning: {self.warning}"
        return (f"ok: top-1 agreement {self.top1_near:.1%} (near-ties counted; {self.top1:.1%} strictly) "
                f">= {self.threshold:.0%} ({self.kind} weights)")

    def table(self) -> str:
        what = self.file.name + (f" + {self.lora.name}" if self.lora else "")
        tuned = self.top1_tuned is not None
        lines = [f"llama.cpp vs MLX: {what}",
                 f"  {'chat':<6}{'positions':>10}{'top-1 agree':>13}{'max |dlogit|':>14}"
                 + (f"{'vs tuned':>10}" if tuned else "")]

        def line(label, n, agree, max_abs, agree_tuned):
            extra = f"{agree_tuned / max(n, 1):>10.1%}" if tuned else ""
            return f"  {label:<6}{n:>10}{agree / max(n, 1):>13.1%}{max_abs:>14.3f}" + extra

        for r in self.rows:
            lines.append(line(r.label, r.positions, r.agree, r.max_abs, r.agree_tuned))
        lines.append(line("all", self.positions, sum(r.agree for r in self.rows), self.max_abs,
                          sum(r.agree_tuned or 0 for r in self.rows)))
        lines.append(f"  {self.verdict()}")
        return "\n".join(lines)


def precision_class(path: str | os.PathLike) -> str:
    """FLOAT, Q8 or LOW_BIT from the types of a GGUF's matrices (norms are always F32)."""
    from edgeft import gguf_reader as G

    index = G.read_index(path)
    types = {G.ggml_type_name(t.ggml_type) for t in index.tensors if len(t.shape) >= 2}
    if types <= FLOAT_TYPES:
        return FLOAT
    if types <= FLOAT_TYPES | {"Q8_0"}:
        return Q8
    return LOW_BIT


def prompt_ids(tokenizer, system_prompt: str | None = None) -> list[list[int]]:
    """The fixed chats as token ids, rendered with the model's template (with the run's
    system prompt when it has one and the template takes it)."""
    from edgeft.chat_encode import with_bos
    from edgeft.chat_template import TemplateError

    out = []
    for chat in CHATS:
        messages = chat
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *chat]
        try:
            text = tokenizer.render(messages)
        except TemplateError:
            text = tokenizer.render(chat)
        out.append(with_bos(tokenizer, tokenizer.encode(text)))  # as training sees it
    return out


def file_model(path):
    """An fp32 mlx-lm model holding exactly a GGUF's weights (gguf-py dequantizes every
    type, K-quants included), configured from the file's own metadata."""
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from edgeft import families as F
    from edgeft import gguf_reader as G
    from edgeft import rope_scaling as R
    from edgeft.loader import build_model, sanitized

    index = G.read_index(path, with_metadata=True)
    tensors, rope = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape(tuple(reversed([int(d) for d in t.shape])))
        if t.name in R.ROPE_TENSORS:
            rope[t.name] = a
        else:
            tensors[t.name] = mx.array(a)
    config = F.metadata_to_config(index.metadata, {t.name for t in index.tensors}, rope)
    model = build_model(config)
    arch = F.family(config["model_type"]).arch
    by_gguf = F.mlx_names_by_gguf((n for n, _ in tree_flatten(model.parameters())), arch)
    weights = {}
    for name, a in tensors.items():
        offset = F.norm_offset(by_gguf[name], arch)  # gemma norms are stored shifted
        weights[by_gguf[name]] = a - offset if offset else a
    weights = sanitized(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def with_lora_of(model, loaded):
    """`model` (an mlx-lm model on a GGUF's weights, llama.cpp row order) with the LoRA
    layers of `loaded.model` transplanted: what llama.cpp computes for base + adapter."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    from edgeft import families as F
    from edgeft.lora import lora_layers

    permute = F.needs_qk_permute(loaded.config, loaded.qk_layout)
    modules = dict(model.named_modules())
    swaps = []
    for name, layer in lora_layers(loaded.model):
        new = LoRALinear.from_base(modules[name], r=layer.lora_a.shape[1], scale=layer.scale)
        heads = F.qk_heads(f"{name}.weight", loaded.config) if permute else None
        b = layer.lora_b.astype(mx.float32)
        new.lora_a = layer.lora_a.astype(mx.float32)
        new.lora_b = mx.array(F.permute_qk(np.array(b).T, heads).T) if heads else b
        swaps.append((name, new))
    model.update_modules(tree_unflatten(swaps))
    return model


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(ids)[None]).astype(mx.float32))[0]


def llama_cpp_logits(path, ids_list: list[list[int]], lora=None) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each token list (one context, reset between)."""
    longest = max(len(ids) for ids in ids_list)
    n_ctx = max(256, 1 << (longest - 1).bit_length())
    try:
        llm = open_llama(
            path, lora_path=None if lora is None else str(lora), n_ctx=n_ctx,
            n_batch=n_ctx, logits_all=True, verbose=False, n_threads=max(1, min(4, os.cpu_count() or 1)),
        )
    except (ValueError, RuntimeError) as e:
        what = f"{path}" + (f" with adapter {lora}" if lora else "")
        raise VerifyError(f"llama.cpp cannot load {what} ({e})") from e
    try:
        out = []
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()


def compare(path, model, tokenizer, *, lora=None, system_prompt: str | None = None,
            kind: str | None = None, tuned=None) -> Parity:
    """llama.cpp on `path` (plus `lora`) against the MLX `model`, over the fixed chats;
    `tuned`, if given, is a second MLX model whose top-1 agreement is reported too.

    `kind` (precision class) defaults to that of `path`: for an adapter, the base's."""
    ids_list = prompt_ids(tokenizer, system_prompt)
    theirs = llama_cpp_logits(path, ids_list, lora)
    parity = Parity(Path(path), kind or precision_class(path), lora=None if lora is None else Path(lora))
    for i, (ids, lc) in enumerate(zip(ids_list, theirs), 1):
        ours = mlx_logits(model, ids)
        v = min(ours.shape[-1], lc.shape[-1])
        ours, lc = ours[:, :v], lc[:, :v]
        row = Row(str(i), len(ids), int((ours.argmax(-1) == lc.argmax(-1)).sum()), float(np.abs(ours - lc).max()),
                  agree_near=near_ties(ours, lc))
        if tuned is not None:
            row.agree_tuned = int((mlx_logits(tuned, ids)[:, :v].argmax(-1) == lc.argmax(-1)).sum())
        parity.rows.append(row)
    return parity


def near_ties(ours: np.ndarray, theirs: np.ndarray) -> int:
    """Positions where MLX (`ours`, [T, V] logits) rates llama.cpp's top token within NEAR_TIE
    of the logit range of its own top token (exact agreement included)."""
    pick = theirs.argmax(-1)
    top = ours.max(-1)
    rated = np.take_along_axis(ours, pick[:, None], axis=-1)[:, 0]
    return int((top - rated <= NEAR_TIE * (top - ours.min(-1))).sum())


# --- `edgeft verify FILE` ------------------------------------------------------------------
def verify_file(path, run_dir=None, base=None, *, log: Callable[[str], None]) -> Parity:
    """Verify a GGUF made by `edgeft export` (merged model or LoRA adapter) in llama.cpp.

    A merged file is compared with MLX on its own weights, and with the run's tuned model
    (`run_dir`, or found from the file's place) when there is one. An adapter is compared
    with its run's base + adapters, on its base GGUF: `base`, the run's base if that is a
    GGUF, or the *-base-*.gguf exported beside it for folder bases.
    """
    from gguf import Keys

    from edgeft import gguf_reader as G
    from edgeft import lora, runs

    path = Path(path)
    md = G.read_index(path, with_metadata=True).metadata
    is_adapter = G.scalar(md.get(Keys.General.TYPE)) == "adapter"
    run_dir = Path(run_dir) if run_dir else runs.find_run(path)
    require_llama_cpp()
    if run_dir is None:
        if is_adapter:
            raise VerifyError(f"{path}: an adapter is checked against its run: pass --run RUN_DIR")
        log(f"no run found for {path.name}: comparing llama.cpp with MLX on the file's weights only")
        return compare(path, file_model(path), runs.load_model(path, False, tokenizer_only=True).tokenizer)
    loaded, cfg = runs.load_tuned(run_dir)
    system = cfg.data.system_prompt
    if not is_adapter:
        lora.merge(loaded.model)
        return compare(path, file_model(path), loaded.tokenizer, system_prompt=system, tuned=loaded.model)
    if base is None:
        if loaded.fmt == "gguf":
            base = loaded.path
        else:
            found = sorted(path.parent.glob("*-base-*.gguf"))
            if len(found) != 1:
                raise VerifyError(f"{path}: cannot tell which base GGUF it applies to: pass --base BASE.gguf")
            base = found[0]
    reference = with_lora_of(file_model(base), loaded)
    return compare(base, reference, loaded.tokenizer, lora=path, system_prompt=system,
                   kind=precision_class(base), tuned=loaded.model)
