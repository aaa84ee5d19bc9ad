"""The contract between the serving layer and an engine.

The gRPC servicer (and later the Ray actor) depends on this protocol, not on
AsyncEngine, as Ray Serve LLM's server depends on its engine protocol: a test
double, or an engine in another process, can stand in without serving knowing.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from colocate.engine.outputs import RequestOutput
from colocate.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine is not running (not started, shut down, or its loop failed);
    no request can be served until it is restarted."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine agreed to queue; retry later."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, safe to read from any thread."""
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    sleeping: bool = False         # the KV pool is given back until the next request
    kv_blocks_lent: int = 0        # of this pool, held by other members of a fused group
    kv_blocks_borrowed: int = 0    # of other members' pools, held by this one's requests


class RequestStream(Protocol):
    """The outputs of one request, as they are produced: each item carries the
    step's new tokens and text; the last has `finished` set. Closing the stream
    before the last item aborts the request."""
    request_id: str

    def __iter__(self) -> Iterator[RequestOutput]: ...

    def __next__(self) -> RequestOutput: ...

    def close(self) -> None: ...


class EngineProtocol(Protocol):
    def start(self) -> None:
        """Begin serving; idempotent."""

    def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> RequestStream:
        """Queue a request. Raises ValueError (naming the field) on bad input,
        QueueFullError when the queue is full, EngineDeadError when not running."""

    def chat_prompt(self, messages) -> list[int]:
        """A conversation's prompt ids through the chat template. Raises
        NoChatTemplateError when the model has none, ValueError on bad messages."""

    def submit_chat(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> RequestStream:
        """generate() for a chat_prompt(): the reply also stops at end of turn."""

    def tokenize(self, text: str) -> list[int]:
        """The token ids generate() would feed the model for `text`. Raises
        ValueError when there is no tokenizer or the text is empty."""

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `token_ids`. Raises ValueError naming an id outside the
        vocabulary, or when there is no tokenizer."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""

    def check_health(self) -> None:
        """Return if the engine can serve; raise EngineDeadError saying why if not."""

    def stats(self) -> EngineStats:
        """The engine's current load."""

    def shutdown(self) -> None:
        """Stop serving: abort every request, free every block, stop threads."""
