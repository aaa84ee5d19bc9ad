"""The lending check of a real deployment, fused or isolated: a borrower's flood takes
every block of an idle lender, the lender's own request gets blocks back, every greedy
answer is the offline one, and a bystander never takes part."""
from __future__ import annotations

import threading
import time

import grpc

from colocate.client import Client
from tests.deployment.helpers import (offline_tokens, service_rows, stream_tokens, token_of,
                                      wait_service_pools_empty)

# The borrower floods: 8 x (41 + 60) tokens want 56 blocks, its own 16 and the lender's
# 16 hold 32.
FLOOD = {i: ([1] + [10 + 7 * i + j for j in range(40)],
             dict(max_tokens=60, temperature=0.0, ignore_eos=True)) for i in range(8)}
# The lender's own request then needs 6 of its blocks back.
LENDER_ASKS = ([1] + [(13 * i) % 2000 + 3 for i in range(79)],
               dict(max_tokens=16, temperature=0.0, ignore_eos=True))


def whole_loan(borrower, lender) -> bool:
    """The borrower's GetStats and then the lender's show every block of both pools
    with the borrower."""
    return ((borrower.kv_blocks_used, borrower.kv_blocks_borrowed) == (16, 16)
            and (lender.kv_blocks_lent, lender.kv_blocks_used) == (16, 16))


def start_flood(target: str, name: str, got: dict, tolerate_errors: bool = False):
    """FLOOD's requests on `name`, each in a thread, answers into got[i]."""
    def flood(i):
        prompt, sampling = FLOOD[i]
        try:
            got[i] = stream_tokens(target, token_of(name), prompt, **sampling)
        except grpc.RpcError:
            if not tolerate_errors:
                raise

    workers = [threading.Thread(target=flood, args=(i,)) for i in FLOOD]
    for w in workers:
        w.start()
    return workers


def wait_whole_loan(targets, borrower: str, lender: str, workers) -> None:
    """Until the whole loan is seen here (not by a sampler: it lasts only until the
    lender asks, and a sampler 10 ms apart can miss a window that short)."""
    with Client(targets[borrower], token_of(borrower)) as b, \
            Client(targets[lender], token_of(lender)) as c:
        deadline = time.monotonic() + 60
        while not whole_loan(b.stats(), c.stats()):
            assert time.monotonic() < deadline and any(w.is_alive() for w in workers)
            time.sleep(0.005)


def check_borrow_and_reclaim(deployment, targets, model_dir, names: list[str],
                             borrower: str, lender: str, bystander: str) -> None:
    want = offline_tokens(model_dir, 4096, {**FLOOD, "lender": LENDER_ASKS})
    got, samples, done = {}, [], threading.Event()

    def sample():                      # GetStats of every service, until the check is done
        clients = {n: Client(targets[n], token_of(n)) for n in names}
        while not done.is_set():
            samples.append({n: c.stats() for n, c in clients.items()})
            time.sleep(0.01)           # two cores: leave the services most of them
        for c in clients.values():
            c.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = start_flood(targets[borrower], borrower, got)
    wait_whole_loan(targets, borrower, lender, workers)
    lent_when_asked = len(samples)
    # The lender's own stats at its first token, beside the sampler's: the request is
    # running then, on blocks taken back (a short request the sampler alone might miss).
    got["lender"], probes = [], []
    with Client(targets[lender], token_of(lender)) as client:
        for delta in client.generate(LENDER_ASKS[0], **LENDER_ASKS[1]):
            if not probes:
                probes.append({lender: client.stats()})
            got["lender"] += delta.token_ids
    for w in workers:
        w.join(120)
    done.set()
    sampler.join(30)
    assert got == want
    assert any(s[lender].num_running == 1 and s[lender].kv_blocks_lent <= 16 - 6
               for s in samples[lent_when_asked:] + probes)
    assert all(s[borrower].kv_blocks_lent == 0 and s[lender].kv_blocks_borrowed == 0
               for s in samples)             # a borrower lends none, a lender borrows none
    assert all((s[bystander].kv_blocks_used, s[bystander].kv_blocks_lent,
                s[bystander].kv_blocks_borrowed) == (0, 0, 0) for s in samples)
    wait_service_pools_empty(deployment)
    assert {(n, r["stats"].kv_blocks_lent, r["stats"].kv_blocks_borrowed)
            for n, r in service_rows(deployment).items()} == {(n, 0, 0) for n in names}
