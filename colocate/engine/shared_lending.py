"""SharedKVLending: lending between isolated services, each in its own process.

The services of one model and KV dtype on one CPU device entry with `batching:
isolated`, one of which lends (`kv_cache: {lend: true}`), form a lending circle: each
maps ONE KV pool file (colocate/model/kv_memory.py, `shared_file`) in which it owns a
block range, exactly as the members of a fused group own ranges of one tensor. A block
id then means the same memory in every process, so a block can move between services
by bookkeeping alone. That bookkeeping is this exchange: a small file beside the pool
with one state per block and a row of counters per service, read and written only
under an flock on it.

A block of a lender's range is, as the exchange sees it:
- HOME: its owner's own (free in its BlockPool or held by its requests);
- OFFERED: out of its owner's pool, free for a borrower to take;
- LENT to borrower i: i's requests write it;
- RETURNED: given back while its owner was waiting for it.

The rules, and what they cost against a fused group's lending (kv_lending.py):
- A lender offers every free block when it holds no request (its idle moment; a
  lender that starts offers at once), evicting their cached prefixes, and offers
  nothing while it is busy. A lender on its own blocks takes OFFERED and RETURNED
  ones back at once, under the lock. A borrower takes only OFFERED blocks, never
  registers one in its prefix cache, and gives it back on free: RETURNED if its
  owner asked for blocks, else OFFERED again.
- A lender whose own queue and taken-back offers cannot serve it posts a demand;
  every borrower, at the start of its next step, preempts (recompute) its youngest
  requests holding that lender's blocks until the demand is met, before it runs
  anything more on them. Meanwhile the lender's request waits (its running requests
  are not preempted for blocks that are on their way back). So a lender's guarantee
  is its whole budget within one step of its borrowers, not within its own step: a
  process cannot preempt another's requests, and taking a block a borrower may still
  be writing would let the borrower's forward overwrite the owner's KV values.
- A lender does not borrow, a sleeping lender lends nothing, and it falls asleep only
  with nothing lent (cache_sleep.py), as in a group.
- A process that dies holding borrowed blocks has them given back when it rejoins
  (the supervisor restarts it) or when a lender short of blocks finds it gone; a
  lender that restarts keeps the blocks lent out of its new pool until they return.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from colocate.engine.block_pool import BlockPool, KVCacheBlock, NULL_BLOCK_ID

HOME, OFFERED, RETURNED = 0, 1, 2
LENT = 16                           # + the borrower's index
_MAGIC = 0x636F6C6F6B766C31         # "colokvl1"
_HEADER = ("magic", "parties", "blocks", "spare")
# One row per member: who maps it now, its flags and its counts (kept with every
# state change, so nothing scans the blocks to answer a count).
_ROW = ("pid", "started_ms", "lends", "asleep", "demand", "lent", "borrowed", "offered",
        "returned")


@dataclass(frozen=True)
class LendingCircle:
    """Which services share one pool file, in range order: picklable, made by the
    supervisor, the same for every member. members: (name, usable blocks, lends)."""
    pool_path: str
    members: tuple[tuple[str, int, bool], ...]

    @property
    def exchange_path(self) -> str:
        return self.pool_path + ".exchange"

    @property
    def num_blocks(self) -> int:
        """The file's blocks: the shared null block and every member's range."""
        return NULL_BLOCK_ID + 1 + sum(usable for _, usable, _ in self.members)

    def index(self, name: str) -> int:
        for i, (member, _, _) in enumerate(self.members):
            if member == name:
                return i
        raise KeyError(f"{name!r} is not in the lending circle {[m for m, _, _ in self.members]}")

    def first_block(self, name: str) -> int:
        """The first block id of member `name`'s range."""
        return NULL_BLOCK_ID + 1 + sum(u for _, u, _ in self.members[:self.index(name)])

    def own_blocks(self, name: str) -> tuple[int, int]:
        return self.first_block(name), self.members[self.index(name)][1]


