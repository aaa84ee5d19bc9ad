"""Lending in an engine group over the fake runner: a borrower overflows into a
lender's idle blocks, the lender takes them back within one step, and nothing a
tenant computed is ever found by another tenant's prefix lookup.

The fake runner checks on every step that each block table reads back its own
tokens, so a block lent while still in use, or taken back while a borrower still
writes it, fails the step it happens in.
"""
from __future__ import annotations

import weakref

from colocate.sampling_params import SamplingParams
from tests.engine.test_engine_group import BLOCK, make_group, member_range, run
from tests.engine.test_engine_scheduling import expected_tokens, prompts_of

# "a" borrows (8 blocks of its own), "b" lends (16 blocks).
POOLS = {"a": 8, "b": 16}


def lent_ids(group, owner):
    """Block ids of owner's range that the other member's requests hold."""
    own = member_range(group, owner)
    return {i for name, engine in group.members.items() if name != owner
            for rid in engine.scheduler.requests for i in engine.kv.get_block_ids(rid)
            if i in own}


def check_all_back(group):
    for engine in group.members.values():
        engine.kv.pool.check_whole()
        assert engine.kv.num_lent_blocks == engine.kv.num_borrowed_blocks == 0
    group.lending.check_books()
    assert not group.lending.loans


def test_a_borrower_uses_the_lenders_idle_blocks():
    prompts = prompts_of([12, 12, 12], seed=1)        # 3 x 5 blocks at the end: > 8 own
    lone, _ = make_group(POOLS, budget=64)              # the same group without lending
    ids = [lone.add_request("a", p, SamplingParams(max_tokens=8)) for p in prompts]
    run(lone)
    assert lone.members["a"].scheduler.num_preemptions > 0

    group, runner = make_group(POOLS, budget=64, lenders=["b"])
    a, b = group.members["a"], group.members["b"]
    ids = [group.add_request("a", p, SamplingParams(max_tokens=8)) for p in prompts]
    group.step()
    assert len(runner.steps[0]) == 3                    # all three admitted at once
    assert a.kv.num_borrowed_blocks == b.kv.num_lent_blocks == 1     # 3 x 3 - 8 own
    assert len(lent_ids(group, "b")) == b.kv.num_lent_blocks
    assert b.statistics().kv_blocks_lent == a.statistics().kv_blocks_borrowed == 1
    assert b.statistics().kv_blocks_used == 1 and b.statistics().kv_blocks_borrowed == 0
    final = run(group)
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 8) for p in prompts]
    assert a.scheduler.num_preemptions == 0             # the overflow went to b's blocks
    check_all_back(group)


def test_the_lender_takes_its_blocks_back_within_one_step():
    group, runner = make_group(POOLS, budget=128, lenders=["b"])
    a, b = group.members["a"], group.members["b"]
    prompts = prompts_of([24, 24, 24, 24], seed=2)      # 4 x 6 blocks: 16 of b's lent
    ids = [group.add_request("a", p, SamplingParams(max_tokens=4)) for p in prompts]
    group.step()
    assert b.kv.num_lent_blocks == 16 and b.kv.num_free_blocks == 0
    youngest = ids[-1]
    mine = group.add_request("b", list(range(1, 30)), SamplingParams(max_tokens=3))
    outputs = group.step()
    # In that very step: b's whole prompt (8 blocks) scheduled, a's youngest preempted.
    assert (mine, 29) in runner.steps[-1]
    assert [o.request_id for o in outputs["b"]] == [mine]
    # b needed 8 blocks: the two youngest of a's requests held 12 of them.
    assert [a.scheduler.requests[i].num_preemptions for i in ids] == [0, 0, 1, 1]
    assert youngest not in dict(runner.steps[-1])      # a-2 restarts in what b left
    assert set(b.kv.get_block_ids(mine)) <= member_range(group, "b")
    group.lending.check_books()
    final = run(group)
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 4) for p in prompts]
    assert final[mine].token_ids == expected_tokens(list(range(1, 30)), 3)
    check_all_back(group)


def test_lending_never_gives_a_cross_service_prefix_hit():
    group, _ = make_group({"a": 8, "b": 6}, budget=64, lenders=["b"])
    a, b = group.members["a"], group.members["b"]
    # b fills and caches four blocks of its own, then goes idle: free, still cached.
    b_prompt = list(range(200, 217))
    group.add_request("b", b_prompt, SamplingParams(max_tokens=1))
    run(group)
    assert len(b.kv.pool.cached) == 4 and b.kv.num_free_blocks == 6
    # a overflows: a filler takes 7 of its 8 blocks, its next prompt borrows 5 of b's.
    filler = group.add_request("a", list(range(400, 428)), SamplingParams(max_tokens=4))
    a_prompt = list(range(300, 324))
    group.add_request("a", a_prompt, SamplingParams(max_tokens=2))
    group.step()
    lent = lent_ids(group, "b")
    assert len(lent) == a.kv.num_borrowed_blocks == 5
    assert all(b.kv.pool.blocks[i - b.kv.pool.first_block_id + 1].block_hash is None
               for i in lent)                          # evicted as they were lent
    assert len(b.kv.pool.cached) == 1                   # three of its four went with them
    run(group)
    # b's blocks came back unhashed, and a cached only blocks of its own range.
    for engine, name in ((a, "a"), (b, "b")):
        cached = {blk.block_id for blk in engine.kv.pool.cached.values()}
        assert cached <= member_range(group, name)
    again_b = group.add_request("b", a_prompt[:20], SamplingParams(max_tokens=1))
    again_a = group.add_request("a", b_prompt, SamplingParams(max_tokens=1))
    final = run(group)
    assert final[again_b].num_cached_tokens == 0       # never a's tokens for b
    assert final[again_a].num_cached_tokens == 0       # never b's tokens for a
    assert filler.startswith("a-")
    check_all_back(group)


def test_a_lender_does_not_borrow_and_lenders_schedule_first():
    group, _ = make_group({"a": 4, "b": 4, "c": 8}, budget=64, lenders=["c", "b"])
    assert group.order == ["b", "c", "a"]
    assert group.lending.lendable("b") == 0 and group.lending.lendable("a") == 12
    prompts = prompts_of([6, 6], seed=4)               # 2 x 3 blocks > b's 4: b preempts
    ids = [group.add_request("b", p, SamplingParams(max_tokens=6)) for p in prompts]
    final = run(group)
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 6) for p in prompts]
    assert group.members["b"].scheduler.num_preemptions > 0
    assert group.members["c"].kv.num_lent_blocks == 0
    check_all_back(group)


def test_a_lending_group_dropped_mid_request_is_freed_at_once():
    """No reference cycle: the pools go with the group, as an engine's do (the
    suite's check that every live pool is whole relies on it)."""
    group, _ = make_group(POOLS, budget=64, lenders=["b"])
    for p in prompts_of([12, 12, 12], seed=5):
        group.add_request("a", p, SamplingParams(max_tokens=8))
    group.step()
    assert group.lending.loans
    pools = [weakref.ref(e.kv.pool) for e in group.members.values()]
    del group
    assert all(ref() is None for ref in pools)
