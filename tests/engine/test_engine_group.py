"""EngineGroup over the fake runner: several services' engines stepping as one batch.

The fake runner checks every block table reads back its own tokens, so a block
shared across members, or outside a member's range, fails the step it is used in.
"""
from __future__ import annotations

import pytest

from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.engine.group import EngineGroup, GroupStepFailedError, fair_shares
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens, prompts_of

BLOCK = 4


def make_group(usable: dict[str, int], budget: int = 32, max_num_seqs: int = 8,
               weights=None, runner=None, lenders=(), prefill_cap: int | None = 256,
               **group_options):
    runner = runner or FakeRunner(BLOCK, VOCAB)
    members, first = {}, 1
    for name, blocks in usable.items():
        limits = EngineLimits(vocab_size=VOCAB, max_model_len=512, block_size=BLOCK,
                              num_blocks=blocks + 1, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=budget, first_block_id=first)
        members[name] = LLMEngine(runner, limits, request_id_prefix=f"{name}-")
        first += blocks
    return EngineGroup(runner, members, budget, weights, lenders, prefill_cap,
                       **group_options), runner


def run(group, limit=10_000):
    final = {}
    for _ in range(limit):
        if not group.has_unfinished_requests():
            break
        for outs in group.step().values():
            final.update({o.request_id: o for o in outs if o.finished})
    return final


def member_range(group, name):
    pool = group.members[name].kv.pool
    return {b.block_id for b in pool.blocks[1:]}


def test_members_get_the_tokens_they_get_alone():
    group, runner = make_group({"a": 40, "b": 40, "c": 40})
    prompts = {m: prompts_of([3, 17, 30], seed=i) for i, m in enumerate("abc")}
    prompts["b"].append(prompts["a"][1])            # the same prompt in two services
    ids = {m: [group.add_request(m, p, SamplingParams(max_tokens=12)) for p in ps]
           for m, ps in prompts.items()}
    final = run(group)
    for m, ps in prompts.items():
        assert [final[i].token_ids for i in ids[m]] == [expected_tokens(p, 12) for p in ps]
    # One forward for everyone: the first step batched all three members' prefills.
    assert {rid.split("-")[0] for rid, _ in runner.steps[0]} == {"a", "b", "c"}
    for m in "abc":
        group.members[m].kv.pool.check_whole()


def test_a_flood_fills_only_its_own_pool():
    group, _ = make_group({"a": 16, "b": 12}, budget=64)
    b = group.members["b"]
    for p in prompts_of([20] * 10, seed=3):
        group.add_request("a", p, SamplingParams(max_tokens=30))
    own = member_range(group, "a")
    assert own.isdisjoint(member_range(group, "b"))
    while group.has_unfinished_requests():
        group.step()
        held = {i for rid in group.members["a"].scheduler.requests
                for i in group.members["a"].kv.get_block_ids(rid)}
        assert held <= own
        assert b.kv.num_free_blocks == b.kv.num_usable_blocks == 12
    assert group.members["a"].scheduler.num_preemptions > 0     # it was short of blocks
    assert b.scheduler.num_preemptions == 0


def test_no_prefix_cache_hit_across_services():
    group, _ = make_group({"a": 20, "b": 20})
    prompt = list(range(100, 124))                     # six full blocks
    first = group.add_request("a", prompt, SamplingParams(max_tokens=2))
    run(group)
    again = group.add_request("a", prompt, SamplingParams(max_tokens=2))
    other = group.add_request("b", prompt, SamplingParams(max_tokens=2))
    final = run(group)
    assert final[again].num_cached_tokens == 20        # a's own cache: five blocks hit
    assert final[other].num_cached_tokens == 0         # never a's blocks for b
    assert first.startswith("a-") and other.startswith("b-")


def _tokens_per_step(runner, members):
    """Per step, the tokens each member had scheduled."""
    return [{m: sum(n for rid, n in step if rid.startswith(f"{m}-")) for m in members}
            for step in runner.steps]


@pytest.mark.parametrize("weights,expected", [(None, (16, 16)), ({"a": 3, "b": 1}, (24, 8))])
def test_backlogged_members_split_every_step_by_weight(weights, expected):
    """Both flooded with long prompts (prefill chunks): every step of the window in
    which both are backlogged gives each exactly its weighted share of 32 tokens."""
    group, runner = make_group({"a": 200, "b": 200}, budget=32, weights=weights)
    for m in "ab":
        for p in prompts_of([120] * 6, seed=ord(m)):
            group.add_request(m, p, SamplingParams(max_tokens=4))
    for _ in range(15):
        group.step()
    steps = _tokens_per_step(runner, "ab")
    assert all((s["a"], s["b"]) == expected for s in steps), steps


def test_a_flooded_neighbour_does_not_slow_a_light_service_in_steps():
    """b's one request takes as many steps beside a's flood as it does alone: it
    wants less than its share, so it gets all it wants every step."""
    alone, _ = make_group({"a": 200, "b": 200}, budget=32)
    rid = alone.add_request("b", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20))
    steps_alone = 0
    while alone.has_unfinished_requests():
        alone.step()
        steps_alone += 1
    group, _ = make_group({"a": 200, "b": 200}, budget=32)
    for p in prompts_of([60] * 8, seed=9):
        group.add_request("a", p, SamplingParams(max_tokens=40))
    rid = group.add_request("b", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20))
    steps = 0
    while rid in group.members["b"].scheduler.requests:
        group.step()
        steps += 1
    assert steps == steps_alone == 20


