"""Lending between isolated services (colocate/engine/shared_lending.py) over the fake
runner: engines that share nothing but one exchange file and one cache, as the
processes of a lending circle share one pool file.

Each engine here has its own SharedKVLending, its own open exchange file and its own
lock, as a process would, and steps on its own, in an order the test chooses. The
fake runner is their one cache (it checks on every step that each block table reads
back its own tokens, so a block written by two services at once fails the step);
each engine sees it through OwnRange, which gives back only its own range on sleep,
as KVCacheMemory does for a shared file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.engine.shared_lending import LendingCircle, SharedKVLending
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens, prompts_of

BLOCK = 4
JOINED: list[LLMEngine] = []


@pytest.fixture(autouse=True)
def offers_taken_back():
    """An idle lender's blocks sit offered, out of its pool, when a test ends: taken
    back here so the suite's check that every pool is whole applies to them too."""
    yield
    while JOINED:
        engine = JOINED.pop()
        engine.kv.lending.reclaim(engine.kv.member, engine.kv.pool.num_usable_blocks)


class OwnRange:
    """One engine's view of the shared fake cache: sleeping gives back its range only."""

    def __init__(self, runner: FakeRunner, first: int, count: int) -> None:
        self.runner, self.first, self.count = runner, first, count

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def free_kv_cache(self) -> None:
        self.runner.drop_kv_blocks(self.first, self.count)

    def allocate_kv_cache(self, resident: bool = True) -> None:
        self.runner.zero_kv_blocks(self.first, self.count)


def make_circle(tmp_path, pools: dict[str, tuple[int, bool]], budget: int = 64,
                runner: FakeRunner | None = None, only=None):
    """Engines for `pools` (name -> (usable blocks, lends)) over one circle; `only`:
    build just those (a restarted process), joining the same exchange."""
    circle = LendingCircle(str(tmp_path / "kv.pool"),
                           tuple((name, usable, lends) for name, (usable, lends) in pools.items()))
    runner = runner or FakeRunner(BLOCK, VOCAB)
    engines = {}
    for name, (usable, lends) in pools.items():
        if only is not None and name not in only:
            continue
        first = circle.first_block(name)
        limits = EngineLimits(vocab_size=VOCAB, max_model_len=512, block_size=BLOCK,
                              num_blocks=usable + 1, max_num_seqs=8,
                              max_num_batched_tokens=budget, first_block_id=first)
        engine = LLMEngine(OwnRange(runner, first, usable), limits,
                           request_id_prefix=f"{name}-")
        engine.kv.join_lending(SharedKVLending(circle), name, lends, engine.scheduler)
        engines[name] = engine
        JOINED.append(engine)
    return engines, runner


def step_all(engines, order=None, limit=5_000) -> dict:
    """Step every engine in turn (as separate processes would, here one at a time)
    until none has work; the final outputs by request id."""
    final = {}
    for _ in range(limit):
        busy = [n for n in (order or engines) if engines[n].has_unfinished_requests()]
        if not busy:
            return final
        for name in busy:
            final.update({o.request_id: o for o in engines[name].step() if o.finished})
    raise AssertionError("the engines did not finish")


def range_of(engine):
    pool = engine.kv.pool
    return set(range(pool.first_block_id, pool.first_block_id + pool.num_usable_blocks))


def held_ids(engine):
    return {i for rid in engine.scheduler.requests for i in engine.kv.get_block_ids(rid)}


def check_all_back(engines):
    """No loan left; every idle lender's blocks are offered, and taken back they make
    its pool whole; every borrower's pool is whole."""
    for name, engine in engines.items():
        lending = engine.kv.lending
        lending.check_books()
        assert engine.kv.num_lent_blocks == engine.kv.num_borrowed_blocks == 0
        lending.reclaim(name, engine.kv.pool.num_usable_blocks)
        engine.kv.pool.check_whole()


POOLS = {"a": (8, False), "b": (16, True)}            # a borrows, b lends


