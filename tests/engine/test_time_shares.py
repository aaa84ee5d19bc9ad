"""Time shares in a fused group: a member that leads the least served by more than the
slice sits out steps, so a light service beside a flood gets its half of the engine's
time, not only its tokens. Time here is a fake clock the runner advances by a cost
model of a CPU step (a fixed part for the weights, a part per token), so every
figure is exact and nothing depends on this machine's speed."""
from __future__ import annotations

import pytest

from colocate.engine.scheduler import SchedulerOutput
from colocate.engine.time_shares import TimeShares
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_engine_group import BLOCK, make_group, run
from tests.engine.test_engine_scheduling import VOCAB, expected_tokens, prompts_of

STEP_S, TOKEN_S = 0.004, 0.0015           # a step's weights, and each token's compute


class CostedRunner(FakeRunner):
    """The fake runner, on a clock each step advances by what the step would cost."""

    def __init__(self) -> None:
        super().__init__(BLOCK, VOCAB)
        self.now = 0.0
        self.finished_at: dict[str, float] = {}

    def clock(self) -> float:
        return self.now

    def execute(self, sched):
        self.now += STEP_S + TOKEN_S * sched.num_batched_tokens
        return super().execute(sched)


def light_finish(with_flood: bool, **options) -> tuple[float, dict, dict]:
    """b's one request, alone or beside a's eight: b's finish time on the fake clock,
    and every request's tokens with what it should have got."""
    runner = CostedRunner()
    group, _ = make_group({"a": 200, "b": 200}, budget=64, runner=runner,
                          clock=runner.clock, **options)
    ids = {}
    if with_flood:
        for p in prompts_of([60] * 8, seed=9):
            ids[group.add_request("a", p, SamplingParams(max_tokens=40))] = p
    light = [1, 2, 3, 4, 5]
    rid = group.add_request("b", light, SamplingParams(max_tokens=20))
    ids[rid] = light
    done_at, final = None, {}
    while group.has_unfinished_requests():
        for outs in group.step().values():
            final.update({o.request_id: o for o in outs if o.finished})
        if done_at is None and rid in final:
            done_at = runner.now
    got = {i: final[i].token_ids for i in ids}
    want = {i: expected_tokens(p, 40 if i.startswith("a-") else 20) for i, p in ids.items()}
    return done_at, got, want


def test_a_light_service_beside_a_flood_gets_half_the_engine_time():
    alone, got, want = light_finish(False)
    assert got == want
    beside, got, want = light_finish(True)
    assert got == want                     # the flood's requests all finish, exactly
    # b's 20 tokens beside the flood take at most twice their time alone, plus the
    # slice the flood may lead by and one of its steps (its prefill chunk).
    assert beside <= 2 * alone + 0.1 + STEP_S + TOKEN_S * 64, (beside, alone)
    # By tokens alone (no time slice) b got its token every step and still waited for
    # the flood's whole batch each time: well past twice.
    tokens_only, _, _ = light_finish(True, time_slice_s=None)
    assert tokens_only > 3 * alone


def test_a_leader_sits_out_only_while_it_leads_by_more_than_the_slice():
    shares = TimeShares({"a": 1.0, "b": 1.0}, slice_s=0.1)
    assert shares.admit({"a", "b"}) == {"a", "b"}
    shares.charge({"a": 9, "b": 1}, 0.2)                  # a: 0.18 s, b: 0.02 s
    assert shares.admit({"a", "b"}) == {"b"}
    shares.charge({"b": 1}, 0.05)                          # b: 0.07 s, a leads by 0.11
    assert shares.admit({"a", "b"}) == {"b"}
    shares.charge({"b": 1}, 0.02)                          # b: 0.09 s
    assert shares.admit({"a", "b"}) == {"a", "b"}
    assert shares.admit({"a"}) == {"a"}                    # alone, a always joins


def test_weights_scale_the_time_a_member_may_use():
    shares = TimeShares({"a": 3.0, "b": 1.0}, slice_s=0.1)
    shares.admit({"a", "b"})
    shares.charge({"a": 3, "b": 1}, 0.4)                   # a: 0.3 / 3, b: 0.1 / 1
    assert shares.admit({"a", "b"}) == {"a", "b"}


def test_a_member_back_from_idle_banks_no_credit():
    shares = TimeShares({"a": 1.0, "b": 1.0}, slice_s=0.1)
    shares.admit({"a"})
    shares.charge({"a": 1}, 5.0)                           # a ran alone for 5 s
    assert shares.admit({"a", "b"}) == {"a", "b"}          # b starts level with a
    assert shares.used["b"] == shares.used["a"] == 5.0


def test_lenders_always_join_and_no_slice_admits_everyone():
    lent = TimeShares({"a": 1.0, "b": 1.0}, slice_s=0.0, always_admitted={"a"})
    lent.admit({"a", "b"})
    lent.charge({"a": 1}, 1.0)
    assert lent.admit({"a", "b"}) == {"a", "b"}
    free = TimeShares({"a": 1.0, "b": 1.0}, slice_s=None)
    free.admit({"a", "b"})
    free.charge({"a": 1}, 1.0)
    assert free.admit({"a", "b"}) == {"a", "b"}


def test_a_member_that_can_schedule_nothing_never_stalls_the_others():
    """b is the least served and has work it cannot schedule (held as if waiting for
    blocks); a leads past the slice, yet a's steps go on: when those that may join
    can schedule nothing, the step goes to everyone with work."""
    runner = CostedRunner()
    group, _ = make_group({"a": 40, "b": 40}, runner=runner, clock=runner.clock,
                          time_slice_s=0.0)
    a_ids = {group.add_request("a", p, SamplingParams(max_tokens=10)): p
             for p in prompts_of([12] * 2, seed=3)}
    group.add_request("b", [1, 2, 3], SamplingParams(max_tokens=4))
    b = group.members["b"].scheduler
    b.schedule = lambda *args, **kwargs: SchedulerOutput()     # b can schedule nothing
    steps = 0
    while any(i in group.members["a"].scheduler.requests for i in a_ids):
        assert group.step().get("a") is not None
        steps += 1
    assert steps == 10 and group.time_shares.used["a"] > group.time_shares.used["b"]


def test_a_bad_slice_is_refused():
    with pytest.raises(ValueError, match="time slice"):
        TimeShares({"a": 1.0}, slice_s=-1.0)
