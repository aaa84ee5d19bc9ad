"""Client: the Python client a tenant uses to call one colocate service.

    with Client("127.0.0.1:50051", token) as client:
        for delta in client.generate("Hello", max_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)
        result = client.complete("Hello", max_tokens=32)    # all at once
        for delta in client.chat([{"role": "user", "content": "Hi"}], max_tokens=32):
            ...                                              # through the chat template
        client.tokenize("Hello"), client.model_info(), client.health()

A service that serves TLS takes tls_ca= (the CA that signed its certificate;
omit it to trust the system's roots), and with mutual TLS also tls_cert= and
tls_key= (this client's certificate and key), all paths to PEM files:

    Client("127.0.0.1:50051", token, tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key")

A replicated service (one service listed under several device entries) is
reached through one target listing every replica, as `colocate serve` prints it:
"ipv4:10.0.0.1:50051,10.0.0.2:50051" (or plain "host:port,host:port"). The channel
then keeps a connection to each and spreads calls over them round-robin (gRPC's
own client-side balancing), skipping a replica that cannot be reached.

Sampling options are SamplingParams' keyword names; the service validates them
and answers a bad one with INVALID_ARGUMENT naming it. Every failed call raises
grpc.RpcError, whose .code() and .details() say why.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from colocate.service.proto_gen import colocate_pb2 as pb
from colocate.service.proto_gen import colocate_pb2_grpc as pb_grpc
from colocate.service.proto_gen import health_pb2, health_pb2_grpc
from colocate.service.targets import address_list_target
from colocate.service.tls import channel_credentials

_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                   pb.FINISH_REASON_ABORT: "abort"}
_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
# Balance over every address of the target; gRPC's default (pick_first) would send
# everything to the first replica that answers.
ROUND_ROBIN_OPTIONS = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
)


@dataclass(frozen=True)
class Usage:
    """Token counts of one finished request, as the service reported them."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int             # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerateDelta:
    """One streamed message: the tokens and text new since the previous one.
    From complete(), the one message, holding every token and the whole text."""
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


def _generate_request(prompt: str | Sequence[int], request_id: str | None,
                      sampling: dict) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=sampling_to_proto(**sampling),
                                 request_id=request_id or "")
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        # Selected even when empty, so the service says "prompt must not be empty".
        request.prompt_token_ids.SetInParent()
        request.prompt_token_ids.ids.extend(prompt)
    return request


def channel_target(target: str) -> tuple[str, tuple]:
    """(what grpc dials, channel options) for a target: one "host:port" as given;
    an address list (a comma, or an ipv4:/ipv6: scheme) with round-robin balancing.
    gRPC has no static list of host names, so a list must give IP addresses."""
    if "," not in target and not target.startswith(("ipv4:", "ipv6:")):
        return target, ()
    if not target.startswith(("ipv4:", "ipv6:")):
        listed = address_list_target([a.strip() for a in target.split(",") if a.strip()])
        if not listed.startswith(("ipv4:", "ipv6:")):
            raise ValueError(f"target {target!r}: a list of replicas must give IP addresses "
                             f"(gRPC's ipv4:/ipv6: targets); a host name may instead resolve "
                             f"to several addresses on its own")
        target = listed
    return target, ROUND_ROBIN_OPTIONS


class Client:
    def __init__(self, target: str, token: str | None, *, timeout: float | None = None,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        """target: "host:port", or a list of a replicated service's addresses
        (see the module's docstring). token: a tenant's bearer token (None: health only).
        timeout: the default deadline in seconds for each call; when it passes
        the service stops the request and frees its cache. tls: connect with TLS,
        implied by any tls_* path (see the module's docstring)."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        dial, options = channel_target(target)
        if tls or tls_ca or tls_cert or tls_key:
            creds = channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = grpc.secure_channel(dial, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(dial, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def generate(self, prompt: str | Sequence[int], *, request_id: str | None = None,
                 timeout: float | None = None, **sampling) -> Iterator[GenerateDelta]:
        """Stream a completion. Stopping the iteration early (break, close) cancels
        the call, and the service frees the request's cache at once."""
        return self._stream(self._stub.Generate(_generate_request(prompt, request_id, sampling),
                                                metadata=self._metadata,
                                                timeout=self._deadline(timeout)))

    def chat(self, messages: Sequence[Mapping[str, str]], *, request_id: str | None = None,
             timeout: float | None = None, **sampling) -> Iterator[GenerateDelta]:
        """Stream the reply to a conversation ([{"role": "user", "content": "Hi"}, ...]),
        which the service renders through its model's chat template; stopping early
        cancels the call, as generate() does."""
        request = pb.ChatRequest(sampling=sampling_to_proto(**sampling),
                                 request_id=request_id or "")
        for m in messages:
            request.messages.add(role=m["role"], content=m["content"])
        return self._stream(self._stub.Chat(request, metadata=self._metadata,
                                            timeout=self._deadline(timeout)))

    @staticmethod
    def _stream(call) -> Iterator[GenerateDelta]:
        try:
            for msg in call:
                yield GenerateDelta.from_proto(msg)
        finally:
            call.cancel()       # a no-op once the stream has ended

    def generate_text(self, prompt: str | Sequence[int], **kwargs) -> str:
        return "".join(delta.text for delta in self.generate(prompt, **kwargs))

    def complete(self, prompt: str | Sequence[int], *, request_id: str | None = None,
                 timeout: float | None = None, **sampling) -> GenerateDelta:
        """The whole completion in one answer, once the request finishes."""
        msg = self._stub.Complete(_generate_request(prompt, request_id, sampling),
                                  metadata=self._metadata, timeout=self._deadline(timeout))
        return GenerateDelta.from_proto(msg)

    def tokenize(self, text: str) -> list[int]:
        """The token ids the service would feed its model for `text`."""
        msg = self._stub.Tokenize(pb.TokenizeRequest(text=text), metadata=self._metadata,
                                  timeout=self.timeout)
        return list(msg.token_ids)

    def detokenize(self, token_ids: Sequence[int],
                   skip_special_tokens: bool | None = None) -> str:
        request = pb.TokenizeRequest(token_ids=pb.TokenIds(ids=token_ids))
        if skip_special_tokens is not None:
            request.skip_special_tokens = skip_special_tokens
        return self._stub.Tokenize(request, metadata=self._metadata, timeout=self.timeout).text

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata,
                                       timeout=self.timeout)

    def stats(self) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(), metadata=self._metadata,
                                   timeout=self.timeout)

    # Health is open: no token is sent, so a probe holds no tenant's secret.
    def health(self, service: str = "") -> str:
        """The status by grpc.health.v1 Check: "SERVING" or "NOT_SERVING". An
        unknown service name raises grpc.RpcError with NOT_FOUND."""
        msg = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    def watch_health(self, service: str = "", *,
                     timeout: float | None = None) -> Iterator[str]:
        """The status now, then each change (grpc.health.v1 Watch). No default
        deadline: a watch is meant to last; close the iterator to end it."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout)
        try:
            for msg in call:
                yield health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The earlier name, kept for code written against it.
ColocateClient = Client
