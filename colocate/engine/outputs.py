"""What the engine hands back: one RequestOutput per request per step it advanced."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                      # every generated token so far
    text: str                                 # their text so far (stop string cut off)
    finished: bool = False
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    stop_reason: int | str | None = None      # the stop token id or stop string that hit
    new_token_ids: list[int] = field(default_factory=list)   # this step's tokens
    new_text: str = ""                                       # this step's text
    logprobs: list[dict[int, float]] | None = None           # per generated token
    prompt_logprobs: list[float | None] | None = None        # per prompt token
    num_cached_tokens: int = 0                # prompt tokens served by the prefix cache
