"""Chat templates: a checkpoint's jinja2 template, rendered as HF's apply_chat_template does.

Where the template comes from: a GGUF's `tokenizer.chat_template`, or an HF checkpoint's
chat_template.jinja, else tokenizer_config.json's `chat_template`. Rendering follows
transformers: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, the
`loopcontrols` extension, `raise_exception`, `strftime_now` and a `tojson` that keeps
non-ASCII text; the template sees `messages`, `add_generation_prompt` and the special
tokens (bos_token, eos_token, ...). The rendered text already holds every special token
the template wants, so it is tokenized without adding any more.

One ChatTemplate is built per checkpoint; the offline LLM.chat uses it, and a serving
door can hold the same object.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

# End-of-turn markers of common templates; the first that is a token of the vocabulary
# and appears in the template also stops generation (with EOS).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """A template that does not compile, or messages it refuses."""


class NoChatTemplateError(ValueError):
    """The model has no chat template, so a conversation cannot be rendered. A
    ValueError for the offline API; the serving doors answer it as a precondition
    the model does not meet (gRPC FAILED_PRECONDITION), not as a bad field."""

    def __init__(self) -> None:
        super().__init__("this model has no chat template (GGUF tokenizer.chat_template, "
                         "chat_template.jinja or tokenizer_config.json); send a plain prompt")


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str | None],
                 origin: str = "chat template"):
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.origin = origin

    @cached_property
    def _compiled(self):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template does not compile: {e}") \
                from None

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text of one conversation."""
        check_messages(messages)
        from jinja2 import TemplateError

        try:
            return self._compiled.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **extra)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: rendering failed: {e}") from None

    def end_of_turn_tokens(self, vocab: Mapping[str, int]) -> tuple[int, ...]:
        """Ids of the template's end-of-turn marker (if it has one in the vocabulary)."""
        for marker in END_OF_TURN_MARKERS:
            if marker in self.source and marker in vocab:
                return (vocab[marker],)
        return ()


def check_messages(messages: Any) -> None:
    """A conversation is a non-empty list of {"role": str, "content": ...} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} "
                         f"dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}].role must be a string, got {m.get('role')!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")


def is_conversation_list(messages: Any) -> bool:
    """True for a list of conversations (a list of lists of messages), as vLLM's chat takes."""
    return (isinstance(messages, Sequence) and not isinstance(messages, (str, bytes))
            and len(messages) > 0
            and all(isinstance(c, Sequence) and not isinstance(c, (str, bytes, Mapping))
                    for c in messages))
