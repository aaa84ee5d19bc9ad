"""SamplingParams: how one request picks its tokens, validated at construction.

Every invalid field raises ValueError naming the field and its limit, so a bad
request is refused before it touches the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this sample greedily, as in vLLM (its _SAMPLING_EPS).
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0                # in (0, 1]
    top_k: int = -1                   # -1 (or 0) disables
    min_p: float = 0.0                # in [0, 1]
    repetition_penalty: float = 1.0   # > 0; 1 disables
    presence_penalty: float = 0.0     # in [-2, 2]
    frequency_penalty: float = 0.0    # in [-2, 2]
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None       # top-k log-probabilities per generated token
    prompt_logprobs: bool | int | None = None
    skip_special_tokens: bool = True

    _stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._validate()
        if self.stop is None:
            self._stop_list = []
        elif isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        # Below _GREEDY_TEMPERATURE, logits / temperature can overflow float32 to inf
        # (and softmax to NaN); the distribution is an argmax by then anyway.
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def wants_prompt_logprobs(self) -> bool:
        # 0 is a request too (as in vLLM): the prompt token's own logprob, no top-k.
        return self.prompt_logprobs is not None and self.prompt_logprobs is not False

    def _validate(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_float("temperature", self.temperature, low=0.0)
        _check_float("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_int("top_k", self.top_k, low=-1)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63), high=2**64 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=20)
        if self.prompt_logprobs is not None and not isinstance(self.prompt_logprobs, bool):
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=20)
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for s in stops:
            if not isinstance(s, str):
                raise ValueError(f"stop must hold strings, got {type(s).__name__}")
            if s == "":
                raise ValueError("stop must not contain an empty string")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(
                f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids or []:
            _check_int("stop_token_ids", t, low=0)


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_float(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
