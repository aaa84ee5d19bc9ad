"""KVLending: a lending member's free blocks serve the other members of its engine
group, and go back to it within one step when it needs them.

In an engine group every member's pool is a range of one KV cache tensor (group.py),
so any block can hold any member's tokens: moving a block between pools is only
bookkeeping. A member whose own pool is short borrows free blocks of the members
that lend (`kv_cache: {lend: true}`). The rules, and why:

- A block is lent only from its owner's free queue, so never one a request holds
  (a referenced prefix-cache entry included); a free block that still caches a prefix
  is evicted as it is lent (BlockPool.get_new_blocks), and a borrowed block is never
  registered in any prefix cache (KVCacheManager.cache_blocks). So no prefix lookup
  ever finds another tenant's KV values: not the borrower's in the lender's cache
  (the block comes back unhashed), nor the lender's in the borrower's.
- The owner takes its blocks back when its own free queue cannot serve it: the
  borrowers' youngest running requests holding its blocks are preempted (recompute),
  inside the owner's own scheduling, so the owner's request is scheduled in that
  same step. A lender's guarantee is thus its whole budget within one step; a
  borrower's is its own pool, and a borrowed block only ever an extra.
- A lender does not borrow. Two members borrowing from each other would preempt each
  other's requests back and forth; and with lenders scheduled first in a group step
  (EngineGroup), a reclaim never touches work already scheduled in that step.
- A sleeping lender lends nothing: its free blocks' memory is given back, and its
  wake zeroes its whole range. It falls asleep only once nothing of it is lent
  (cache_sleep.py): reclaiming to sleep would stop borrowers' work to free memory
  that is in use.

Accounting is exact and kept as counters (the scheduler asks on every allocation):
`lent[owner]` blocks of the owner's range out on loan, `borrowed[member]` blocks the
member holds from others; their sums are equal and every loan is in `loans`.
"""
from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from colocate.engine.block_pool import BlockPool, KVCacheBlock


class Holders(Protocol):
    """What lending needs of a borrower's scheduler."""

    def youngest_holding(self, owns: Callable[[KVCacheBlock], bool]): ...
    def preempt_for_owner(self, request) -> None: ...


@dataclass
class _Party:
    name: str
    pool: BlockPool
    lends: bool
    # Weak: the scheduler's manager holds this lending, so a strong reference would
    # make a cycle, and a group dropped with requests in it would not be freed at once.
    holders: weakref.ReferenceType
    # Its pool's memory is given back (cache_sleep.py): its free blocks are not lent.
    asleep: bool = False


class KVLending:
    crosses_processes = False        # every party is in this process (shared_lending.py: not)

    def __init__(self) -> None:
        self.parties: dict[str, _Party] = {}
        self.loans: dict[int, tuple[str, str]] = {}      # block id -> (owner, borrower)
        self.lent: Counter[str] = Counter()
        self.borrowed: Counter[str] = Counter()
        self._held: Counter[tuple[str, str]] = Counter()  # (owner, borrower) -> blocks

    def join(self, name: str, pool: BlockPool, lends: bool, holders: Holders) -> None:
        if name in self.parties:
            raise ValueError(f"{name!r} already takes part in this lending")
        self.parties[name] = _Party(name, pool, lends, weakref.ref(holders))

    def lends(self, name: str) -> bool:
        return self.parties[name].lends

    def num_lent(self, name: str) -> int:
        return self.lent[name]

    def num_borrowed(self, name: str) -> int:
        return self.borrowed[name]

    def num_offered(self, name: str) -> int:
        return 0            # a free block is lendable where it lies, in its owner's queue

    def set_asleep(self, name: str, asleep: bool) -> None:
        """A party's pool sleeps or wakes; asleep, it must have nothing out on loan."""
        if asleep and self.lent[name]:
            raise RuntimeError(f"{name!r} cannot sleep with {self.lent[name]} block(s) lent")
        self.parties[name].asleep = asleep

    def _lenders_to(self, borrower: str) -> list[_Party]:
        if self.parties[borrower].lends:
            return []
        return [p for p in self.parties.values() if p.lends and not p.asleep]

    # ---- the borrower's side ---------------------------------------------------
    def lendable(self, borrower: str) -> int:
        """Blocks the borrower could borrow now."""
        return sum(p.pool.num_free_blocks for p in self._lenders_to(borrower))

    def room(self, name: str) -> int:
        """Blocks beyond its own free queue the member can have in this step: its own
        lent ones taken back (reclaim), then other members' free ones."""
        return self.lent[name] + self.lendable(name)

    # In one process a reclaim is immediate, and a free block is lendable where it
    # lies, so these have nothing to do (shared_lending.py, across processes, does).
    def short(self, name: str, missing: int) -> bool:
        return False

    def idle(self, name: str) -> None:
        pass

    def serve_demands(self, name: str) -> None:
        pass

    def borrow(self, borrower: str, n: int) -> list[KVCacheBlock]:
        """n blocks from the lenders, most free first: spreading the loans makes it
        least likely that one lender's next request finds its own queue short. The
        caller checks lendable() first."""
        out: list[KVCacheBlock] = []
        for lender in sorted(self._lenders_to(borrower), key=lambda p: -p.pool.num_free_blocks):
            take = min(n - len(out), lender.pool.num_free_blocks)
            for block in lender.pool.get_new_blocks(take):     # evicts any cached prefix
                self.loans[block.block_id] = (lender.name, borrower)
                out.append(block)
            self.lent[lender.name] += take
            self._held[lender.name, borrower] += take
        if len(out) < n:
            raise RuntimeError(f"{borrower!r} asked to borrow {n} blocks, {len(out)} lendable")
        self.borrowed[borrower] += n
        return out

    def give_back(self, blocks: list[KVCacheBlock]) -> None:
        """A borrower freed these blocks: each goes to its owner's free queue, in order."""
        for block in blocks:
            owner, borrower = self.loans.pop(block.block_id)
            self.parties[owner].pool.free_blocks([block])
            self.lent[owner] -= 1
            self.borrowed[borrower] -= 1
            self._held[owner, borrower] -= 1

    # ---- the owner's side ------------------------------------------------------
    def reclaim(self, owner: str, want_free: int) -> None:
        """Preempt the borrowers' youngest requests holding the owner's blocks until
        its free queue has want_free blocks or nothing of it is out on loan."""
        pool = self.parties[owner].pool
        while pool.num_free_blocks < want_free and self.lent[owner]:
            victims = []
            for party in self.parties.values():
                if self._held[owner, party.name]:
                    request = party.holders().youngest_holding(pool.owns)
                    if request is None:
                        raise RuntimeError(f"{party.name!r} holds {owner!r}'s blocks "
                                           "but runs no request holding them")
                    victims.append((request.arrival_time, request.request_id, party, request))
            _, _, party, request = max(victims, key=lambda v: v[:2])
            party.holders().preempt_for_owner(request)

    def check_books(self) -> None:
        """Raise unless the counters agree with the loans (for tests)."""
        by_owner = Counter(owner for owner, _ in self.loans.values())
        by_borrower = Counter(borrower for _, borrower in self.loans.values())
        if +self.lent != by_owner or +self.borrowed != by_borrower:
            raise AssertionError(
                f"lending books wrong: lent {dict(self.lent)} vs {dict(by_owner)}, "
                f"borrowed {dict(self.borrowed)} vs {dict(by_borrower)}")
