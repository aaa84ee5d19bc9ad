"""ColocateClient: the Python client a tenant uses to call one colocate service.

    with ColocateClient("127.0.0.1:50051", token) as client:
        for delta in client.generate("Hello", max_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)

Sampling options are SamplingParams' keyword names; the service validates them
and answers a bad one with INVALID_ARGUMENT naming it (raised as grpc.RpcError).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from colocate.serving.proto_gen import colocate_pb2 as pb
from colocate.serving.proto_gen import colocate_pb2_grpc as pb_grpc

_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                   pb.FINISH_REASON_ABORT: "abort"}
_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class GenerateDelta:
    """One streamed message: the tokens and text new since the previous one."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None        # "stop" | "length" | "abort" on the last
    stop_reason: int | str | None = None    # the stop token id or stop string that hit
    usage: Usage | None = None              # on the last
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> "GenerateDelta":
        finished = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        which = msg.WhichOneof("stop_reason")
        return cls(
            request_id=msg.request_id,
            token_ids=list(msg.token_ids),
            text=msg.text,
            finish_reason=_FINISH_REASONS.get(msg.finish_reason),
            stop_reason=getattr(msg, which) if which else None,
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens,
                        msg.usage.cached_tokens) if finished else None,
            logprobs=[dict(e.logprobs) for e in msg.logprobs] or None,
            prompt_logprobs=[p.logprob if p.HasField("logprob") else None
                             for p in msg.prompt_logprobs] or None,
        )


def sampling_to_proto(**sampling) -> pb.SamplingParams:
    """SamplingParams keywords -> the proto message. None means "server default";
    range checks are left to the server so there is one source of truth."""
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    msg = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            msg.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            msg.stop_token_ids.extend(value)
        elif name == "prompt_logprobs":
            # SamplingParams takes True to mean "the prompt tokens' own logprobs".
            if value is not False:
                msg.prompt_logprobs = 0 if value is True else value
        else:
            setattr(msg, name, value)
    return msg


class ColocateClient:
    def __init__(self, target: str, token: str, *, timeout: float | None = None) -> None:
        """target: "host:port". timeout: default deadline in seconds for each call."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.ColocateStub(self._channel)

    def generate(self, prompt: str | Sequence[int], *, request_id: str | None = None,
                 timeout: float | None = None, **sampling) -> Iterator[GenerateDelta]:
        """Stream a completion. Stopping the iteration early (break, close) cancels
        the call, and the service frees the request's cache at once."""
        request = pb.GenerateRequest(sampling=sampling_to_proto(**sampling),
                                     request_id=request_id or "")
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            # Selected even when empty, so the service says "prompt must not be empty".
            request.prompt_token_ids.SetInParent()
            request.prompt_token_ids.ids.extend(prompt)
        call = self._stub.Generate(request, metadata=self._metadata,
                                   timeout=timeout if timeout is not None else self.timeout)
        try:
            for msg in call:
                yield GenerateDelta.from_proto(msg)
        finally:
            call.cancel()       # a no-op once the stream has ended

    def generate_text(self, prompt: str | Sequence[int], **kwargs) -> str:
        return "".join(delta.text for delta in self.generate(prompt, **kwargs))

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata,
                                       timeout=self.timeout)

    def health(self) -> pb.HealthResponse:
        return self._stub.Health(pb.HealthRequest(), metadata=self._metadata,
                                 timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ColocateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
