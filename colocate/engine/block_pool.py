"""KV blocks in three layers: the block, the free queue, the pool.

A block is a fixed run of `block_size` token slots in every layer's KV tensors.
Blocks are shared by reference count: a prefix-cache hit lends a request the
blocks another request filled. A block whose count drops to zero goes to the tail
of the free queue but keeps its contents and hash, so a later request with the
same prefix can still take it back; it is evicted (its hash forgotten) only when
the pool hands it out as a new block, least recently freed first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from colocate.sizes import cdiv

NULL_BLOCK_ID = 0
# Tokens per KV block, for every service and for LLM by default. The memory plan
# carves a byte budget into whole blocks of this size (colocate/memory/sizing.py).
KV_BLOCK_SIZE = 16


def pool_blocks(kv_tokens: int, block_size: int = KV_BLOCK_SIZE) -> int:
    """A pool's size for kv_tokens: the blocks that hold them plus the null block."""
    return cdiv(kv_tokens, block_size) + 1


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt})"


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of a full block: its tokens and, through the parent, every
    token before it. Two blocks are interchangeable only if their whole prefixes
    match, which is what makes reuse of the KV values correct."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class FreeBlockQueue:
    """Blocks with no reference, oldest-freed first. O(1) append, pop and remove
    from the middle (a prefix hit takes a block back out of the queue)."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in blocks)

    def __len__(self) -> int:
        return len(self._queue)

    def popleft(self) -> KVCacheBlock:
        return self._queue.popitem(last=False)[1]

    def append(self, block: KVCacheBlock) -> None:
        self._queue[block.block_id] = block

    def remove(self, block: KVCacheBlock) -> None:
        del self._queue[block.block_id]

    def block_ids(self) -> list[int]:
        return list(self._queue)


class BlockPool:
    """All KV blocks of one service. Block 0 is the null block: it pads block
    tables and is never handed out, so `num_usable_blocks` is one less than
    `num_blocks`.

    The usable blocks are ids first_block_id .. first_block_id + num_blocks - 2 of
    the KV tensors. A service alone has them all from 1; services fused into one
    engine group share one set of tensors and one null block, each pool owning its
    own range, so no pool can hand out (or prefix-hit) another's blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 first_block_id: int = NULL_BLOCK_ID + 1) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        if first_block_id <= NULL_BLOCK_ID:
            raise ValueError(f"first_block_id must be > {NULL_BLOCK_ID}, got {first_block_id}")
        self.num_blocks = num_blocks
        self.first_block_id = first_block_id
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(NULL_BLOCK_ID)] + [
            KVCacheBlock(first_block_id + i) for i in range(num_blocks - 1)]
        self.null_block = self.blocks[0]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    def owns(self, block: KVCacheBlock) -> bool:
        """True for a block of this pool's range (a lent one included)."""
        return 0 <= block.block_id - self.first_block_id < self.num_usable_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take n blocks from the head of the free queue, evicting their cached
        contents. The caller checks first that n blocks are free."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found by a prefix lookup."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the order given: blocks that
        reach zero join the free queue's tail in that order, so the caller puts
        first those it wants evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """Register a full block under its chained hash. If another block already
        holds the same content, the first one stays the cached copy."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def forget_contents(self) -> None:
        """The KV tensors were freed (the engine sleeps): no block holds a prefix any
        more. Every block must be free; the free order is kept."""
        self.check_whole()
        for block in self.blocks[1:]:
            block.block_hash = None
        self.cached.clear()

    def check_whole(self) -> None:
        """Raise unless every block is back: all free, no reference held."""
        held = [b for b in self.blocks[1:] if b.ref_cnt != 0]
        if held or self.num_free_blocks != self.num_usable_blocks:
            raise AssertionError(
                f"block pool not whole: {self.num_free_blocks}/{self.num_usable_blocks} free, "
                f"held: {held[:8]}")
