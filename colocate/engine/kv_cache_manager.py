"""KVCacheManager: which blocks each request holds; the scheduler sees only this.

It hides the block pool from the scheduler and the engine: the scheduler asks in
tokens ("can this request grow by n tokens?") and gets blocks or a refusal; the
engine reads the block counts it reports. `pool` is kept for the manager's own
tests, which check the pool's invariants directly.

In an engine group with lending (colocate/engine/kv_lending.py), or an isolated
lending circle across processes (shared_lending.py), the manager is also where blocks
cross pools: a request's blocks are its own pool's first, then, when that is short, a
lender's (borrowed), and a lender short of blocks takes its lent ones back before
taking anything else; freeing sends each block to its owner.
"""
from __future__ import annotations

from colocate.engine.block_pool import BlockPool, KVCacheBlock, hash_block
from colocate.engine.kv_lending import Holders, KVLending
from colocate.engine.shared_lending import SharedKVLending
from colocate.engine.request import Request
from colocate.sizes import cdiv


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True, first_block_id: int = 1) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching,
                              first_block_id=first_block_id)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache statistics, in tokens, over admitted requests.
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Set by join_lending when the manager's group lends blocks between members.
        self.lending: KVLending | SharedKVLending | None = None
        self.member = ""
        # The last refusal was a lender's whose lent blocks are on their way back.
        self.awaiting_loans = False

    def join_lending(self, lending: KVLending | SharedKVLending, member: str, lends: bool,
                     holders: Holders) -> None:
        """Take part in a group's lending (or an isolated circle's, across processes)
        as `member`; holders is its scheduler."""
        lending.join(member, self.pool, lends, holders)
        self.lending, self.member = lending, member

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could take now (cached ones with no holder included)."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks of the pool's range taken: held by its requests or lent out (an
        isolated lender's offered blocks are out of its pool but nobody's)."""
        offered = self.lending.num_offered(self.member) if self.lending else 0
        return self.pool.num_used_blocks - offered

    @property
    def num_lent_blocks(self) -> int:
        """Blocks of the pool's range that other members' requests hold now."""
        return self.lending.num_lent(self.member) if self.lending else 0

    @property
    def num_borrowed_blocks(self) -> int:
        """Blocks of other members' ranges that this pool's requests hold now."""
        return self.lending.num_borrowed(self.member) if self.lending else 0

    @property
    def num_usable_blocks(self) -> int:
        """The pool's size, less the null block."""
        return self.pool.num_usable_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    # ---- prefix cache --------------------------------------------------------
    def _update_block_hashes(self, request: Request) -> None:
        tokens = request.all_token_ids
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of this request's leading full blocks already in the
        cache, and the tokens it covers. At least one token is always left to
        compute, since the step that computes it produces the next token's logits."""
        if not self.enable_prefix_caching or request.sampling_params.wants_prompt_logprobs:
            # Prompt log-probabilities need logits at every prompt position.
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count a lookup whose request was admitted. Not counted in
        get_computed_blocks: a request that waits for blocks is looked up again every
        step, and counting each attempt would skew the hit rate under pressure."""
        if self.enable_prefix_caching and not request.sampling_params.wants_prompt_logprobs:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hit_tokens

    # ---- allocation ------------------------------------------------------------
    def _blocks_needed(self, request: Request, num_new_tokens: int,
                       new_computed_blocks) -> tuple[int, int] | None:
        """(new blocks needed, prefix hits revived from the free queue), or None when the
        pool (and any lending) cannot supply them now."""
        held = len(self.req_to_blocks.get(request.request_id, ()))
        total_tokens = (request.num_computed_tokens
                        + len(new_computed_blocks) * self.block_size + num_new_tokens)
        need = max(0, cdiv(total_tokens, self.block_size) - held - len(new_computed_blocks))
        # A hit on a block that sits in the free queue takes it out of the queue,
        # so it no longer counts as free for the new blocks.
        revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        room = self.pool.num_free_blocks - revived
        self.awaiting_loans = False
        if self.lending is not None and need > room:
            room += self.lending.room(self.member)
            if need > room:
                # Across processes a lender's lent blocks come back at its borrowers'
                # next step (shared_lending.py): the request waits for them.
                self.awaiting_loans = self.lending.short(self.member, need - room)
        if need > room:
            return None
        return need, revived

    def _borrow_for(self, need: int, revived: int) -> list[KVCacheBlock] | None:
        """The blocks of `need` that own free ones (less `revived` prefix hits), and
        own lent ones taken back, cannot give: borrowed now, or None if another
        process took the offers first."""
        if self.lending is None:
            return []
        if need > self.pool.num_free_blocks - revived:
            self.lending.reclaim(self.member, need + revived)
        short = need - (self.pool.num_free_blocks - revived)
        return self.lending.borrow(self.member, short) if short > 0 else []

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] = ()) -> list[KVCacheBlock] | None:
        """Give the request room for num_new_tokens more tokens (after any
        prefix-hit blocks). Returns the newly taken blocks, or None, changing
        nothing, when the pool cannot supply them."""
        needed = self._blocks_needed(request, num_new_tokens, new_computed_blocks)
        if needed is None:
            return None
        need, revived = needed
        # Borrowed first: it is the one part that can still fail, before anything changed.
        borrowed = self._borrow_for(need, revived)
        if borrowed is None:
            return None
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_blocks[request.request_id] = len(blocks)
        new_blocks = self.pool.get_new_blocks(need - len(borrowed)) + borrowed
        blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Register the request's blocks that its computed tokens have filled."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self.num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request)
        blocks = self.req_to_blocks[rid]
        for i in range(start, num_full):
            # A borrowed block goes back to its owner: it must never be found by a
            # prefix lookup, in its owner's cache or in this one.
            if self.pool.owns(blocks[i]):
                self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[rid] = num_full

    def sleep(self) -> None:
        """The pool's memory is given back: forget every cached prefix (no request may
        hold a block), and lend nothing until wake()."""
        if self.lending is not None:      # first: an isolated lender takes its offers back
            self.lending.set_asleep(self.member, True)
        self.pool.forget_contents()

    def wake(self) -> None:
        if self.lending is not None:
            self.lending.set_asleep(self.member, False)

    def free(self, request: Request) -> None:
        """Give back all the request's blocks. Tail blocks go first into the free
        queue so they are evicted before the shared prefix they extend."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        tail_first = blocks[::-1]
        self.pool.free_blocks(b for b in tail_first if self.pool.owns(b))
        if self.lending is not None:
            self.lending.give_back([b for b in tail_first if not self.pool.owns(b)])