def test_a_borrower_uses_an_idle_lenders_blocks(tmp_path):
    engines, runner = make_circle(tmp_path, POOLS)
    a, b = engines["a"], engines["b"]
    assert b.kv.lending.lendable("a") == 16              # an idle lender offers all at once
    assert b.statistics().kv_blocks_used == 0            # offered blocks are nobody's
    prompts = prompts_of([12, 12, 12], seed=1)           # 3 x 5 blocks at the end: > 8 own
    ids = [a.add_request(p, SamplingParams(max_tokens=8)) for p in prompts]
    a.step()
    assert len(runner.steps[0]) == 3                     # all three admitted at once
    assert a.kv.num_borrowed_blocks == b.kv.num_lent_blocks == 1
    assert held_ids(a) - range_of(a) <= range_of(b)
    assert b.statistics().kv_blocks_lent == a.statistics().kv_blocks_borrowed == 1
    final = step_all(engines)
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 8) for p in prompts]
    assert a.scheduler.num_preemptions == 0              # the overflow went to b's blocks
    check_all_back(engines)


def test_the_lender_gets_its_blocks_back_at_the_borrowers_next_step(tmp_path):
    engines, runner = make_circle(tmp_path, POOLS, budget=128)
    a, b = engines["a"], engines["b"]
    prompts = prompts_of([24, 24, 24, 24], seed=2)       # 4 x 6 blocks: 16 of b's lent
    ids = [a.add_request(p, SamplingParams(max_tokens=4)) for p in prompts]
    a.step()
    assert b.kv.num_lent_blocks == 16 and b.kv.lending.lendable("a") == 0
    mine = b.add_request(list(range(1, 30)), SamplingParams(max_tokens=3))
    assert b.step() == [] and not b.scheduler.running     # it waits: nothing is b's now
    a.step()                                              # the borrower's next step
    # b asked for 8 blocks: the two youngest of a's requests held 12 of them.
    assert [a.scheduler.requests[i].num_preemptions for i in ids] == [0, 0, 1, 1]
    b.step()
    assert (mine, 29) in runner.steps[-1]                 # b's whole prompt, in b's range
    assert set(b.kv.get_block_ids(mine)) <= range_of(b)
    final = step_all(engines)
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 4) for p in prompts]
    assert final[mine].token_ids == expected_tokens(list(range(1, 30)), 3)
    assert b.scheduler.num_preemptions == 0
    check_all_back(engines)


def test_a_lenders_running_request_waits_for_its_lent_blocks_rather_than_preempt(tmp_path):
    engines, _ = make_circle(tmp_path, {"a": (6, False), "b": (6, True)}, budget=128)
    a, b = engines["a"], engines["b"]
    prompts = prompts_of([16, 16], seed=4)               # 2 x 4 blocks now, 2 x 5 at the end
    ids = [a.add_request(p, SamplingParams(max_tokens=4)) for p in prompts]
    a.step()
    assert b.kv.num_lent_blocks == 2
    mine = b.add_request(list(range(1, 8)), SamplingParams(max_tokens=16))   # 2 -> 6 blocks
    final = step_all(engines, order=["b", "a"])
    assert final[mine].token_ids == expected_tokens(list(range(1, 8)), 16)
    assert b.scheduler.num_preemptions == 0               # it waited for its blocks
    assert a.scheduler.num_preemptions > 0                # a gave them back
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 4) for p in prompts]
    check_all_back(engines)


def test_a_sleeping_lender_lends_nothing_and_sleeps_only_with_nothing_lent(tmp_path):
    engines, runner = make_circle(tmp_path, POOLS)
    a, b = engines["a"], engines["b"]
    ids = [a.add_request(p, SamplingParams(max_tokens=8)) for p in prompts_of([12] * 3, seed=5)]
    a.step()
    assert not b.can_sleep()                              # a block of it is lent
    step_all(engines)
    b.sleep()
    assert b.sleeping and b.kv.lending.lendable("a") == 0
    assert all(runner.given_back(i) for i in range_of(b))  # its range's memory is back
    assert not any(runner.given_back(i) for i in range_of(a))
    more = [a.add_request(p, SamplingParams(max_tokens=8)) for p in prompts_of([12] * 3, seed=6)]
    final = step_all(engines)
    assert a.kv.num_borrowed_blocks == 0 and a.scheduler.num_preemptions > 0
    assert all(final[i].finished for i in ids[:0] + more)
    answer = b.add_request([5, 6, 7], SamplingParams(max_tokens=4))   # wakes it
    assert step_all(engines)[answer].token_ids == expected_tokens([5, 6, 7], 4)
    check_all_back(engines)


