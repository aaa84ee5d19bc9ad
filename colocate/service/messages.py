"""Messages of colocate.v1 <-> the engine's Python objects.

Pure conversion: no gRPC context, no status codes. Bad input raises ValueError
with a message naming the field, which the servicer turns into INVALID_ARGUMENT.
"""
from __future__ import annotations

from colocate.engine.engine import LLMEngine
from colocate.engine.outputs import RequestOutput
from colocate.sampling_params import SamplingParams
from colocate.service.engine_protocol import EngineStats
from colocate.service.proto_gen import colocate_pb2 as pb

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The proto's fields carry SamplingParams' own names, so the mapping is by
    name: a field with presence that is unset takes the Python default; an empty
    repeated field means none."""
    kwargs = {}
    for field in msg.DESCRIPTOR.fields:
        if field.is_repeated:
            values = list(getattr(msg, field.name))
            kwargs[field.name] = values or None
        elif not field.has_presence or msg.HasField(field.name):
            kwargs[field.name] = getattr(msg, field.name)
    return SamplingParams(**kwargs)


def prompt_from_proto(request: pb.GenerateRequest) -> str | list[int]:
    which = request.WhichOneof("prompt_input")
    if which == "prompt":
        return request.prompt
    if which == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    raise ValueError("prompt or prompt_token_ids must be set")


def chat_from_proto(request: pb.ChatRequest) -> list[dict[str, str]]:
    """The conversation as the chat template takes it; the template checks it."""
    return [{"role": m.role, "content": m.content} for m in request.messages]


def delta_response(out: RequestOutput, request_id: str,
                   with_prompt_logprobs: bool) -> pb.GenerateResponse:
    """One Generate message: the step's new tokens and text."""
    n_new = len(out.new_token_ids)
    logprobs = out.logprobs[-n_new:] if out.logprobs is not None and n_new else None
    return _response(out, request_id, out.new_token_ids, out.new_text, logprobs,
                     with_prompt_logprobs)


def whole_response(out: RequestOutput, request_id: str) -> pb.GenerateResponse:
    """Complete's one message, from the request's final output (which holds
    every token, the whole text and every logprob)."""
    return _response(out, request_id, out.token_ids, out.text, out.logprobs, True)


def _response(out: RequestOutput, request_id: str, token_ids: list[int], text: str,
              logprobs: list[dict[int, float]] | None,
              with_prompt_logprobs: bool) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=request_id, token_ids=token_ids, text=text)
    for entry in logprobs or ():
        resp.logprobs.add().logprobs.update(entry)
    if with_prompt_logprobs and out.prompt_logprobs is not None:
        for value in out.prompt_logprobs:
            item = resp.prompt_logprobs.add()
            if value is not None:
                item.logprob = value
    if out.finished:
        resp.finish_reason = FINISH_REASONS[out.finish_reason]
        if isinstance(out.stop_reason, int):
            resp.stop_token_id = out.stop_reason
        elif isinstance(out.stop_reason, str):
            resp.stop_string = out.stop_reason
        resp.usage.prompt_tokens = len(out.prompt_token_ids)
        resp.usage.completion_tokens = len(out.token_ids)
        resp.usage.cached_tokens = out.num_cached_tokens
    return resp


def stats_to_proto(stats: EngineStats) -> pb.Stats:
    return pb.Stats(num_running=stats.num_running, num_waiting=stats.num_waiting,
                    kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
                    sleeping=stats.sleeping, kv_blocks_lent=stats.kv_blocks_lent,
                    kv_blocks_borrowed=stats.kv_blocks_borrowed)


def model_info_from_engine(engine: LLMEngine, **fields) -> dict:
    """The ModelInfo fields an LLMEngine knows (its limits); `fields` add or
    override the rest (model_name, dtype, quantization, ...)."""
    lim = engine.limits
    info = dict(max_model_len=lim.max_model_len, block_size=lim.block_size,
                kv_cache_tokens=(lim.num_blocks - 1) * lim.block_size,
                vocab_size=lim.vocab_size)
    info.update(fields)
    return info


def model_info_to_proto(model_info, service_name: str) -> pb.ModelInfo:
    """A ModelInfo from a mapping of its fields (or a copy of a message), with
    the service's name filled in. An unknown field name raises ValueError."""
    info = pb.ModelInfo()
    if isinstance(model_info, pb.ModelInfo):
        info.CopyFrom(model_info)
    elif model_info is not None:
        info = pb.ModelInfo(**model_info)
    info.service_name = service_name
    return info
