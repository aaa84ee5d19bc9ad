"""SamplingParams: defaults construct, and every bad field is refused by name."""
from __future__ import annotations

import math

import pytest

from colocate.sampling_params import SamplingParams

NAN, INF = math.nan, math.inf


def test_defaults_construct():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.temperature == 1.0 and not p.greedy
    assert p.stop_strings == [] and p.stop_token_ids == []
    assert not p.wants_prompt_logprobs


@pytest.mark.parametrize("field, value", [
    ("temperature", NAN), ("temperature", -0.1), ("temperature", INF), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", NAN), ("top_p", -INF),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", NAN),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", None),
    ("min_tokens", -1), ("min_tokens", 17),     # 17 > the default max_tokens of 16
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", INF),
    ("presence_penalty", 2.5), ("presence_penalty", -2.5), ("presence_penalty", NAN),
    ("frequency_penalty", 2.1), ("frequency_penalty", -INF),
    ("seed", 1.5), ("seed", "7"), ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1),
    ("logprobs", 1.5), ("logprobs", "3"), ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
    ("prompt_logprobs", -1), ("prompt_logprobs", 2.5), ("prompt_logprobs", 21),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3),
    ("stop_token_ids", "12"),
])
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0), dict(temperature=2.0), dict(top_p=1.0), dict(top_p=1e-9),
    dict(top_k=-1), dict(top_k=0), dict(top_k=50), dict(min_p=0.0), dict(min_p=1.0),
    dict(min_tokens=16, max_tokens=16), dict(repetition_penalty=1.3),
    dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(seed=0), dict(seed=-5),
    dict(seed=2 ** 64 - 1), dict(logprobs=0), dict(logprobs=20), dict(prompt_logprobs=True),
    dict(prompt_logprobs=0), dict(stop="\n"), dict(stop=("a", "b")), dict(stop_token_ids=(2,)),
])
def test_valid_values_construct(kw):
    SamplingParams(**kw)


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]


def test_greedy_covers_zero_and_vanishing_temperature():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-30).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_prompt_logprobs_zero_is_still_a_request():
    assert SamplingParams(prompt_logprobs=0).wants_prompt_logprobs
    assert SamplingParams(prompt_logprobs=True).wants_prompt_logprobs
    assert not SamplingParams(prompt_logprobs=False).wants_prompt_logprobs
