"""A model runner with no model, for engine tests.

It keeps a fake KV cache that stores each token id in its slot, and on every
step checks that each sequence's block table reads back exactly its own tokens:
so a block wrongly shared, freed early or overwritten fails the step. The token
it "samples" is a fixed function of the sequence so far, so outputs do not
depend on batching, chunking, preemption or prefix hits.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeSample:
    token_id: int
    logprob: float = 0.0
    top_logprobs: dict | None = None


@dataclass
class FakeStepResult:
    sample: FakeSample | None = None
    prompt_logprobs: list | None = None


def next_token(tokens: list[int], vocab_size: int) -> int:
    return (sum(tokens) * 31 + len(tokens) * 7) % vocab_size


class FakeRunner:
    def __init__(self, block_size: int, vocab_size: int = 1000) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.slots: dict[int, int] = {}
        self.steps: list[list[tuple[str, int]]] = []   # per step: (request id, new tokens)
        self.released: list[str] = []
        self.kv_allocated = True
        self.can_drop_kv_blocks = True   # as on CPU; False: as on CUDA
        # Memory given back: blocks dropped, or all but those zeroed since a cache was
        # mapped not resident (`untouched`). A step must use none of them.
        self.dropped: set[int] = set()
        self.untouched, self.zeroed = False, set()

    def free_kv_cache(self) -> None:
        self.slots.clear()           # like a freed pool: nothing it held survives
        self.kv_allocated = False

    def allocate_kv_cache(self, resident: bool = True) -> None:
        self.kv_allocated = True
        self.dropped, self.untouched, self.zeroed = set(), not resident, set()

    def _clear(self, first: int, count: int) -> None:
        """Nothing these blocks held survives (so a step reading it fails)."""
        for p in range(first * self.block_size, (first + count) * self.block_size):
            self.slots.pop(p, None)

    def drop_kv_blocks(self, first: int, count: int) -> int:
        assert self.kv_allocated and self.can_drop_kv_blocks
        self._clear(first, count)
        self.dropped.update(range(first, first + count))
        return count * self.block_size

    def zero_kv_blocks(self, first: int, count: int) -> None:
        assert self.kv_allocated
        self._clear(first, count)
        self.dropped.difference_update(range(first, first + count))
        self.zeroed.update(range(first, first + count))

    def given_back(self, block_id: int) -> bool:
        return block_id in self.dropped or (self.untouched and block_id not in self.zeroed)

    def execute(self, sched):
        assert self.kv_allocated, "a step ran while the KV cache was freed"
        gone = {b for s in sched.scheduled for b in s.block_ids if self.given_back(b)}
        assert not gone, f"a step used the given-back blocks {sorted(gone)}"
        bs = self.block_size
        results = {}
        self.steps.append([(s.request.request_id, s.num_new_tokens) for s in sched.scheduled])
        for s in sched.scheduled:
            req = s.request
            start, n = req.num_computed_tokens, s.num_new_tokens
            for p in range(start, start + n):
                self.slots[s.block_ids[p // bs] * bs + p % bs] = req.all_token_ids[p]
        for s in sched.scheduled:
            req = s.request
            end = req.num_computed_tokens + s.num_new_tokens
            seen = [self.slots.get(s.block_ids[p // bs] * bs + p % bs) for p in range(end)]
            assert seen == req.all_token_ids[:end], f"KV content wrong for {req.request_id}"
            result = FakeStepResult()
            if s.samples:
                result.sample = FakeSample(next_token(req.all_token_ids, self.vocab_size))
            results[req.request_id] = result
        return results

    def release(self, request_id: str) -> None:
        self.released.append(request_id)
