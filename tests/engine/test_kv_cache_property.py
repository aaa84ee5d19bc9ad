"""Property test: random allocate / append / free / abort sequences through the
KV cache manager keep the pool's books straight, and no block is shared between
live requests except through a prefix hit on identical content."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from colocate.engine.kv_cache_manager import KVCacheManager
from colocate.engine.request import Request
from colocate.sampling_params import SamplingParams

BLOCK = 4
# A small alphabet of prompt starts makes prefix hits common.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]

op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PREFIXES) - 1), st.lists(st.integers(0, 50), max_size=9)),
    st.tuples(st.just("append"), st.integers(0, 20), st.integers(1, 6)),
    st.tuples(st.just("free"), st.integers(0, 20), st.just(0)),
)


def check_invariants(kv: KVCacheManager, live: dict[str, Request]) -> None:
    pool = kv.pool
    owners: dict[int, list[str]] = {}
    for rid, blocks in kv.req_to_blocks.items():
        assert len(blocks) == len({b.block_id for b in blocks}), "a request holds a block twice"
        for b in blocks:
            assert b.block_id != 0, "the null block was handed out"
            owners.setdefault(b.block_id, []).append(rid)
    for block in pool.blocks[1:]:
        holders = owners.get(block.block_id, [])
        assert block.ref_cnt == len(holders)
        in_free = block.block_id in pool.free_queue._queue
        assert in_free == (block.ref_cnt == 0)
        if len(holders) > 1:
            # Shared only as a cached full block with identical token content.
            assert block.block_hash is not None
            index = [kv.req_to_blocks[r].index(block) for r in holders]
            contents = {tuple(live[r].all_token_ids[i * BLOCK:(i + 1) * BLOCK])
                        for r, i in zip(holders, index)}
            assert len(contents) == 1 and len(next(iter(contents))) == BLOCK
    assert pool.num_free_blocks + len(owners) == pool.num_usable_blocks
    for h, block in pool.cached.items():
        assert block.block_hash == h


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_operations_keep_pool_consistent(ops):
    kv = KVCacheManager(num_blocks=17, block_size=BLOCK)
    live: dict[str, Request] = {}
    order: list[str] = []
    for n, (kind, a, b) in enumerate(ops):
        if kind == "add":
            prompt = PREFIXES[a] + b
            req = Request(f"r{n}", prompt, SamplingParams(max_tokens=64))
            hits, num_hit = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                kv.cache_blocks(req)
                live[req.request_id] = req
                order.append(req.request_id)
        elif order:
            req = live[order[a % len(order)]]
            if kind == "append":
                # Decode-like growth: the new tokens are computed, then cached.
                if kv.allocate_slots(req, b) is not None:
                    for i in range(b):
                        req.append_output_token(100 + i)
                    req.num_computed_tokens = req.num_tokens
                    kv.cache_blocks(req)
            else:
                kv.free(req)
                del live[req.request_id]
                order.remove(req.request_id)
        check_invariants(kv, live)
    for rid in order:
        kv.free(live[rid])
    kv.pool.check_whole()
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
