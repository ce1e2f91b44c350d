"""Chat templates, rendered in a sandbox: a template comes with a downloaded model, so it is
untrusted code. Jinja's immutable sandbox (as Hugging Face renders templates), made stricter:
a forbidden attribute is an error rather than an empty value, and '*' / '**' cannot build
gigabytes from a few characters. Every failure is one TemplateError.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

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