def test_a_neighbours_long_prompt_is_chunked_beside_decodes():
    """a decodes; b's 300-token prompt arrives. Every step holding a's decode takes at
    most the cap of b's prompt (not the 128 the budget has room for), a gets its token
    every step, and both answers are the tokens they are without a cap."""
    cap = 24
    group, runner = make_group({"a": 200, "b": 200}, budget=128, prefill_cap=cap)
    pa, pb = prompts_of([20, 300], seed=5)
    ra = group.add_request("a", pa, SamplingParams(max_tokens=30))
    group.step()                                  # a's prompt alone: not a mixed step
    rb = group.add_request("b", pb, SamplingParams(max_tokens=5))
    final = run(group)
    assert final[ra].token_ids == expected_tokens(pa, 30)
    assert final[rb].token_ids == expected_tokens(pb, 5)
    steps = _tokens_per_step(runner, "ab")
    assert steps[0] == {"a": 20, "b": 0}
    mixed = [s for s in steps[1:] if s["a"] == 1]
    assert len(mixed) == 29                       # a decoded in every step until done
    assert all(s["b"] <= cap for s in mixed), mixed
    assert [s["b"] for s in mixed[:12]] == [cap] * 12    # b's prompt, cap by cap
    # Once a is done, b's last decodes run alone; no step ever passed the budget.
    assert all(sum(s.values()) <= 128 for s in steps)


def test_the_prefill_cap_is_split_fairly_between_members_with_prompts():
    """Two members' long prompts beside a third's decode: the cap is shared, each of
    the two gets half of it every mixed step."""
    group, runner = make_group({"a": 200, "b": 200, "c": 200}, budget=128, prefill_cap=32)
    rc = group.add_request("c", [1, 2, 3], SamplingParams(max_tokens=20))
    group.step()
    for m in "ab":
        group.add_request(m, prompts_of([200], seed=ord(m))[0], SamplingParams(max_tokens=2))
    for _ in range(5):
        group.step()
    steps = _tokens_per_step(runner, "abc")[1:]
    assert all((s["a"], s["b"], s["c"]) == (16, 16, 1) for s in steps), steps
    assert run(group)[rc].token_ids == expected_tokens([1, 2, 3], 20)


def test_without_a_decode_a_step_is_not_capped():
    group, runner = make_group({"a": 200, "b": 200}, budget=128, prefill_cap=8)
    for m in "ab":
        group.add_request(m, prompts_of([100], seed=ord(m))[0], SamplingParams(max_tokens=3))
    group.step()
    assert _tokens_per_step(runner, "ab")[0] == {"a": 64, "b": 64}


class FailOnce(FakeRunner):
    def __init__(self, *args, fail_at: int):
        super().__init__(*args)
        self.fail_at, self.calls = fail_at, 0

    def execute(self, sched):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected")
        return super().execute(sched)


def test_a_failed_step_names_each_members_requests_and_the_group_goes_on():
    runner = FailOnce(BLOCK, VOCAB, fail_at=2)
    group, _ = make_group({"a": 20, "b": 20}, runner=runner)
    ra = group.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    rb = group.add_request("b", [4, 5, 6], SamplingParams(max_tokens=5))
    group.step()
    late = group.add_request("b", [7, 8], SamplingParams(max_tokens=5))
    with pytest.raises(GroupStepFailedError) as err:
        group.step()
    assert err.value.request_ids == {"a": [ra], "b": [rb, late]}
    for member, ids in err.value.request_ids.items():
        for rid in ids:
            group.members[member].abort_request(rid)
    after = group.add_request("a", [9, 9, 9], SamplingParams(max_tokens=3))
    assert run(group)[after].token_ids == expected_tokens([9, 9, 9], 3)
    for m in "ab":
        group.members[m].kv.pool.check_whole()


@pytest.mark.parametrize("demands,weights,budget,want", [
    ({"a": 100, "b": 100}, {"a": 1, "b": 1}, 32, {"a": 16, "b": 16}),
    ({"a": 5, "b": 100}, {"a": 1, "b": 1}, 32, {"a": 5, "b": 27}),      # a's rest goes to b
    ({"a": 100, "b": 100, "c": 0}, {"a": 1, "b": 1, "c": 1}, 31, {"a": 16, "b": 15, "c": 0}),
    ({"a": 100, "b": 100}, {"a": 3, "b": 1}, 32, {"a": 24, "b": 8}),
    ({"a": 10, "b": 10}, {"a": 1, "b": 1}, 64, {"a": 10, "b": 10}),     # nobody short
])
def test_fair_shares(demands, weights, budget, want):
    assert fair_shares(demands, weights, budget) == want


def test_rounding_goes_to_the_least_served():
    shares = fair_shares({"a": 100, "b": 100}, {"a": 1, "b": 1}, 31, served={"a": 5, "b": 2})
    assert shares == {"a": 15, "b": 16}


def test_bad_groups_are_refused():
    group, runner = make_group({"a": 4, "b": 4})
    with pytest.raises(ValueError, match="distinct request_id_prefix"):
        EngineGroup(runner, {"x": group.members["a"], "y": LLMEngine(
            runner, group.members["b"].limits, request_id_prefix="a-")}, 32)
    with pytest.raises(ValueError, match="does not share the group's runner"):
        EngineGroup(FakeRunner(BLOCK, VOCAB), group.members, 32)
    with pytest.raises(ValueError, match="weight of 'a' must be > 0"):
        EngineGroup(runner, group.members, 32, weights={"a": 0})
    with pytest.raises(ValueError, match="no member 'z'"):
        group.add_request("z", [1], SamplingParams(max_tokens=1))
    rid = group.add_request("a", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use in this group"):
        group.add_request("b", [1, 2], SamplingParams(max_tokens=1), request_id=rid)
    run(group)
