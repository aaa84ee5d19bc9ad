"""Property test: random sequences of requests, steps of one service at a time (in any
order, as separate processes step), aborts, sleeps and wakes in an isolated lending
circle where "b" lends to "a" and "c" (colocate/engine/shared_lending.py).

Checked after every operation: the exchange's counts against its block states, and
that every block is where exactly one of them says: a HOME block in its owner's pool
(free, or held by the owner's requests), an OFFERED or RETURNED one out of its owner's
pool and held by nobody, a LENT one held by its borrower's requests only, never in a
prefix cache; a sleeping lender lends and offers nothing; after a borrower's step,
the lender asks for nothing or the borrower holds none of its blocks. The fake runner checks that
each block table reads back its own tokens (so no block is written by two services)
and that no step uses a block whose memory is given back. At the end: every request's
tokens as computed alone, no loan left, every pool whole once the offers are back.
"""
from __future__ import annotations

import random

from colocate.engine.shared_lending import HOME, LENT, OFFERED, RETURNED
from colocate.sampling_params import SamplingParams
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens
from tests.engine.test_shared_lending import (BLOCK, check_all_back, make_circle,
                                              offers_taken_back, step_all)

POOLS = {"a": (5, False), "b": (8, True), "c": (4, False)}
SEEDS = range(40)
__all__ = ["offers_taken_back"]          # its fixture runs here too


def random_ops(rng: random.Random, n: int = 60):
    kinds = ["add"] * 6 + ["step"] * 5 + ["abort", "nap", "wake"]
    return [(rng.choice(kinds), rng.choice(sorted(POOLS)), rng.randint(1, 30),
             rng.randint(1, 12)) for _ in range(n)]


def check_places(engines) -> None:
    lending = engines["b"].kv.lending
    lending.check_books()
    state = lending.ex.state
    held: dict[int, list[str]] = {}
    for name, engine in engines.items():
        for blocks in engine.kv.req_to_blocks.values():
            for block in blocks:
                held.setdefault(block.block_id, []).append(name)
        for block in engine.kv.pool.cached.values():
            assert state[block.block_id] == HOME
    for name, engine in engines.items():
        me = lending.circle.index(name)
        for block in engine.kv.pool.blocks[1:]:
            s, holders = state[block.block_id], held.get(block.block_id, [])
            if s == HOME:
                assert set(holders) <= {name}
                assert (block.ref_cnt == 0) == (block.block_id in engine.kv.pool.free_queue._queue)
            elif s in (OFFERED, RETURNED):
                assert not holders and block.ref_cnt == 1, (block, s, holders)
            else:
                borrower = lending.circle.members[s - LENT][0]
                assert set(holders) == {borrower} and block.ref_cnt == 1
        if engine.sleeping:
            assert not lending.num_lent(name) and not lending.ex.get(me, "offered")


def check_demand_served(engines, stepped: str) -> None:
    """A borrower's step starts by giving back what the lender asked for: after it,
    the lender asks for nothing more or the borrower holds none of its blocks."""
    lending = engines["b"].kv.lending
    if stepped != "b":
        assert not lending.ex.get(lending.circle.index("b"), "demand") \
            or not lending.num_borrowed(stepped)


def run_sequence(tmp_path, seed: int) -> tuple[int, int]:
    """The most blocks lent at once, and the borrowers' preemptions for the lender."""
    rng = random.Random(seed)
    (tmp_path / str(seed)).mkdir()
    engines, runner = make_circle(tmp_path / str(seed), POOLS, budget=64)
    prompts: dict[str, list[int]] = {}
    final: dict = {}
    most_lent = 0
    for n, (kind, member, x, y) in enumerate(random_ops(rng)):
        engine = engines[member]
        if kind == "add":
            capacity = POOLS[member][0] * BLOCK
            prompt = [(n * 37 + i * 11) % VOCAB for i in range(max(1, min(x, capacity - y)))]
            if len(prompt) + y <= capacity:
                prompts[engine.add_request(prompt, SamplingParams(max_tokens=y))] = prompt
        elif kind == "step":
            for _ in range(1 + x % 4):
                name = rng.choice(sorted(engines))     # whichever process runs next
                if engines[name].has_unfinished_requests():
                    final.update({o.request_id: o for o in engines[name].step() if o.finished})
                    check_demand_served(engines, name)
        elif kind == "abort":
            live = sorted(engine.scheduler.requests)
            if live:
                engine.abort_request(live[x % len(live)])
                prompts.pop(live[x % len(live)])
        elif kind == "nap":
            if engine.can_sleep():
                engine.sleep()
                assert all(runner.given_back(i) for i in range(
                    engine.kv.pool.first_block_id,
                    engine.kv.pool.first_block_id + engine.kv.pool.num_usable_blocks))
        else:
            engine.wake()
        check_places(engines)
        most_lent = max(most_lent, engines["b"].kv.num_lent_blocks)
    final.update(step_all(engines, order=rng.sample(sorted(engines), 3)))
    for rid, prompt in prompts.items():
        out = final[rid]
        assert out.token_ids == expected_tokens(prompt, len(out.token_ids))
        assert out.finish_reason == "length"
    check_places(engines)
    reclaims = engines["a"].scheduler.num_preemptions + engines["c"].scheduler.num_preemptions
    check_all_back(engines)
    return most_lent, reclaims


def test_random_steps_sleeps_borrows_and_reclaims(tmp_path):
    lent_in = 0
    for seed in SEEDS:
        try:
            most_lent, _ = run_sequence(tmp_path, seed)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
        lent_in += most_lent > 0
    assert lent_in >= len(SEEDS) // 2, lent_in          # the sequences do lend
