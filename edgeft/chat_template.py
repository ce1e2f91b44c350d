"""Chat templates: the built-in ones, which one a model gets, and the sandbox they render in.

A template comes with a downloaded model (or a user's file), so it is untrusted code: Jinja's
immutable sandbox (as Hugging Face renders templates), made stricter: a forbidden attribute is
an error rather than an empty value, and '*' / '**' cannot build gigabytes from a few
characters. Every failure is one TemplateError.

The built-in templates (BUILTINS: chatml, gemma, llama3, mistral, phi3) are for models whose
file carries none (base models): each renders its family's format as the family's Hugging Face
template does and holds the text by which llama.cpp recognizes that format (llama-chat.cpp),
so llama.cpp, Ollama and LM Studio chat with a tuned model as it was trained. Each names the
token that ends an assistant turn, the stop in training, generation and the export.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from edgeft.errors import UserError


class TemplateError(UserError, ValueError):
    """A chat template that fails to compile or render, or tries to leave the sandbox."""


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens that end an assistant turn in the common chat formats.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|eom_id|>")

_ONLY_CHAT_ROLES = (
    "{{- raise_exception('the built-in %s chat template has no tool turns: its roles are "
    "system, user and assistant') }}"
)
# google/gemma-3-*-it's template, text only: no system role, so a system message opens the
# first user turn; "model" is the assistant.
GEMMA_TEMPLATE = """{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ('user', 'assistant') %}
        """ + _ONLY_CHAT_ROLES % "gemma" + """
    {%- endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""
# meta-llama/Meta-Llama-3-8B-Instruct's template, verbatim (llama-cpp-python knows it by
# its exact text).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.3's format for chats without tools, with the system message
# opening the first user turn as llama.cpp's mistral-v3 writes it (Hugging Face's puts it in
# the last user turn only, so a trained conversation would never show it).
MISTRAL_TEMPLATE = """{#- Mistral v0.3, which llama.cpp tells by the texts '[INST]' and '[AVAILABLE_TOOLS]';
    tool definitions and calls are not rendered. #}
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ('user', 'assistant') %}
        """ + _ONLY_CHAT_ROLES % "mistral" + """
    {%- endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- endif %}
{%- endfor %}"""
# microsoft/Phi-3.5-mini-instruct's template (EOS closes a chat without a generation prompt).
PHI3_TEMPLATE = """{%- for message in messages %}
    {%- if message['role'] == 'system' and message['content'] %}
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] != 'system' %}
        """ + _ONLY_CHAT_ROLES % "phi3" + """
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- else %}
    {{- eos_token }}
{%- endif %}"""


@dataclass(frozen=True)
class Builtin:
    name: str
    text: str
    end_of_turn: str  # the token after every assistant turn: the stop
    tokens: tuple[str, ...]  # its markup, each a single token of the vocabularies it fits


BUILTINS = {b.name: b for b in (
    Builtin("chatml", CHATML_TEMPLATE, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    Builtin("gemma", GEMMA_TEMPLATE, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    Builtin("llama3", LLAMA3_TEMPLATE, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Builtin("mistral", MISTRAL_TEMPLATE, "</s>", ("[INST]", "[/INST]", "</s>")),
    Builtin("phi3", PHI3_TEMPLATE, "<|end|>", ("<|user|>", "<|assistant|>", "<|end|>")),
)}
# The built-in a template-less model gets, first by its GGUF architecture, then by the first
# of DEFAULT_ORDER whose tokens its vocabulary has.
FAMILY_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
DEFAULT_ORDER = ("llama3", "chatml", "gemma", "phi3", "mistral")
_TOKEN_LIKE = re.compile(r"<\|[^|\s]+\|>|<[^<>\s]+>|\[[A-Z_/]+\]")


def builtin_names() -> str:
    return ", ".join(sorted(BUILTINS))


def read_template(spec: str) -> tuple[str, str | None]:
    """(text, end-of-turn token or None if not known yet) of a built-in name or a .jinja file;
    anything else is a one-line TemplateError naming it."""
    if spec in BUILTINS:
        return BUILTINS[spec].text, BUILTINS[spec].end_of_turn
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), None
        except (OSError, UnicodeError) as e:
            raise TemplateError(f"chat template {spec}: cannot be read ({e})") from None
    what = "no such file" if path.suffix or len(path.parts) > 1 else "no such built-in template or file"
    raise TemplateError(f"chat template {spec!r}: {what}; the built-in ones are {builtin_names()}, "
                        "or give a FILE.jinja")


def default_builtin(arch: str | None, is_token: Callable[[str], bool]) -> Builtin | None:
    """The built-in template for a model without one: its family's if the vocabulary has its
    tokens, else the first of DEFAULT_ORDER whose tokens it has; None when none fits."""
    order = [FAMILY_TEMPLATES[arch]] if arch in FAMILY_TEMPLATES else []
    for name in order + [n for n in DEFAULT_ORDER if n not in order]:
        if all(is_token(t) for t in BUILTINS[name].tokens):
            return BUILTINS[name]
    return None


def written_end_of_turn(template: str, is_token: Callable[[str], bool], **context) -> str | None:
    """The token a template writes right after an assistant's answer (a user's file names no
    end-of-turn token), if it is one of the vocabulary."""
    answer = "edgeft-probe-answer"
    text = render_template(template, [{"role": "user", "content": "Hi."},
                                      {"role": "assistant", "content": answer}], **context)
    at = text.find(answer)
    m = _TOKEN_LIKE.match(text, at + len(answer)) if at >= 0 else None
    return m.group() if m and is_token(m.group()) else None

_MAX_REPEAT = 1 << 20  # longest string or list a template may build with '*'

def _sandbox():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        # '*' and '**' can build gigabytes from a few characters ({{ 'x' * 10**10 }}).
        intercepted_binops = frozenset(["*", "**"])

        # The stock sandbox renders a forbidden attribute as an empty Undefined; refuse it.
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise SecurityError(f"exponent {right} is too large for a chat template")
                return left**right
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError("a chat template may not build sequences this long")
            return left * right

    def raise_exception(message):
        raise TemplateError(f"chat template raised: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    # Compiling costs ~1.5 ms, which dominated data loading when done per render.
    return _sandbox().from_string(template)


def render_template(template: str, messages: list[dict], **context) -> str:
    """Render a chat template in the sandbox; any failure is a TemplateError."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, **context)
    except TemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError,
            OverflowError, RecursionError, MemoryError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
