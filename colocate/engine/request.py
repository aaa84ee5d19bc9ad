"""Request: one prompt's journey through the engine, and the states it passes."""
from __future__ import annotations

import enum
import time

from colocate.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or max_model_len reached
    ABORT = "abort"      # the client went away or asked to cancel

    def __str__(self) -> str:
        return self.value


FINISH_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


class Request:
    """Token state of one request.

    The scheduler reasons only in tokens: `num_computed_tokens` of `all_token_ids`
    have their K/V in the cache; the rest are still to compute. A request whose
    computed tokens catch up with all its tokens samples one more.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: tuple[int, ...] = (),
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0          # prompt tokens served by a prefix-cache hit
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None   # the stop token id or string that hit
        self.block_hashes: list[bytes] = []   # chained hashes of the full blocks so far
        # prompt_logprobs[i] is log p(prompt[i] | prompt[:i]); filled chunk by chunk.
        self.prompt_logprobs: list[float | None] = [None]
        self.logprobs: list[dict[int, float]] = []
        # Timestamps (time.monotonic()) for the latency statistics.
        self.first_scheduled_time: float | None = None   # left the queue for the first time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end this request (EOS unless ignored, plus its own)."""
        ids = [] if self.sampling_params.ignore_eos else list(self.eos_token_ids)
        return ids + list(self.sampling_params.stop_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = FINISH_STATUS[reason]
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
