"""A member of an engine group sleeping alone, over the fake runner: its block range is
given back while the others step (a step never touches a given-back block: the fake
runner checks), its next request wakes it alone, zeroed; a lender sleeps only once
nothing of it is lent and lends nothing asleep; where the device frees no range alone
(CUDA) the members sleep together and wake together."""
from __future__ import annotations

import pytest

from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_engine_group import BLOCK, make_group, member_range, run
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens

PARAMS = SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = list(range(1, 12))


def wakes(group) -> dict[str, int]:
    return {m: e.statistics().wake.count for m, e in group.members.items()}


def test_a_member_sleeps_alone_while_the_others_step():
    group, runner = make_group({"a": 8, "b": 8, "c": 8})
    busy = group.add_request("a", PROMPT, SamplingParams(max_tokens=20))
    group.step()
    assert group.sleepable(["a", "b"]) == ["b"]
    group.members["b"].sleep()
    assert group.members["b"].sleeping and not group.sleeping and runner.kv_allocated
    assert runner.dropped == member_range(group, "b")
    assert [e.statistics().sleeping for e in group.members.values()] == [False, True, False]
    late = group.add_request("c", PROMPT, PARAMS)          # c is awake: b stays asleep
    finals = run(group)
    assert finals[busy].token_ids == expected_tokens(PROMPT, 20)
    assert finals[late].token_ids == expected_tokens(PROMPT, 6)
    assert group.members["b"].sleeping and wakes(group) == {"a": 0, "b": 0, "c": 0}
    again = group.add_request("b", PROMPT, PARAMS)          # wakes b alone, zeroed
    assert not group.members["b"].sleeping and not runner.dropped
    assert runner.zeroed >= member_range(group, "b")
    assert run(group)[again].token_ids == expected_tokens(PROMPT, 6)
    assert wakes(group) == {"a": 0, "b": 1, "c": 0}


def test_a_busy_member_cannot_sleep_and_nothing_changes():
    group, runner = make_group({"a": 8, "b": 8})
    group.add_request("a", PROMPT, PARAMS)
    group.step()
    with pytest.raises(RuntimeError, match=r"cannot sleep: 1 running .* in a$"):
        group.sleep_members(["a", "b"])
    assert not group.members["b"].sleeping and not runner.dropped
    assert group.sleepable(["a", "b"]) == ["b"]
    run(group)


def test_a_lender_sleeps_once_nothing_is_lent_and_lends_nothing_asleep():
    group, runner = make_group({"a": 6, "b": 8}, lenders=["b"])
    prompts = [[1 + i] + list(range(20, 34)) for i in range(4)]   # 15 + 6 tokens: 6 blocks
    ids = [group.add_request("a", p, PARAMS) for p in prompts[:2]]
    group.step()
    assert group.members["b"].kv.num_lent_blocks > 0
    assert group.sleepable(["b"]) == [] and not group.members["b"].can_sleep()
    with pytest.raises(RuntimeError, match=r"cannot sleep: \d block\(s\) in b are lent"):
        group.members["b"].sleep()
    finals = run(group)
    group.members["b"].sleep()                    # the loans ended with a's requests
    assert runner.dropped == member_range(group, "b")
    assert group.lending.lendable("a") == 0
    ids += [group.add_request("a", p, PARAMS) for p in prompts[2:]]
    group.step()
    assert group.members["a"].kv.num_borrowed_blocks == 0
    running, waiting = group.members["a"].scheduler.queue_lengths()
    assert (running, waiting) == (1, 1)          # on its own 6 blocks, one at a time
    finals.update(run(group))
    assert [finals[i].token_ids for i in ids] == [expected_tokens(p, 6) for p in prompts]
    assert group.members["b"].sleeping and wakes(group) == {"a": 0, "b": 0}


def test_the_last_to_sleep_frees_the_cache_and_the_first_to_wake_maps_only_its_range():
    group, runner = make_group({"a": 8, "b": 8})
    group.members["a"].sleep()
    group.members["b"].sleep()
    assert group.sleeping and not runner.kv_allocated
    assert all(not e.kv.pool.cached for e in group.members.values())
    rid = group.add_request("b", PROMPT, PARAMS)
    assert runner.kv_allocated and group.members["a"].sleeping
    assert {b for b in member_range(group, "a") if runner.given_back(b)} == \
        member_range(group, "a")                 # mapped, but a's pages never touched
    assert not any(runner.given_back(b) for b in member_range(group, "b"))
    assert run(group)[rid].token_ids == expected_tokens(PROMPT, 6)
    assert wakes(group) == {"a": 0, "b": 1}


def test_where_no_range_can_be_freed_alone_the_members_sleep_and_wake_together():
    runner = FakeRunner(BLOCK, VOCAB)
    runner.can_drop_kv_blocks = False            # as a CUDA cache: one allocation
    group, _ = make_group({"a": 8, "b": 8}, runner=runner)
    with pytest.raises(RuntimeError, match="shares one KV cache allocation with"):
        group.members["b"].sleep()
    assert group.sleepable(["b"]) == [] and group.sleepable(["a", "b"]) == ["a", "b"]
    group.sleep_members(["a", "b"])
    assert group.sleeping and not runner.kv_allocated
    rid = group.add_request("b", PROMPT, PARAMS)    # one member's request wakes all
    assert runner.kv_allocated and not any(e.sleeping for e in group.members.values())
    assert run(group)[rid].token_ids == expected_tokens(PROMPT, 6)
    assert wakes(group) == {"a": 0, "b": 1}
