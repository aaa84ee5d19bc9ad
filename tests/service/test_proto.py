"""The generated code is current, and SamplingParams crosses the wire intact."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from colocate.client import sampling_to_proto
from colocate.sampling_params import SamplingParams
from colocate.service.messages import sampling_from_proto
from colocate.service.proto_gen import colocate_pb2 as pb

GENERATED = Path(pb.__file__).parent


def test_checked_in_code_matches_the_proto(tmp_path):
    from colocate.service.proto_gen.build import build

    written = build(tmp_path)
    assert {p.name for p in written} == {f"{stem}{ext}" for stem in ("colocate_pb2", "health_pb2")
                                         for ext in (".py", ".pyi", "_grpc.py")}
    for path in written:
        assert path.read_bytes() == (GENERATED / path.name).read_bytes(), \
            f"{path.name} is stale: run `make proto`"


def test_generation_service_methods():
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "colocate.v1.Generation"
    shapes = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert shapes == {"Generate": ("GenerateRequest", "GenerateResponse"),
                      "Complete": ("GenerateRequest", "GenerateResponse"),
                      "Chat": ("ChatRequest", "GenerateResponse"),
                      "Tokenize": ("TokenizeRequest", "TokenizeResponse"),
                      "GetModelInfo": ("GetModelInfoRequest", "ModelInfo"),
                      "GetStats": ("GetStatsRequest", "Stats")}
    streaming = {m.name for m in service.methods if m.server_streaming}
    assert streaming == {"Generate", "Chat"}


def test_proto_sampling_fields_are_the_python_fields():
    python = {f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_")}
    assert {f.name for f in pb.SamplingParams.DESCRIPTOR.fields} == python


def test_unset_fields_take_the_python_defaults():
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()


def test_every_field_round_trips():
    kwargs = dict(max_tokens=7, min_tokens=2, temperature=0.0, top_p=0.5, top_k=0, min_p=0.1,
                  repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0.25,
                  seed=-3, stop=["</s>", "\n\n"], stop_token_ids=[2, 7], ignore_eos=True,
                  include_stop_str_in_output=True, logprobs=0, prompt_logprobs=5,
                  skip_special_tokens=False)
    msg = pb.SamplingParams.FromString(sampling_to_proto(**kwargs).SerializeToString())
    assert sampling_from_proto(msg) == SamplingParams(**kwargs)


def test_explicit_zero_differs_from_unset():
    # temperature 0 (greedy) must not read back as the default 1.0.
    assert sampling_from_proto(sampling_to_proto(temperature=0)).temperature == 0.0
    assert sampling_from_proto(sampling_to_proto(stop="x")).stop == ["x"]
    assert sampling_from_proto(sampling_to_proto(prompt_logprobs=True)).prompt_logprobs == 0


def test_unknown_sampling_option_is_a_type_error():
    with pytest.raises(TypeError, match="max_new_tokens"):
        sampling_to_proto(max_new_tokens=3)
