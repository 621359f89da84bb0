"""The operator's chat template (vLLM's `--chat-template`): a file holding a Jinja template, or the
template itself. Read as vLLM reads it: a path that opens is a file; otherwise a value holding `{`,
`}` or a newline is the template, its backslash escapes (`\\n`) decoded, so a one-line template
written for vLLM renders the same here. Compiled at start by transformers' own compiler, the one
that renders it, so a template that cannot compile stops the start instead of failing every chat
request with a 400 that would blame the client."""

from __future__ import annotations

from pathlib import Path

from server.errors import StartupError

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB; a larger file is a wrong path
_TEMPLATE_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """The template `value` names (a file) or is; StartupError when it is neither or cannot compile."""
    path = Path(value).expanduser()
    if path.is_file():
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise StartupError(f"--chat-template {value}: larger than {MAX_TEMPLATE_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StartupError(f"--chat-template {value}: cannot read it ({e})") from None
    elif any(c in value for c in _TEMPLATE_CHARS):
        # vLLM's codecs.decode(value, "unicode_escape"), without its mangling of non-ASCII text
        try:
            text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:
            raise StartupError(f"--chat-template: a broken backslash escape ({e.reason})") from None
    else:
        raise StartupError(f"--chat-template {value!r}: looks like a path, but no such file")
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateError as e:
        line = getattr(e, "lineno", None)  # syntax errors have one
        where = f"line {line}: " if line else ""
        raise StartupError(f"--chat-template: {where}{e.message or type(e).__name__}") from None
    return text
