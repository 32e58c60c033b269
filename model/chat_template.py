"""Chat messages -> one prompt text, through the checkpoint's chat template, rendered as HF
transformers' `apply_chat_template` renders it: jinja2's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the loop-controls extension, `raise_exception`, a `tojson` that does not escape
HTML, `strftime_now`, the tokenizer's special-token strings (`bos_token`, `eos_token`, ...), and
`add_generation_prompt=True`.

Where the template comes from: `chat_template.jinja` in the checkpoint directory if present (HF's
current layout), else `chat_template` in `tokenizer_config.json`, a string or a list of
`{"name", "template"}` of which the one named "default" is used.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

import fsspec

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; `kind` is the error type a record reports."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (already checked by `check_messages`); raises
        ChatTemplateError("chat_template_error", ...) with the template's own message if it refuses."""
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError("chat_template_error", f"the chat template refused the messages: {e}") from e
        except Exception as e:  # a template is code: any error in it is this record's error
            raise ChatTemplateError("chat_template_error",
                                    f"the chat template failed: {type(e).__name__}: {e}") from e


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as the template receives them: a non-empty list of objects with a string `role`
    and a `content` that is a string or a list of text parts (`{"type": "text", "text": ...}`,
    joined with newlines, as vLLM does for string templates). Raises ChatTemplateError naming the
    bad value."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("invalid_messages", f"messages must be a non-empty list; got {_short(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError("invalid_messages", f"messages[{i}] must be an object; got {_short(m)}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ChatTemplateError("invalid_messages",
                                    f"messages[{i}].role must be a non-empty string; got {_short(m.get('role'))}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ChatTemplateError("invalid_messages", f"messages[{i}].content[{j}] must be a text part "
                                            f'{{"type": "text", "text": ...}}; got {_short(part)}')
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        elif not isinstance(content, str):
            raise ChatTemplateError("invalid_messages", f"messages[{i}].content must be a string or a list of "
                                    f"text parts; got {_short(content)}")
        out.append(m)
    return out


def load_chat_template(path: str, fallback_special: Mapping[str, str] | None = None) -> ChatTemplate | None:
    """The chat template of the checkpoint directory `path` (local or gs://), or None if it has none.
    Special-token strings come from tokenizer_config.json; `fallback_special` (the tokenizer's own,
    e.g. {"bos_token": "<s>"}) fills the ones it does not name."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    config: dict[str, Any] = {}
    if fs.exists(root + "/tokenizer_config.json"):
        with fs.open(root + "/tokenizer_config.json", "r", encoding="utf-8") as f:
            config = json.load(f)
    if fs.exists(root + "/chat_template.jinja"):
        with fs.open(root + "/chat_template.jinja", "r", encoding="utf-8") as f:
            source = f.read()
    else:
        source = _pick_template(config.get("chat_template"), path)
    if source is None:
        return None
    special = dict(fallback_special or {})
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return ChatTemplate(source, special)


def special_token_strings(tokenizer) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ...} as the tokenizer spells them, for checkpoints whose
    tokenizer_config.json does not name them."""
    text_of = {i: t for t, i in tokenizer.special_tokens().items()}
    pairs = (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
    return {key: text_of[i] for key, i in pairs if i is not None and i in text_of}


def _pick_template(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{path}: tokenizer_config.json has chat templates {sorted(map(str, named))} "
                         "but none named 'default'")
    raise ValueError(f"{path}: tokenizer_config.json chat_template must be a string or a list; "
                     f"got {type(value).__name__}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
        rendering a prompt it only passes its body through."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters ('<' -> '\u003c'), which HF's does not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno})") from e
