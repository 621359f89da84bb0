"""The operator's chat template (vLLM's `--chat-template`): a file holding a Jinja template, or the
template itself. Compiled at start in the sandbox transformers renders templates in, so a template
that cannot compile stops the start instead of failing every chat request."""

from __future__ import annotations

from pathlib import Path

from server.errors import StartupError

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB; a larger file is a wrong path
_MARKERS = ("{{", "{%")


def load_chat_template(value: str) -> str:
    """The template `value` names (a file) or is (it holds Jinja markers); StartupError otherwise."""
    path = Path(value).expanduser()
    if not any(m in value for m in _MARKERS):
        if not path.is_file():
            raise StartupError(f"--chat-template {value!r}: neither a file nor a Jinja template")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise StartupError(f"--chat-template {value}: larger than {MAX_TEMPLATE_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StartupError(f"--chat-template {value}: cannot read it ({e})") from None
    else:
        text = value
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        raise StartupError(f"--chat-template: line {e.lineno}: {e.message}") from None
    return text
