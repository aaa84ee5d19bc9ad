"""OpenAI's HTTP API, the request side: a JSON body of /v1/chat/completions or
/v1/completions -> what the engine takes (a conversation or a prompt, and
SamplingParams), or an OpenAIError with the status and the field to blame.

Range checks are SamplingParams' own (the gRPC door's too), so both doors refuse
the same values with the same words; this module only maps OpenAI's names onto
it (max_completion_tokens, top_logprobs, ...), checks the JSON types SamplingParams
leaves to Python, and refuses what the engine does not do (n > 1, tools, ...).
Unknown fields are ignored, as OpenAI's own server and vLLM do. The engine's
extra parameters (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, ...)
are accepted at the top level of the body, as vLLM accepts them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from colocate.prompt_inputs import one_prompt
from colocate.sampling_params import SamplingParams

# Top-level body fields that go to SamplingParams under the same name.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                   "stop", "top_k", "min_p", "repetition_penalty", "min_tokens",
                   "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                   "skip_special_tokens")
BOOL_FIELDS = ("stream", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
               "echo")
# Fields the engine has no way to honour: refused when set to anything but "off".
UNSUPPORTED = {"tools": "tool calling", "tool_choice": "tool calling",
               "functions": "function calling", "logit_bias": "logit_bias",
               "suffix": "suffix", "echo": "echo"}
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5      # as OpenAI's legacy completions allow


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 500: "internal_error"}

    # A refusal's reason for the rejection counter (colocate/metrics/rejections.py).
    REASONS = {400: "invalid", 401: "auth", 404: "invalid", 429: "overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.reason = reason or self.REASONS.get(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.status}}


def bad(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, param)


@dataclass
class OpenAIRequest:
    """One parsed body. `build_params(room)` makes the SamplingParams once the prompt's
    length is known: without max_tokens a reply may use all the room left."""
    chat: bool
    model: str | None
    messages: list[dict] | None = None        # chat
    prompt: str | list[int] | None = None     # completions
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None               # top-k per token, None: not asked
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def build_params(self, room: int) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else max(1, room)
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self.sampling)
        except ValueError as exc:
            raise bad(field_named(str(exc)), str(exc)) from None


def field_named(message: str) -> str | None:
    """The field a SamplingParams / engine message starts with ("top_p must be ...")."""
    word = message.split(" ", 1)[0]
    known = {*SAMPLING_FIELDS, "max_tokens", "logprobs", "prompt", "messages"}
    return word if word in known else None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:     # UnicodeDecodeError is a ValueError
        raise bad(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad(None, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat(body: Mapping[str, Any]) -> OpenAIRequest:
    req = _common(body, chat=True)
    req.messages = _messages(body.get("messages"))
    if body.get("logprobs") is not None:
        if not isinstance(body["logprobs"], bool):
            raise bad("logprobs", f"logprobs must be a boolean, got {body['logprobs']!r}")
        if body["logprobs"]:
            top = _int_in(body, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS, default=0)
            req.logprobs = top
    elif body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported")
    return req


def parse_completion(body: Mapping[str, Any]) -> OpenAIRequest:
    req = _common(body, chat=False)
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "prompt is required")
    raw = body["prompt"]
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
        raw = raw[0]                # a batch of one, as the SDK sends a list prompt
    try:
        req.prompt = one_prompt(raw)
    except TypeError:
        raise bad("prompt", "prompt must be a string or a list of token ids (one prompt "
                            "per request)") from None
    if body.get("logprobs") is not None:
        req.logprobs = _int_in(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("best_of", "best_of must be 1: one completion per request is supported")
    return req


def _common(body: Mapping[str, Any], chat: bool) -> OpenAIRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {type(model).__name__}")
    for name in BOOL_FIELDS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(name, f"{name} must be a boolean, got {body[name]!r}")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, "", [], {}, "none"):
            raise bad(name, f"{name}: {what} is not supported by this server")
    n = body.get("n")
    if n is not None:
        _int_in(body, "n", 1, None)
        if n > 1:
            raise bad("n", f"n must be 1: one choice per request is supported, got {n}")
    req = OpenAIRequest(chat=chat, model=model, stream=bool(body.get("stream")))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise bad("stream_options", "stream_options must be an object")
        if not req.stream:
            raise bad("stream_options", "stream_options needs stream: true")
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise bad("stream_options", "stream_options.include_usage must be a boolean")
        req.include_usage = include
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if given:
        req.max_tokens = body[given[0]]
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int):
            raise bad(given[0], f"{given[0]} must be an integer, got {req.max_tokens!r}")
        if req.max_tokens < 1:
            raise bad(given[0], f"{given[0]} must be >= 1, got {req.max_tokens}")
    req.sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    return req


def _int_in(body: Mapping[str, Any], name: str, low: int, high: int | None,
            default: int | None = None) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad(name, f"{name} must be {limit}, got {value}")
    return value


def _messages(raw: Any) -> list[dict]:
    """OpenAI's messages -> {"role", "content": str} for the chat template: content
    given as parts keeps its text parts; an assistant turn without content is ""."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise bad("messages", f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise bad("messages", f"messages[{i}].role must be a non-empty string")
        if isinstance(content, list):
            content = "".join(_text_part(p, i, j) for j, p in enumerate(content))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad("messages", f"messages[{i}].content must be a string or a list of "
                                  f"text parts, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _text_part(part: Any, i: int, j: int) -> str:
    if (isinstance(part, Mapping) and part.get("type") == "text"
            and isinstance(part.get("text"), str)):
        return part["text"]
    raise bad("messages", f"messages[{i}].content[{j}]: only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported")
