"""Ollama Modelfiles for exported GGUF files: FROM, TEMPLATE, SYSTEM, PARAMETER stop, and
the generation settings edgeft chat and edgeft eval use (repeat penalty, reply length).

Ollama renders prompts with Go's text/template, not Jinja, so the model's chat template is
translated by family, detected from the template text as llama.cpp detects it: ChatML
(``<|im_start|>``), Llama 3 (``<|start_header_id|>``), Llama 2 (``[INST]`` with ``<<SYS>>``),
Mistral v3 (``[INST]`` with ``[AVAILABLE_TOOLS]``: no spaces inside the tags, edgeft's built-in
mistral), Mistral (other ``[INST]``), Phi-3 (``<|assistant|>`` with ``<|end|>``) and Gemma
(``<start_of_turn>``). Each Go template renders the same text as the family's usual Hugging
Face template (and edgeft's built-in one) for plain system/user/assistant chats, minus the
leading BOS that llama.cpp adds itself when the GGUF says ``add_bos_token``
(tests/test_export.py checks this with Go when it is installed). Variants a family's template
may add (tool calls, Llama 3.1's date header) are not reproduced, nor Jinja's trimming of
answers (Gemma, Mistral v3) that begin or end with spaces.

Ollama semantics the templates rely on: ``.System`` holds all system messages joined (the
Modelfile's SYSTEM when the request has none), and ``.Messages`` still contains them, so
each loop skips the ``system`` role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgeft.chat_template import TemplateError, render_template
from edgeft.config import GenerateConfig

CHATML, LLAMA3, LLAMA2, MISTRAL, MISTRAL_V3, PHI3, GEMMA = (
    "chatml", "llama3", "llama2", "mistral", "mistral-v3", "phi3", "gemma")

GO_TEMPLATES = {
    CHATML: (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}"
        "{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "{{- end }}<|im_start|>assistant\n"
    ),
    LLAMA3: (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}"
        "{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Llama 2 chat: BOS opens every user turn (llama.cpp adds the first one), the system
    # prompt sits inside the first [INST].
    LLAMA2: (
        "{{- $first := true }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}{{ if not $first }}<s>{{ end }}[INST] "
        "{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
        "{{ .Content }} [/INST]{{ $first = false }}"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }} </s>"
        "{{- end }}"
        "{{- end }}"
    ),
    MISTRAL: (
        "{{- $first := true }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}[INST] "
        "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}"
        "{{ .Content }} [/INST]{{ $first = false }}"
        "{{- else if eq .Role \"assistant\" }}{{ .Content }}</s>"
        "{{- end }}"
        "{{- end }}"
    ),
    # the system prompt opens the first user turn, as llama.cpp's mistral-v3 writes it
    MISTRAL_V3: (
        "{{- $first := true }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}[INST] "
        "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}"
        "{{ .Content }}[/INST]{{ $first = false }}"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>"
        "{{- end }}"
        "{{- end }}"
    ),
    PHI3: (
        "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{- range .Messages }}"
        "{{- if ne .Role \"system\" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}"
        "{{- end }}<|assistant|>\n"
    ),
    # Gemma has no system turn: the system prompt opens the first user turn.
    GEMMA: (
        "{{- $first := true }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}"
        "{{ .Content }}<end_of_turn>\n{{ $first = false }}"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
        "{{ end }}"
        "{{- end }}<start_of_turn>model\n"
    ),
}
# Tokens that end the assistant's turn (Ollama stops at EOS by itself as well).
STOPS = {
    CHATML: ["<|im_end|>", "<|im_start|>"],
    LLAMA3: ["<|eot_id|>", "<|start_header_id|>"],
    LLAMA2: ["[INST]", "</s>"],
    MISTRAL: ["[INST]", "</s>"],
    MISTRAL_V3: ["[INST]", "</s>"],
    PHI3: ["<|end|>", "<|user|>", "<|assistant|>"],
    GEMMA: ["<end_of_turn>", "<start_of_turn>"],
}
# Where a family's template writes a system turn: (start, end) around its content.
SYSTEM_BLOCKS = {
    CHATML: ("<|im_start|>system\n", "<|im_end|>"),
    LLAMA3: ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
}


def detect_family(template: str | None) -> str | None:
    """The chat family of a Jinja chat template, from its text, in llama.cpp's order
    (llama-chat.cpp); None if not recognized."""
    if not template:
        return None
    if "<|im_start|>" in template:
        return CHATML
    if "[INST]" in template:
        if "<<SYS>>" in template:
            return LLAMA2
        return MISTRAL_V3 if "[AVAILABLE_TOOLS]" in template and " [INST]" not in template else MISTRAL
    if "<|assistant|>" in template and "<|end|>" in template:
        return PHI3
    if "<start_of_turn>" in template:
        return GEMMA
    if "<|start_header_id|>" in template:
        return LLAMA3
    return None


def supports_system(template: str | None) -> bool:
    """Whether the template renders a system message (some raise or drop it)."""
    if not template:
        return False
    marker = "edgeft-system-probe"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}]
    try:
        return marker in render_template(template, messages,
                                         add_generation_prompt=True, bos_token="", eos_token="")
    except TemplateError:
        return False


def default_system(template: str | None, family: str | None) -> str | None:
    """The system message a template writes when the chat has none (SmolLM2, Qwen2.5 do)."""
    if not template or family not in SYSTEM_BLOCKS:
        return None
    start, end = SYSTEM_BLOCKS[family]
    try:
        text = render_template(template, [{"role": "user", "content": "hi"}],
                               add_generation_prompt=True, bos_token="", eos_token="")
    except TemplateError:
        return None
    i = text.find(start)
    if i < 0 or i > 0 and text[:i].strip():
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start):j] if j > 0 else None


def with_default_system(template: str, system: str) -> str:
    """The chat template with `system` as the system message of chats that bring none.

    The prefix only rebinds ``messages``, so every Jinja engine that runs the original
    (Hugging Face's, llama.cpp's, LM Studio's) runs this one.
    """
    literal = (system.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': \"{literal}\"}}] + messages %}}"
        "{%- endif %}" + template
    )


@dataclass
class Modelfile:
    text: str
    family: str | None
    system: str | None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def build(
    gguf: str,
    chat_template: str | None,
    system: str | None = None,
    stops: list[str] = (),
    adapter: str | None = None,
    comment: str | None = None,
    generation: GenerateConfig | None = None,
) -> Modelfile:
    """Modelfile text: FROM `gguf` (ADAPTER `adapter`), TEMPLATE, SYSTEM, PARAMETER stop and
    the `generation` settings (default: GenerateConfig's, what keeps small tuned models from
    looping).

    `system` is the default system prompt; without one the template's own default (if it
    writes one) keeps Ollama's output equal to the Jinja template's.
    """
    family = detect_family(chat_template)
    if system is None:
        system = default_system(chat_template, family)
    lines = [f"# {comment}"] if comment else []
    lines.append(f"FROM {gguf}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if family is None:
        lines.append("# chat template not recognized (ChatML, Llama 3, Llama 2, Mistral, Phi-3, Gemma): "
                     "Ollama falls back to its own guess; add a TEMPLATE here")
    else:
        lines.append(f"TEMPLATE {_quote(GO_TEMPLATES[family])}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    seen = []
    for stop in [*STOPS.get(family, []), *stops]:
        if stop and stop not in seen:
            seen.append(stop)
            lines.append(f"PARAMETER stop {_quote_param(stop)}")
    gen = generation or GenerateConfig()
    lines += [f"PARAMETER repeat_penalty {gen.repeat_penalty:g}", f"PARAMETER repeat_last_n {gen.repeat_last_n}",
              f"PARAMETER num_predict {gen.max_tokens}"]
    return Modelfile("\n".join(lines) + "\n", family, system or None)


def _quote_param(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def relative_or_absolute(target: Path, folder: Path) -> str:
    """How a Modelfile in `folder` names `target`: ./name beside it, else an absolute path."""
    target, folder = Path(target).resolve(), Path(folder).resolve()
    if target.parent == folder:
        return f"./{target.name}"
    return str(target)


_STOP_TOKEN = re.compile(r"^<[^<>\s]+>$|^<\|[^|]+\|>$|^\[[A-Z_/]+\]$")


def stop_strings(tokenizer) -> list[str]:
    """The tokenizer's stop tokens as text, for PARAMETER stop (special-looking ones only)."""
    out = []
    for i in sorted(tokenizer.stop_ids):
        token = tokenizer.id_to_token(i)
        if token and _STOP_TOKEN.match(token):
            out.append(token)
    return out
