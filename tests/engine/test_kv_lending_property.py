"""Property test: random sequences of requests, steps, aborts, sleeps (of the whole
group, or of one member alone) and wakes in an engine group where "b" lends to "a"
and "c", run in lockstep with the same group without lending.

Checked after every operation: the lending books, and that every block is where one
owner's pool, one loan or its holders say, and that a sleeping lender lends nothing
(the fake runner checks besides that each block table reads back its own tokens and
that no step uses a block whose memory is given back). Checked at every step, with prefix caching
off and a group budget no member's demand can bind: the lender's schedule is exactly
the one it has without lending, so a lent block is always back in time, within the
step that needs it. At the end: every request's tokens as computed alone, every pool
whole, no loan left.
"""
from __future__ import annotations

import random

from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.engine.group import EngineGroup
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens

BLOCK = 4
POOLS = {"a": 5, "b": 8, "c": 4}         # usable blocks; b lends
MEMBER_BUDGET = 64                        # each member's max_num_batched_tokens
SEEDS = range(60)


def random_ops(rng: random.Random, n: int = 60) -> list[tuple[str, str, int, int]]:
    """(kind, member, x, y): add a prompt of about x tokens with max_tokens y; step
    1 + x % 4 times; abort the member's x-th request; sleep the whole group (after
    draining); nap: the member sleeps alone if it may (idle, nothing lent); wake.
    Weighted to adds and steps, so that pools run short and blocks are lent and
    taken back."""
    kinds = ["add"] * 6 + ["step"] * 4 + ["abort", "sleep", "nap", "wake"]
    return [(rng.choice(kinds), rng.choice(sorted(POOLS)), rng.randint(1, 30),
             rng.randint(1, 12)) for _ in range(n)]


def make(lenders, prefix: bool):
    runner = FakeRunner(BLOCK, VOCAB)
    members, first = {}, 1
    for name, blocks in POOLS.items():
        limits = EngineLimits(vocab_size=VOCAB, max_model_len=512, block_size=BLOCK,
                              num_blocks=blocks + 1, max_num_seqs=16,
                              max_num_batched_tokens=MEMBER_BUDGET,
                              enable_prefix_caching=prefix, first_block_id=first)
        members[name] = LLMEngine(runner, limits, request_id_prefix=f"{name}-")
        first += blocks
    return EngineGroup(runner, members, MEMBER_BUDGET * len(POOLS), lenders=lenders), runner


def check_books(group) -> None:
    lending = group.lending
    lending.check_books()
    holders: dict[int, int] = {}
    for name, engine in group.members.items():
        pool = engine.kv.pool
        for blocks in engine.kv.req_to_blocks.values():
            for block in blocks:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
                if not pool.owns(block):               # borrowed: from a lender, unhashed
                    assert lending.loans[block.block_id] == ("b", name)
                    assert block.block_hash is None and block.ref_cnt == 1
        for block_hash, block in pool.cached.items():  # a pool caches only its own blocks
            assert pool.owns(block) and block.block_id not in lending.loans
            assert block.block_hash == block_hash
    assert not group.members["b"].kv.num_borrowed_blocks
    assert not (group.members["b"].sleeping and lending.lent["b"])   # asleep, it lends none
    for engine in group.members.values():
        pool = engine.kv.pool
        for block in pool.blocks[1:]:
            assert block.ref_cnt == holders.get(block.block_id, 0)
            assert (block.block_id in pool.free_queue._queue) == (block.ref_cnt == 0)


def drain(groups, finals, lockstep: bool) -> None:
    for _ in range(2_000):
        if not any(g.has_unfinished_requests() for g, _ in groups):
            return
        step(groups, finals, lockstep)
    raise AssertionError("the groups did not drain")


def step(groups, finals, lockstep: bool) -> None:
    parts = []
    for (group, runner), final in zip(groups, finals):
        before = len(runner.steps)
        for outs in group.step().values():
            final.update({o.request_id: o for o in outs if o.finished})
        parts.append([(rid, n) for s in runner.steps[before:] for rid, n in s
                      if rid.startswith("b-")])
    if lockstep:
        assert parts[0] == parts[1], "the lender's step differs from its step alone"


def _counting(preempt, seen: list):
    def counted(request):
        seen.append(request.request_id)
        preempt(request)
    return counted


def test_random_sleep_wake_borrow_reclaim():
    lent_in, reclaimed_in = 0, 0           # seeds that lent blocks, that took some back
    for seed in SEEDS:
        try:
            loans, reclaims = run_sequence(random_ops(random.Random(seed)), prefix=seed % 2 == 1)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
        lent_in += loans > 0
        reclaimed_in += reclaims > 0
    # The sequences do what they are for: most lend, many see the lender take back.
    assert lent_in >= len(SEEDS) * 3 // 4 and reclaimed_in >= len(SEEDS) // 2, \
        (lent_in, reclaimed_in)


def run_sequence(ops, prefix: bool) -> tuple[int, int]:
    """Run ops on a lending group and on the same group without; return the most
    blocks on loan at once and how many requests the lender took blocks back from."""
    groups = [make(["b"], prefix), make([], prefix)]    # lending, and the same without
    finals: list[dict] = [{}, {}]
    prompts: dict[str, list[int]] = {}
    reclaimed, loans = [], 0
    for name in "ac":                     # count the lender's reclaims, for the statistics
        scheduler = groups[0][0].members[name].scheduler
        scheduler.preempt_for_owner = _counting(scheduler.preempt_for_owner, reclaimed)
    for n, (kind, member, x, y) in enumerate(ops):
        if kind == "add":
            capacity = POOLS[member] * BLOCK
            prompt = [(n * 37 + i * 11) % VOCAB for i in range(max(1, min(x, capacity - y)))]
            if len(prompt) + y > capacity:
                continue
            for group, _ in groups:
                rid = group.add_request(member, prompt, SamplingParams(max_tokens=y))
            prompts[rid] = prompt
        elif kind == "step":
            for _ in range(1 + x % 4):
                step(groups, finals, lockstep=not prefix)
        elif kind == "abort":
            live = sorted(groups[0][0].members[member].scheduler.requests)
            if live:
                rid = live[x % len(live)]
                for group, _ in groups:
                    group.members[member].abort_request(rid)
                prompts.pop(rid)
        elif kind == "sleep":               # idle first: only a whole idle group sleeps
            drain(groups, finals, lockstep=not prefix)
            for group, runner in groups:
                group.sleep()
                assert group.sleeping and not runner.kv_allocated
                assert all(not e.kv.pool.cached for e in group.members.values())
        elif kind == "nap":               # alone, while the others hold requests
            for group, runner in groups:
                engine = group.members[member]
                if group.sleepable([member]):
                    engine.sleep()
                    assert engine.sleeping and not engine.kv.pool.cached
                    assert group.sleeping or runner.dropped >= {
                        b.block_id for b in engine.kv.pool.blocks[1:]}
        else:
            for group, runner in groups:
                group.members[member].wake()
                assert not group.sleeping and runner.kv_allocated
        check_books(groups[0][0])
        loans = max(loans, len(groups[0][0].lending.loans))
    drain(groups, finals, lockstep=not prefix)
    for final in finals:
        for rid, prompt in prompts.items():
            out = final[rid]
            assert out.token_ids == expected_tokens(prompt, len(out.token_ids))
            assert out.finish_reason == "length"
    lending, _ = groups[0]
    check_books(lending)
    assert not lending.lending.loans
    for group, _ in groups:
        for engine in group.members.values():
            engine.kv.pool.check_whole()
    return loans, len(reclaimed)
