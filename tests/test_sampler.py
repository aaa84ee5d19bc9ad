"""Sampler: filters, penalties, logprobs, seeded determinism, and the draw's law."""
from __future__ import annotations

import math

import pytest
import torch

from colocate.sampling_params import SamplingParams
from colocate.worker.sampler import (
    Sampler, SamplingRow, _apply_penalties, make_generator, prompt_logprobs,
)

V = 64


def row(prompt=(), output=(), stop=(), **kw) -> SamplingRow:
    params = SamplingParams(**kw)
    return SamplingRow(params, make_generator(params.seed), list(prompt), list(output),
                       list(stop))


def tokens(logits, rows) -> list[int]:
    return [r.token_id for r in Sampler().sample(logits, rows)]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3  # (4, V)


# --- greedy and the filters -----------------------------------------------------

def test_greedy_is_argmax(logits):
    got = tokens(logits, [row(temperature=0.0) for _ in range(4)])
    assert got == logits.argmax(-1).tolist()


def test_greedy_fast_path_skips_logprobs(logits):
    res = Sampler().sample(logits, [row(temperature=0.0)] * 4)
    assert all(math.isnan(r.logprob) and r.top_logprobs is None for r in res)


def test_tiny_temperature_is_greedy(logits):
    # logits / 1e-30 would overflow float32; it must act as argmax instead.
    assert tokens(logits, [row(temperature=1e-30)] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_top_k_1_is_greedy(logits, temperature):
    for _ in range(5):
        got = tokens(logits, [row(temperature=temperature, top_k=1) for _ in range(4)])
        assert got == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_max(logits):
    for _ in range(5):
        got = tokens(logits, [row(temperature=2.0, top_p=1e-6) for _ in range(4)])
        assert got == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_k_tokens():
    l = torch.arange(V, dtype=torch.float32).unsqueeze(0) * 0.01   # (1, V) near uniform
    seen = {t for _ in range(300) for t in tokens(l, [row(top_k=3)])}
    assert seen == {V - 1, V - 2, V - 3}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])                 # (1, 4)
    # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}.
    seen = {t for _ in range(300) for t in tokens(probs.log(), [row(top_p=0.7)])}
    assert seen == {0, 1}
    # top_p = 0.5 is reached by the first token alone.
    seen = {t for _ in range(100) for t in tokens(probs.log(), [row(top_p=0.5)])}
    assert seen == {0}


def test_top_p_is_relative_to_the_top_k_survivors():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])                   # (1, 4)
    # After top-k=2 the survivors are renormalised to 4/7 and 3/7; top_p=0.5 keeps one.
    seen = {t for _ in range(100) for t in tokens(probs.log(), [row(top_k=2, top_p=0.5)])}
    assert seen == {0}


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])                 # (1, 4)
    # min_p=0.5 -> floor 0.25: tokens 2 and 3 go.
    seen = {t for _ in range(300) for t in tokens(probs.log(), [row(min_p=0.5)])}
    assert seen == {0, 1}


def test_zero_probability_tokens_are_never_drawn():
    l = torch.full((1, V), -math.inf)                              # (1, V)
    l[0, 7] = 0.0
    l[0, 9] = 0.0
    seen = {t for _ in range(200) for t in tokens(l, [row(seed=None)])}
    assert seen == {7, 9}


# --- penalties --------------------------------------------------------------------

