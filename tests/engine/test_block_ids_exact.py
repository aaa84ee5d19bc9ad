"""Exact block ids and free-queue order through a prefix hit, a preemption and frees,
in the manner of vLLM's tests/v1/core: the pool's behaviour is pinned, not bounded.

Pool: 8 usable blocks of 4 tokens (block 0 is the null block). New blocks come from
the free queue's head; a finished or preempted request's blocks go to its tail in
reverse (tail blocks first, so they are evicted before the prefix they extend); a
prefix hit takes a cached block out of the queue wherever it sits.
"""
from __future__ import annotations

from colocate.sampling_params import SamplingParams
from tests.engine.test_engine_scheduling import expected_tokens, make_engine

SHARED = list(range(100, 108))           # two full blocks


def _state(engine):
    blocks = {rid: engine.kv.get_block_ids(rid) for rid in engine.scheduler.requests}
    return blocks, engine.kv.pool.free_queue.block_ids()


def test_block_ids_and_eviction_order():
    engine, _ = make_engine(num_blocks=9, block_size=4, max_num_batched_tokens=64)
    assert _state(engine) == ({}, [1, 2, 3, 4, 5, 6, 7, 8])

    # A: 9 prompt tokens take blocks 1-3; it finishes after 2 tokens and frees 3, 2, 1.
    a = engine.add_request(SHARED + [7], SamplingParams(max_tokens=2))
    engine.step()
    assert _state(engine) == ({a: [1, 2, 3]}, [4, 5, 6, 7, 8])
    engine.step()
    assert _state(engine) == ({}, [4, 5, 6, 7, 8, 3, 2, 1])

    # B shares A's two full blocks: a hit takes 1 and 2 out of the queue, its third
    # block is the queue's head (4). C's 12 tokens take 5, 6, 7.
    b = engine.add_request(SHARED + [50, 51], SamplingParams(max_tokens=8))
    c = engine.add_request(list(range(200, 212)), SamplingParams(max_tokens=8))
    steps = []
    for _ in range(11):
        engine.step()
        steps.append(_state(engine))
    assert steps[0] == ({b: [1, 2, 4], c: [5, 6, 7]}, [8, 3])
    assert steps[1] == ({b: [1, 2, 4], c: [5, 6, 7, 8]}, [3])       # C's position 12
    assert steps[3] == ({b: [1, 2, 4, 3], c: [5, 6, 7, 8]}, [])      # B's position 12
    # C needs a fifth block and none is free: C, the newest, preempts itself; its
    # blocks go back tail first. Still cached, so readmitting it would revive four
    # blocks and need a fifth, which is not there: it waits (step 6).
    assert steps[5] == ({b: [1, 2, 4, 3], c: []}, [8, 7, 6, 5])
    assert steps[6] == steps[5]
    # B's last step takes the queue's head, 8 (evicting C's cached fourth block),
    # then B finishes and frees 8, 3, 4, 2, 1.
    assert steps[7] == ({c: []}, [7, 6, 5, 8, 3, 4, 2, 1])
    # C returns: a hit on 5, 6, 7 (block 8's hash was evicted), two new blocks.
    assert steps[8] == ({c: [5, 6, 7, 8, 3]}, [4, 2, 1])
    assert steps[10] == ({}, [4, 2, 1, 3, 8, 7, 6, 5])

    assert engine.scheduler.num_preemptions == 1
    assert (engine.kv.prefix_queries, engine.kv.prefix_hits) == (9 + 10 + 12 + 17, 8 + 12)
    engine.kv.pool.check_whole()


def test_tokens_survive_the_same_schedule():
    """The fake runner checks every block table reads back its own tokens; the
    outputs are what each prompt gives alone."""
    engine, _ = make_engine(num_blocks=9, block_size=4, max_num_batched_tokens=64)
    prompts = [SHARED + [7], SHARED + [50, 51], list(range(200, 212))]
    ids = [engine.add_request(p, SamplingParams(max_tokens=n))
           for p, n in zip(prompts, (2, 8, 8))]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
    assert [final[i] for i in ids] == [expected_tokens(p, n) for p, n in zip(prompts, (2, 8, 8))]