def test_a_restarted_borrower_gives_back_what_its_last_process_held(tmp_path):
    engines, runner = make_circle(tmp_path, POOLS)
    a = engines["a"]
    for p in prompts_of([12] * 3, seed=7):
        a.add_request(p, SamplingParams(max_tokens=8))
    a.step()
    assert engines["b"].kv.num_lent_blocks == 1
    # a's process dies; the supervisor starts a new one, which joins the same circle.
    again, _ = make_circle(tmp_path, POOLS, runner=runner, only={"a"})
    assert engines["b"].kv.num_lent_blocks == 0 == again["a"].kv.num_borrowed_blocks
    assert engines["b"].kv.lending.lendable("a") == 16
    check_all_back({"a": again["a"], "b": engines["b"]})


def test_a_lender_short_of_blocks_takes_back_those_of_a_borrower_that_died(tmp_path):
    engines, _ = make_circle(tmp_path, POOLS, budget=128)
    a, b = engines["a"], engines["b"]
    for p in prompts_of([24] * 4, seed=8):
        a.add_request(p, SamplingParams(max_tokens=4))
    a.step()
    assert b.kv.num_lent_blocks == 16
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ex, me = a.kv.lending.ex, a.kv.lending.me
    ex.set(me, "pid", dead.pid)                         # a's process is gone now
    mine = b.add_request(list(range(1, 30)), SamplingParams(max_tokens=3))
    b.step()                                            # finds a gone: takes all back
    assert b.kv.num_lent_blocks == 0
    b.step()
    assert b.scheduler.requests[mine].num_computed_tokens >= 29


def test_a_restarted_lender_keeps_its_lent_blocks_out_until_they_return(tmp_path):
    engines, runner = make_circle(tmp_path, POOLS)
    a = engines["a"]
    prompts = prompts_of([12] * 3, seed=9)
    ids = [a.add_request(p, SamplingParams(max_tokens=8)) for p in prompts]
    a.step()
    lent = held_ids(a) & range_of(engines["b"])
    assert len(lent) == 1
    again, _ = make_circle(tmp_path, POOLS, runner=runner, only={"b"})
    b = again["b"]
    assert b.kv.num_lent_blocks == 1
    assert all(block.block_id not in lent for block in b.kv.pool.blocks[1:]
               if block.ref_cnt == 0)                   # a's block is not b's to give
    answer = b.add_request(list(range(1, 40)), SamplingParams(max_tokens=20))
    final = step_all({"a": a, "b": b}, order=["b", "a"])
    assert [final[i].token_ids for i in ids] == [expected_tokens(p, 8) for p in prompts]
    assert final[answer].token_ids == expected_tokens(list(range(1, 40)), 20)
    check_all_back({"a": a, "b": b})


def test_two_processes_lend_through_one_exchange(tmp_path):
    """The lock and the counts hold across real processes: a child borrows and gives
    back while this process reads its books."""
    circle = LendingCircle(str(tmp_path / "kv.pool"), (("a", 8, False), ("b", 16, True)))
    engines, _ = make_circle(tmp_path, POOLS, only={"b"})
    child = (
        "import sys; from colocate.engine.shared_lending import LendingCircle, SharedKVLending\n"
        f"circle = LendingCircle({circle.pool_path!r}, {circle.members!r})\n"
        "lending = SharedKVLending(circle); lending.me = 0\n"
        "got = lending.borrow('a', 5); print(sorted(b.block_id for b in got)); sys.stdout.flush()\n"
        "sys.stdin.readline(); lending.give_back(got[:2]); print('done')\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        got = eval(proc.stdout.readline())
        b = engines["b"]
        assert set(got) <= range_of(b) and b.kv.num_lent_blocks == 5
        assert b.kv.lending.lendable("a") == 11
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        assert b.kv.num_lent_blocks == 3 and b.kv.lending.lendable("a") == 13
        b.kv.lending.check_books()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("field", ["members", "blocks"])
def test_an_exchange_of_another_layout_is_refused(tmp_path, field):
    make_circle(tmp_path, POOLS)
    other = (("a", 8, False), ("b", 16, True), ("c", 4, False)) if field == "members" \
        else (("a", 9, False), ("b", 16, True))
    with pytest.raises(ValueError, match="is not this circle's exchange"):
        SharedKVLending(LendingCircle(str(tmp_path / "kv.pool"), other))