class _Exchange:
    """The exchange file mapped: header, one counter row per member, a state per block."""

    def __init__(self, circle: LendingCircle) -> None:
        n, blocks = len(circle.members), circle.num_blocks
        self.header_bytes = 8 * (len(_HEADER) + n * len(_ROW))
        size = self.header_bytes + 4 * blocks
        self.fd = os.open(circle.exchange_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._depth = 0
        with self.locked():
            have = os.fstat(self.fd).st_size
            if have == 0:
                os.ftruncate(self.fd, size)
                os.pwrite(self.fd, struct.pack("<qqqq", _MAGIC, n, blocks, 0), 0)
            magic, parties, nblocks, _ = struct.unpack("<qqqq", os.pread(self.fd, 32, 0))
            if (have not in (0, size) or magic != _MAGIC or parties != n
                    or nblocks != blocks):
                raise ValueError(f"{circle.exchange_path} is not this circle's exchange "
                                 f"({parties} members, {nblocks} blocks; want {n}, {blocks})")
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        self.words = memoryview(self.map)[:self.header_bytes].cast("q")
        self.state = memoryview(self.map)[self.header_bytes:].cast("i")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The exchange's lock; re-entrant within this process (a reclaim's preemption
        gives blocks back inside the lock it took)."""
        if self._depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _at(self, party: int, field: str) -> int:
        return len(_HEADER) + party * len(_ROW) + _ROW.index(field)

    def get(self, party: int, field: str) -> int:
        return self.words[self._at(party, field)]

    def set(self, party: int, field: str, value: int) -> None:
        self.words[self._at(party, field)] = value

    def add(self, party: int, field: str, delta: int) -> None:
        self.words[self._at(party, field)] += delta


def _alive(pid: int, started_ms: int) -> bool:
    """The same pid and start time: the same process (pids are reused)."""
    try:
        return abs(psutil.Process(pid).create_time() * 1000 - started_ms) < 1000
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class SharedKVLending:
    """This process's member of a lending circle, with the interface KVCacheManager
    uses for a group's KVLending (join, room, short, reclaim, borrow, give_back, ...)."""

    crosses_processes = True         # loans change while this process's loop is idle

    def __init__(self, circle: LendingCircle) -> None:
        self.circle = circle
        self.ex = _Exchange(circle)
        self.ranges = [circle.own_blocks(name) for name, _, _ in circle.members]
        self.me = -1
        self.pool: BlockPool | None = None
        self.holders = None
        self.borrowed_blocks: dict[int, KVCacheBlock] = {}   # id -> this process's object

    def _owner(self, block_id: int) -> int:
        for i, (first, count) in enumerate(self.ranges):
            if first <= block_id < first + count:
                return i
        raise ValueError(f"block {block_id} is in no member's range")

    def _own_ids(self, party: int) -> range:
        first, count = self.ranges[party]
        return range(first, first + count)

    def _pool_block(self, block_id: int) -> KVCacheBlock:
        """This member's own block object for an id of its range (index 0 is the null block)."""
        return self.pool.blocks[block_id - self.pool.first_block_id + 1]

    def _move(self, block_id: int, new: int) -> None:
        """Change one block's state, keeping its owner's and borrower's counts."""
        old, owner = self.ex.state[block_id], self._owner(block_id)
        for state, sign in ((old, -1), (new, 1)):
            if state == OFFERED:
                self.ex.add(owner, "offered", sign)
            elif state == RETURNED:
                self.ex.add(owner, "returned", sign)
            elif state >= LENT:
                self.ex.add(owner, "lent", sign)
                self.ex.add(state - LENT, "borrowed", sign)
        self.ex.state[block_id] = new

    # ---- joining ----------------------------------------------------------------
    def join(self, name: str, pool: BlockPool, lends: bool, holders) -> None:
        if self.me >= 0:
            raise ValueError(f"this process already takes part as {self.circle.members[self.me][0]!r}")
        me = self.circle.index(name)
        if (pool.first_block_id, pool.num_usable_blocks) != self.ranges[me]:
            raise ValueError(f"{name!r}'s pool is not its range {self.ranges[me]} of the circle")
        if lends != self.circle.members[me][2]:
            raise ValueError(f"{name!r} lends={lends}, the circle says {self.circle.members[me][2]}")
        # Weak, as in kv_lending.py: the scheduler's manager holds this lending.
        self.me, self.pool, self.holders = me, pool, weakref.ref(holders)
        with self.ex.locked():
            # A previous process of this member may have died: what it had borrowed
            # is nobody's now, and what it had offered is its new pool's again.
            self._give_back_all_lent_to(me)
            for block_id in self._own_ids(me):
                state = self.ex.state[block_id]
                if state >= LENT:           # a live borrower still writes it: kept out
                    pool.touch([self._pool_block(block_id)])
                elif state != HOME:
                    self._move(block_id, HOME)
            proc = psutil.Process()
            for field, value in (("pid", proc.pid), ("started_ms", int(proc.create_time() * 1000)),
                                 ("lends", int(lends)), ("asleep", 0), ("demand", 0)):
                self.ex.set(me, field, value)
        self.idle(name)

    def _give_back_all_lent_to(self, borrower: int) -> None:
        for block_id in range(NULL_BLOCK_ID + 1, self.circle.num_blocks):
            if self.ex.state[block_id] == LENT + borrower:
                self._return(block_id)

    def _return(self, block_id: int) -> None:
        owner = self._owner(block_id)
        if self.ex.get(owner, "demand") > 0:
            self.ex.add(owner, "demand", -1)
            self._move(block_id, RETURNED)
        else:
            self._move(block_id, OFFERED)

    # ---- counts (KVCacheManager, stats, CacheSleep) --------------------------------
    def lends(self, name: str) -> bool:
        return bool(self.ex.get(self.circle.index(name), "lends"))

    def num_lent(self, name: str) -> int:
        """Blocks of the member's range that borrowers hold (offered ones are not)."""
        return self.ex.get(self.circle.index(name), "lent")

    def num_borrowed(self, name: str) -> int:
        return self.ex.get(self.circle.index(name), "borrowed")

    def num_offered(self, name: str) -> int:
        """Blocks of the member's range out of its pool but held by nobody."""
        return self._takeable(self.circle.index(name))

    def _takeable(self, party: int) -> int:
        return self.ex.get(party, "offered") + self.ex.get(party, "returned")

    def _lenders_to(self, borrower: int) -> list[int]:
        if self.ex.get(borrower, "lends"):
            return []
        return [i for i in range(len(self.ranges)) if i != borrower
                and self.ex.get(i, "lends") and not self.ex.get(i, "asleep")]

    def lendable(self, name: str) -> int:
        return sum(self.ex.get(i, "offered") for i in self._lenders_to(self.circle.index(name)))

    def room(self, name: str) -> int:
        """Blocks beyond its own free queue the member could have now: its offered and
        returned ones back, and the lenders' offers."""
        return self._takeable(self.circle.index(name)) + self.lendable(name)

    # ---- the lender's side ---------------------------------------------------------
    def reclaim(self, name: str, want_free: int) -> None:
        """Take back offered and returned blocks until the free queue has want_free."""
        me = self.circle.index(name)
        if self.pool.num_free_blocks >= want_free or not self._takeable(me):
            return
        with self.ex.locked():
            for block_id in self._own_ids(me):
                if self.pool.num_free_blocks >= want_free:
                    break
                if self.ex.state[block_id] in (OFFERED, RETURNED):
                    self._move(block_id, HOME)
                    self.pool.free_blocks([self._pool_block(block_id)])

    def short(self, name: str, missing: int) -> bool:
        """The member needs `missing` blocks more than it can have now: as a lender,
        ask the borrowers for that many of its lent blocks back. True when they are
        on their way (the request should wait, not preempt its own neighbours)."""
        me = self.circle.index(name)
        if not self.ex.get(me, "lends") or not self.num_lent(name):
            return False
        with self.ex.locked():
            for party in range(len(self.ranges)):
                if (party != me and self.ex.get(party, "borrowed")
                        and not _alive(self.ex.get(party, "pid"), self.ex.get(party, "started_ms"))):
                    self._give_back_all_lent_to(party)      # a borrower that died
            # Every offer back first: a borrower must not take one while this waits.
            self.reclaim(name, self.pool.num_usable_blocks)
            lent = self.num_lent(name)
            self.ex.set(me, "demand", min(missing, lent))
            return missing <= lent

    def idle(self, name: str) -> None:
        """The member holds no request: a lender offers every free block (and its
        returned ones), and asks for nothing back."""
        me = self.circle.index(name)
        if not self.ex.get(me, "lends") or self.ex.get(me, "asleep"):
            return
        with self.ex.locked():
            self.ex.set(me, "demand", 0)
            for block in self.pool.get_new_blocks(self.pool.num_free_blocks):  # evicts prefixes
                self._move(block.block_id, OFFERED)
            for block_id in self._own_ids(me):
                if self.ex.state[block_id] == RETURNED:
                    self._move(block_id, OFFERED)

    def set_asleep(self, name: str, asleep: bool) -> None:
        """Asleep, its pool's memory is given back: it must have nothing lent, and its
        offers are taken back first, so no borrower writes a range without pages."""
        me = self.circle.index(name)
        with self.ex.locked():
            if asleep:
                if self.num_lent(name):
                    raise RuntimeError(f"{name!r} cannot sleep with {self.num_lent(name)} "
                                       "block(s) lent")
                self.reclaim(name, self.pool.num_usable_blocks)
            self.ex.set(me, "asleep", int(asleep))

    # ---- the borrower's side -------------------------------------------------------
    def borrow(self, name: str, n: int) -> list[KVCacheBlock] | None:
        """n offered blocks, most offered lender first; None, taking nothing, if fewer
        are offered now (a lender took its offers back since room() was read)."""
        me = self.circle.index(name)
        with self.ex.locked():
            lenders = sorted(self._lenders_to(me), key=lambda i: -self.ex.get(i, "offered"))
            if sum(self.ex.get(i, "offered") for i in lenders) < n:
                return None
            out: list[KVCacheBlock] = []
            for lender in lenders:
                for block_id in self._own_ids(lender):
                    if len(out) == n:
                        return out
                    if self.ex.state[block_id] == OFFERED:
                        self._move(block_id, LENT + me)
                        block = KVCacheBlock(block_id)
                        block.ref_cnt = 1
                        self.borrowed_blocks[block_id] = block
                        out.append(block)
            return out

    def give_back(self, blocks: list[KVCacheBlock]) -> None:
        if not blocks:
            return
        with self.ex.locked():
            for block in blocks:
                del self.borrowed_blocks[block.block_id]
                self._return(block.block_id)

    def serve_demands(self, name: str) -> None:
        """At the start of a step: preempt this member's youngest requests holding the
        blocks of a lender that asked for them, until each demand is met."""
        me = self.circle.index(name)
        if not self.ex.get(me, "borrowed"):
            return
        with self.ex.locked():
            for owner in range(len(self.ranges)):
                first, count = self.ranges[owner]

                def owns(block: KVCacheBlock, lo=first, hi=first + count) -> bool:
                    return lo <= block.block_id < hi

                while self.ex.get(owner, "demand") > 0 and any(
                        owns(b) for b in self.borrowed_blocks.values()):
                    request = self.holders().youngest_holding(owns)
                    if request is None:
                        break        # held by a request not running (being freed)
                    self.holders().preempt_for_owner(request)

    def check_books(self) -> None:
        """Raise unless every count agrees with the block states (for tests)."""
        with self.ex.locked():
            for party in range(len(self.ranges)):
                own = [self.ex.state[b] for b in self._own_ids(party)]
                counted = {"offered": own.count(OFFERED), "returned": own.count(RETURNED),
                           "lent": sum(s >= LENT for s in own),
                           "borrowed": sum(s == LENT + party for s in self.ex.state)}
                for field, value in counted.items():
                    if self.ex.get(party, field) != value:
                        raise AssertionError(f"member {party} {field}: counted "
                                             f"{self.ex.get(party, field)}, blocks say {value}")

    def close(self) -> None:
        """Unmap the exchange (the process is going; its loans end with its requests)."""
        self.ex.words.release()
        self.ex.state.release()
        self.ex.map.close()
        os.close(self.ex.fd)
