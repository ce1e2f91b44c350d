"""Ship a run as GGUF: the merged model, or a LoRA adapter for llama.cpp, plus a Modelfile.

    edgeft export runs/brand                     # runs/brand/export/brand-q8_0.gguf
    edgeft export runs/brand --quant q4_k_m      # K-quants through llama.cpp's quantizer
    edgeft export runs/brand --adapter           # runs/brand/export/brand-lora.gguf

Merged: the base is dequantized, the LoRA delta added in fp32 (edgeft.lora.merge), and the
result written with gguf-py (f16, bf16, q8_0, q4_0, q4_1) or written as f16 to a temporary
file and quantized by llama.cpp's own `llama_model_quantize` (q4_k_m, q5_k_m, q6_k).

Adapter: llama.cpp's LoRA format (convert_lora_to_gguf.py, src/llama-adapter.cpp):
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted
base tensor `<name>.lora_a` (rows = rank, ggml ne = [in, rank]) and `<name>.lora_b`
(ggml ne = [rank, out]); llama.cpp adds `scale * lora_b @ (lora_a @ x)` with scale =
alpha / rank * the user's scale. mlx-lm's layers hold lora_a (in, rank) and lora_b
(rank, out) and add `s * (x @ lora_a) @ lora_b`, so the file holds their transposes and
alpha = s * rank. The tensor names are the base GGUF's, so the adapter applies to that very
file; for a folder base the base itself is exported beside the adapter.

Q/K rows: llama.cpp stores llama-family Q and K rows permuted for its RoPE. A base read
from a llama GGUF already has them so (Loaded.qk_layout "gguf"), and so do the adapter's
lora_b rows; from a Hugging Face folder ("hf") they are permuted on the way out.

Every file is written to a temporary name, checked in llama.cpp (edgeft.verify), and only
then renamed into place, so a failed export leaves nothing half-written.

Names and row order come from edgeft.families, a folder base's metadata from
edgeft.hf_metadata; edgeft.gguf_writer writes the bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import Keys

from edgeft import families as F
from edgeft import modelfile as MF
from edgeft import rope_scaling as R
from edgeft import runs
from edgeft import verify as V
from edgeft.config import LLAMA_CPP_QUANTS, QUANTS
from edgeft.dequant import dequantized_weight
from edgeft.errors import UserError
from edgeft.files import atomic_write_text, staged
from edgeft.gguf_reader import scalar
from edgeft.gguf_writer import TensorSpec, file_type, write_gguf
from edgeft.hf_metadata import folder_metadata

INTERMEDIATE = "f16"  # what llama.cpp's quantizer starts from

# The exported model names one base model (index 0): the one it was tuned from.
BASE_MODEL_PREFIX = Keys.General.BASE_MODEL_NAME.partition("{id}")[0]  # general.base_model.
BASE_MODEL_NAME = Keys.General.BASE_MODEL_NAME.format(id=0)
# Keys of a base GGUF that an export never copies: they describe the file, not the model.
NOT_COPIED = {Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION, Keys.General.ALIGNMENT}
NOT_COPIED_PREFIXES = ("split.", BASE_MODEL_PREFIX)


class ExportError(UserError, ValueError):
    """An export that cannot be made or did not pass verification; one line says why."""


@dataclass
class ExportResult:
    gguf: Path  # the merged model, or the adapter
    modelfile: Path
    quant: str
    adapter: bool
    base: Path | None = None  # the GGUF the adapter applies to
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    parity: V.Parity | None = None  # None: llama.cpp not installed or verify=False
    seconds: float = 0.0

    def summary(self) -> str:
        """Files, sizes, verdict and time (the parity table itself went to `log`)."""
        lines = [f"{'adapter' if self.adapter else 'GGUF':11}{self.gguf}  ({_mb(self.sizes.get(self.gguf.name, 0))})"]
        if self.base is not None:
            lines.append(f"{'base':11}{self.base}  ({_mb(self.sizes.get(self.base.name, self.base.stat().st_size))})")
        lines.append(f"{'Modelfile':11}{self.modelfile}")
        if self.parity is not None:
            lines.append(f"{'llama.cpp':11}{self.parity.verdict()}")
        lines.append(f"exported in {self.seconds:.1f} s")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_quant(quant: str) -> str:
    q = (quant or "").lower()
    if q not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return q


# --- tensors ---------------------------------------------------------------------------------
def model_tensors(model, config: dict, qk_layout: str) -> list[TensorSpec]:
    """Every tensor of the base GGUF for `model` (LoRA layers seen through to their base,
    quantized layers dequantized), in llama.cpp's names and row order; computed lazily."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    modules = dict(model.named_modules())
    permute = F.needs_qk_permute(config, qk_layout)
    arch = F.family(config["model_type"]).arch
    specs = []
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        if leaf in ("lora_a", "lora_b") or (quantized and leaf in ("scales", "biases")):
            continue
        base_owner = owner
        if owner.endswith(".linear") and isinstance(modules.get(owner[: -len(".linear")]), LoRALinear):
            base_owner = owner[: -len(".linear")]
        mlx_name = f"{base_owner}.{leaf}"
        gguf_name = F.mlx_to_gguf_name(mlx_name, arch)
        if gguf_name is None:
            raise ExportError(f"tensor {mlx_name} has no GGUF name; this model cannot be exported")
        shape = tuple(value.shape)
        if quantized and leaf == "weight":
            shape = (shape[0], shape[1] * 32 // module.bits)
        heads = F.qk_heads(mlx_name, config) if permute else None
        offset = F.norm_offset(mlx_name, arch)

        def get(value=value, module=module if quantized and leaf == "weight" else None, heads=heads, offset=offset):
            w = dequantized_weight(module) if module is not None else value
            w = np.array(w.astype(mx.float32))
            w = w + offset if offset else w
            return F.permute_qk(w, heads) if heads else w

        specs.append(TensorSpec(gguf_name, shape, get))
    for name, tensor in R.rope_tensors(config).items():
        specs.append(TensorSpec(name, tensor.shape, lambda tensor=tensor: tensor))
    return specs


def adapter_tensors(model, config: dict, qk_layout: str) -> tuple[list[TensorSpec], float]:
    """The LoRA layers as llama.cpp adapter tensors, and the adapter's alpha."""
    import mlx.core as mx

    from edgeft.lora import lora_layers

    permute = F.needs_qk_permute(config, qk_layout)
    arch = F.family(config["model_type"]).arch
    specs, alphas = [], set()
    for name, layer in lora_layers(model):
        base = F.mlx_to_gguf_name(f"{name}.weight", arch)
        if base is None:
            raise ExportError(f"LoRA layer {name} has no GGUF tensor name; cannot export it")
        a = np.array(layer.lora_a.astype(mx.float32)).T  # (rank, in)
        b = np.array(layer.lora_b.astype(mx.float32)).T  # (out, rank)
        heads = F.qk_heads(f"{name}.weight", config) if permute else None
        if heads:
            b = F.permute_qk(b, heads)
        alphas.add(float(np.float32(layer.scale * a.shape[0])))
        specs.append(TensorSpec(f"{base}.lora_a", a.shape, lambda a=a: a))
        specs.append(TensorSpec(f"{base}.lora_b", b.shape, lambda b=b: b))
    if not specs:
        raise ExportError("the run has no LoRA layers to export")
    if len(alphas) != 1:
        raise ExportError(f"LoRA layers use different scales ({sorted(alphas)}); one adapter file needs one")
    return specs, alphas.pop()


@contextlib.contextmanager
def _quiet():
    """Silence llama.cpp's C-level logging (it writes to the process's stderr)."""
    try:
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:
        yield
        return
    with suppress_stdout_stderr(disable=False):
        yield


def llama_quantize(src, dst, quant: str) -> None:
    """K-quantize `src` (an f16/f32 GGUF) into `dst` with llama.cpp's own quantizer."""
    llama_cpp = V.require_llama_cpp(f"write {quant} (K-quants come from llama.cpp's quantizer)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = os.cpu_count() or 1
    with _quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")


# --- metadata --------------------------------------------------------------------------------
def model_metadata(loaded, run_name: str, quant: str, system_prompt: str | None = None, *,
                   log: Callable[[str], None]) -> dict:
    """GGUF metadata of an export: a GGUF base's keys copied (all but the file-describing
    ones and the labels), or built from a folder's config and tokenizer; then the fine-tune
    labels, the file type, the run's chat template when it is not the base's own (with its
    end-of-turn token as EOS and EOT, so llama.cpp stops where the model learned to), and, if
    set, the recipe's system prompt as the template default."""
    if loaded.gguf_metadata is not None:
        md = {k: v for k, v in loaded.gguf_metadata.items()
              if k not in NOT_COPIED and not k.startswith(NOT_COPIED_PREFIXES)}
    else:
        md = folder_metadata(loaded)
    base_name = scalar(md.get(Keys.General.NAME)) or Path(loaded.path).stem
    md[Keys.General.NAME] = f"{base_name} {run_name}"
    md[Keys.General.FINETUNE] = run_name
    md[Keys.General.BASE_MODEL_COUNT] = np.uint32(1)
    md[BASE_MODEL_NAME] = base_name
    for key, to in ((Keys.General.ORGANIZATION, Keys.General.BASE_MODEL_ORGANIZATION),
                    (Keys.General.REPO_URL, Keys.General.BASE_MODEL_REPO_URL)):
        if md.get(key) is not None:
            md[to.format(id=0)] = md[key]
    md[Keys.General.FILE_TYPE] = np.uint32(file_type(quant))
    if quant not in ("f32", "f16", "bf16"):
        md[Keys.General.QUANTIZATION_VERSION] = np.uint32(gguf.GGML_QUANT_VERSION)
    tok = loaded.tokenizer
    if tok.chat_template_name is not None:
        md[Keys.Tokenizer.CHAT_TEMPLATE] = tok.chat_template
        if tok.end_of_turn_id is not None:
            md[Keys.Tokenizer.EOS_ID] = md[Keys.Tokenizer.EOT_ID] = np.uint32(tok.end_of_turn_id)
    template = scalar(md.get(Keys.Tokenizer.CHAT_TEMPLATE))
    if system_prompt:
        if template and MF.supports_system(template):
            md[Keys.Tokenizer.CHAT_TEMPLATE] = MF.with_default_system(template, system_prompt)
        elif template:
            log("note: the chat template takes no system message; the recipe's system prompt is not built in")
    return md


def adapter_metadata(loaded, run_name: str, alpha: float) -> dict:
    arch = F.family(loaded.config["model_type"]).arch
    base_md = loaded.gguf_metadata or {}
    base_name = scalar(base_md.get(Keys.General.NAME)) or Path(loaded.path).stem
    return {
        Keys.General.ARCHITECTURE: arch,
        Keys.General.TYPE: "adapter",
        Keys.Adapter.TYPE: "lora",
        Keys.Adapter.LORA_ALPHA: np.float32(alpha),
        Keys.General.NAME: f"{base_name} {run_name} LoRA",
        Keys.General.FINETUNE: run_name,
        Keys.General.BASE_MODEL_COUNT: np.uint32(1),
        BASE_MODEL_NAME: base_name,
    }


# --- the run -> files ------------------------------------------------------------------------
def default_path(run_dir: Path, quant: str, adapter: bool) -> Path:
    name = Path(run_dir).resolve().name
    return Path(run_dir) / runs.EXPORT / (f"{name}-lora.gguf" if adapter else f"{name}-{quant}.gguf")


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")


def export_run(run_dir, quant: str | None = None, out=None, adapter: bool = False, verify: bool = True, *,
               log: Callable[[str], None]) -> ExportResult:
    """Export a finished run (its base + adapters) as GGUF of type `quant` (default: the run's
    export.quant), check it in llama.cpp, and write an Ollama Modelfile beside it. See the
    module docstring for the formats."""
    tic = time.perf_counter()
    run_dir = Path(run_dir)
    quant = check_quant(quant or runs.read_run_config(run_dir).export.quant)
    loaded, cfg = runs.load_tuned(run_dir)
    run_name = run_dir.resolve().name
    out = Path(out) if out else default_path(run_dir, quant, adapter)
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: the file name must end in .gguf")
    if verify and not V.llama_cpp_available():
        if quant in LLAMA_CPP_QUANTS:
            V.require_llama_cpp(f"write {quant}")
        log(f"llama.cpp check skipped: llama-cpp-python is not installed ({V.INSTALL_HINT} to enable it)")
        verify = False
    system = cfg.data.system_prompt
    if adapter:
        result = _export_adapter(loaded, run_name, quant, out, verify, system, cfg.generate, log)
    else:
        result = _export_merged(loaded, run_name, quant, out, verify, system, cfg.generate, log)
    result.seconds = time.perf_counter() - tic
    return result


def _check(parity: V.Parity, log) -> None:
    log(parity.table())
    if parity.fatal and not parity.passed:
        raise ExportError(f"{parity.file.name}: {parity.verdict()}; nothing was written")


def _export_merged(loaded, run_name, quant, out, verify, system, generation, log) -> ExportResult:
    from edgeft import lora

    arch = F.family(loaded.config["model_type"]).arch
    md = model_metadata(loaded, run_name, quant, system, log=log)
    lora.merge(loaded.model)
    tensors = model_tensors(loaded.model, loaded.config, loaded.qk_layout)
    parity = None
    with staged([out]) as (tmp,):
        if quant in LLAMA_CPP_QUANTS:
            log(f"writing {INTERMEDIATE} intermediate, then llama.cpp quantizes it to {quant}")
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".edgeft-export-") as td:
                inter = Path(td) / f"intermediate-{INTERMEDIATE}.gguf"
                write_gguf(inter, arch, {**md, Keys.General.FILE_TYPE: np.uint32(file_type(INTERMEDIATE))},
                           tensors, INTERMEDIATE)
                llama_quantize(inter, tmp, quant)
        else:
            log(f"writing {quant} GGUF")
            write_gguf(tmp, arch, md, tensors, quant)
        if verify:
            parity = V.compare(tmp, V.file_model(tmp), loaded.tokenizer, system_prompt=system,
                               tuned=loaded.model)
            parity.file = out
            _check(parity, log)
    mf = MF.build(f"./{out.name}", scalar(md.get(Keys.Tokenizer.CHAT_TEMPLATE)), system,
                  MF.stop_strings(loaded.tokenizer), comment=f"ollama create {run_name} -f {modelfile_path(out).name}",
                  generation=generation)
    atomic_write_text(modelfile_path(out), mf.text)
    return ExportResult(out, modelfile_path(out), quant, False, sizes={out.name: out.stat().st_size},
                        parity=parity)


def _export_adapter(loaded, run_name, quant, out, verify, system, generation, log) -> ExportResult:
    arch = F.family(loaded.config["model_type"]).arch
    specs, alpha = adapter_tensors(loaded.model, loaded.config, loaded.qk_layout)
    md = adapter_metadata(loaded, run_name, alpha)
    targets = [out]
    base_out = None
    if loaded.fmt != "gguf":
        if quant in LLAMA_CPP_QUANTS:
            raise ExportError("a folder base is exported beside its adapter as f16, bf16, q8_0, q4_0 or q4_1")
        base_out = out.with_name(f"{run_name}-base-{quant}.gguf")
        targets.append(base_out)
    parity = None
    with staged(targets) as tmps:
        log(f"writing LoRA adapter GGUF (alpha {alpha:g}, {len(specs) // 2} tensor pairs)")
        write_gguf(tmps[0], arch, md, specs, "f32")
        if base_out is not None:
            log(f"the base is a folder: writing it as {base_out.name} for the adapter to apply to")
            base_md = model_metadata(loaded, run_name, quant, None, log=log)
            base_md[Keys.General.NAME], base_md[Keys.General.FINETUNE] = scalar(base_md[BASE_MODEL_NAME]), None
            base_md = {k: v for k, v in base_md.items() if v is not None and not k.startswith(BASE_MODEL_PREFIX)}
            write_gguf(tmps[1], arch, base_md, model_tensors(loaded.model, loaded.config, loaded.qk_layout), quant)
        base_path = tmps[1] if base_out is not None else Path(loaded.path)
        if verify:
            reference = V.with_lora_of(V.file_model(base_path), loaded)
            parity = V.compare(base_path, reference, loaded.tokenizer, lora=tmps[0], system_prompt=system,
                               kind=V.precision_class(base_path), tuned=loaded.model)
            parity.file, parity.lora = base_out or Path(loaded.path), out
            _check(parity, log)
    base_final = base_out or Path(loaded.path)
    template = loaded.tokenizer.chat_template
    if system and not (template is None or MF.supports_system(template)):
        system = None
    mf = MF.build(MF.relative_or_absolute(base_final, out.parent), template, system,
                  MF.stop_strings(loaded.tokenizer), adapter=f"./{out.name}",
                  comment=f"ollama create {run_name} -f {modelfile_path(out).name}", generation=generation)
    atomic_write_text(modelfile_path(out), mf.text)
    sizes = {out.name: out.stat().st_size, base_final.name: base_final.stat().st_size}
    return ExportResult(out, modelfile_path(out), quant, True, base=base_final, sizes=sizes, parity=parity)