def penalised(logits_row: list[float], **kw) -> list[float]:
    """One row of logits after the penalties, before any filter."""
    work = torch.tensor([logits_row])                             # (1, V')
    _apply_penalties(work, [row(**kw)])
    return work[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    got = penalised([2.0, -2.0, 2.0, -2.0, 1.0], prompt=[0], output=[1, 1],
                    repetition_penalty=2.0)
    # ids 0 (prompt) and 1 (output) were seen; 2, 3, 4 were not.
    assert got == pytest.approx([1.0, -4.0, 2.0, -2.0, 1.0])


def test_frequency_penalty_scales_with_count():
    got = penalised([1.0, 1.0, 1.0, 1.0], prompt=[3], output=[0, 0, 0, 1],
                    frequency_penalty=0.5)
    # Prompt ids are not counted: id 3 is untouched.
    assert got == pytest.approx([-0.5, 0.5, 1.0, 1.0])


def test_presence_penalty_subtracts_once():
    got = penalised([1.0, 1.0, 1.0, 1.0], prompt=[3], output=[0, 0, 0, 1],
                    presence_penalty=0.5)
    assert got == pytest.approx([0.5, 0.5, 1.0, 1.0])


def test_all_penalties_combine_in_vllm_order():
    got = penalised([3.0, -1.0, 2.0], prompt=[2], output=[0, 0, 1],
                    repetition_penalty=1.5, frequency_penalty=0.25, presence_penalty=1.0)
    # id 0: 3/1.5 - 2*0.25 - 1 = 0.5; id 1: -1*1.5 - 0.25 - 1 = -2.75; id 2: 2/1.5.
    assert got == pytest.approx([0.5, -2.75, 2.0 / 1.5])


def test_penalty_changes_greedy_choice():
    l = torch.tensor([[5.0, 4.0, 0.0]])                            # (1, 3)
    assert tokens(l, [row(temperature=0.0)]) == [0]
    assert tokens(l, [row(temperature=0.0, output=[0], presence_penalty=2.0)]) == [1]


def test_penalties_only_touch_their_own_rows(logits):
    rows = [row(temperature=0.0), row(temperature=0.0, output=list(range(V)),
                                      presence_penalty=2.0)]
    got = tokens(logits[:2], rows)
    assert got[0] == logits[0].argmax().item()


# --- min_tokens ---------------------------------------------------------------------

def test_min_tokens_masks_stop_ids_then_stops_masking():
    l = torch.zeros(1, V)                                          # (1, V)
    l[0, 2] = 10.0                                                 # EOS is the favourite
    kw = dict(temperature=0.0, min_tokens=3, max_tokens=10)
    assert tokens(l, [row(output=[5, 5], stop=[2], **kw)]) != [2]
    assert tokens(l, [row(output=[5, 5, 5], stop=[2], **kw)]) == [2]


def test_min_tokens_masks_every_stop_id_in_sampling():
    l = torch.zeros(1, 4)                                          # (1, 4)
    seen = {t for _ in range(200)
            for t in tokens(l, [row(output=[], stop=[0, 1], min_tokens=1)])}
    assert seen == {2, 3}


# --- logprobs -----------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_raw_log_softmax_and_include_sampled(logits, temperature):
    rows = [row(temperature=temperature, logprobs=3, output=[1], presence_penalty=2.0)
            for _ in range(4)]
    res = Sampler().sample(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)                        # (4, V)
    for i, r in enumerate(res):
        top_ids = ref[i].topk(3).indices.tolist()
        assert set(top_ids) <= set(r.top_logprobs)
        assert set(r.top_logprobs) == set(top_ids) | {r.token_id}
        for t, lp in r.top_logprobs.items():
            assert lp == pytest.approx(ref[i, t].item(), abs=1e-5)
        assert r.logprob == pytest.approx(ref[i, r.token_id].item(), abs=1e-5)


def test_logprobs_zero_returns_only_the_sampled_token(logits):
    res = Sampler().sample(logits[:1], [row(temperature=0.0, logprobs=0)])
    assert list(res[0].top_logprobs) == [res[0].token_id]


def test_prompt_logprobs_equals_manual_gather(logits):
    nxt = torch.tensor([3, 0, V - 1, 17])                          # (4,)
    ref = torch.log_softmax(logits, -1)[torch.arange(4), nxt]      # (4,)
    assert prompt_logprobs(logits, nxt) == pytest.approx(ref.tolist(), abs=1e-5)


def test_shape_mismatch_is_refused(logits):
    with pytest.raises(ValueError):
        Sampler().sample(logits, [row()])


# --- seeds --------------------------------------------------------------------------

def test_make_generator_none_without_seed():
    assert make_generator(None) is None
    assert make_generator(3).initial_seed() == 3


def decode(step_logits, make_rows, target: int) -> list[int]:
    """Tokens row `target` gets over the steps, with fresh rows from make_rows()."""
    rows = make_rows()
    out = []
    for l in step_logits:
        res = Sampler().sample(l[:len(rows)], rows)
        out.append(res[target].token_id)
        for r, s in zip(rows, res):
            r.output_token_ids.append(s.token_id)
    return out


SEEDED = dict(seed=1234, temperature=0.9, top_p=0.95, top_k=40,
              frequency_penalty=0.3, max_tokens=100)


@pytest.fixture
def steps() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, V, generator=g) * 2 for _ in range(40)]  # 40 x (5, V)


def test_same_seed_same_tokens(steps):
    a = decode(steps, lambda: [row(**SEEDED)], 0)
    b = decode(steps, lambda: [row(**SEEDED)], 0)
    assert a == b
    assert len(set(a)) > 1                                          # really sampling


def test_seeded_row_alone_equals_in_any_batch(steps):
    alone = decode(steps, lambda: [row(**SEEDED)], 0)
    # The same logits row sits at position 2; its neighbours differ in seed,
    # filters and penalties, and the unseeded ones consume the global RNG.
    batch = decode([torch.cat([s[1:3], s[:1], s[3:]]) for s in steps], lambda: [
        row(temperature=1.0),
        row(seed=99, temperature=0.5, min_p=0.1),
        row(**SEEDED),
        row(temperature=0.0, logprobs=2),
        row(temperature=1.3, top_k=5, repetition_penalty=1.2),
    ], 2)
    assert alone == batch


def test_different_seeds_differ(steps):
    a = decode(steps, lambda: [row(**SEEDED)], 0)
    b = decode(steps, lambda: [row(**{**SEEDED, "seed": 4321})], 0)
    assert a != b


# --- the law of the draw -------------------------------------------------------------

@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_frequencies_match_distribution(seeded):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])                     # (4,)
    batch, steps = 1000, 8
    n = batch * steps
    torch.manual_seed(0)  # the unseeded case draws from the global RNG
    # Seeded: 1000 requests with seeds 0..999, each drawing 8 times, so the law
    # holds across seeds as well as along one seed's stream.
    rows = [row(seed=i if seeded else None) for i in range(batch)]
    l = probs.log().expand(batch, 4)                               # (B, 4)
    counts = torch.zeros(4)
    for _ in range(steps):
        counts += torch.bincount(torch.tensor(tokens(l, rows)), minlength=4)
    # 5 standard deviations of a binomial count: a generous, deterministic bound.
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() < 5 * sd).all(), counts


def test_temperature_sharpens_the_distribution():
    probs = torch.tensor([[0.6, 0.4]])                             # (1, 2)
    n = 2000
    rows = [row(seed=3, temperature=0.25)] * n    # one generator, drawn n times
    hits = tokens(probs.log().expand(n, 2), rows).count(0)
    # p0 ** 4 / (p0 ** 4 + p1 ** 4) = 0.835 at temperature 1/4.
    expected = 0.6 ** 4 / (0.6 ** 4 + 0.4 ** 4)
    assert abs(hits / n - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
