"""Lending between `isolated` services on CPU: three services of the tiny checkpoint,
each in its own process, through the real supervisor, Ray and gRPC, sharing one KV
pool file (colocate/engine/shared_lending.py). il-c lends its idle blocks; il-a floods
and borrows them; il-c's own request gets them back at il-a's next step."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import ray

from tests.deployment.helpers import (offline_tokens, service_rows, stream_tokens, token_of,
                                      wait_service_pools_empty)
from tests.deployment.lending_flow import check_borrow_and_reclaim, start_flood, wait_whole_loan
from tests.deployment.service_contract import KV_TOKENS, ServiceContract, three_services

pytestmark = pytest.mark.slow
NAMES = ["il-a", "il-b", "il-c"]


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    lend = {"il-c": {"kv_cache": {"dtype": "auto", "tokens": KV_TOKENS, "lend": True}}}
    with three_services(tmp_path_factory.mktemp("isolated-lending"), tiny_model_dir, NAMES,
                        per_service=lend) as dep:
        yield dep


class TestServiceContract(ServiceContract):
    NAMES = NAMES


def test_each_service_has_its_own_process_and_all_map_one_pool_file(deployment):
    rows = service_rows(deployment)
    assert len({r["stats"].pid for r in rows.values()}) == len(NAMES)
    pool_files = sorted(Path(os.environ["COLOCATE_LEDGER_DIR"]).glob("colocate-kv-*.pool"))
    assert len(pool_files) == 1
    for name, row in rows.items():
        maps = Path(f"/proc/{row['stats'].pid}/maps").read_text()
        assert str(pool_files[0]) in maps, name
    # The idle lender offers its blocks: none of them counts as used.
    assert rows["il-c"]["stats"].kv_blocks_used == 0


def test_a_borrower_in_another_process_uses_the_lenders_blocks_and_gives_them_back(
        deployment, targets, tiny_model_dir):
    """il-a's flood fills its own pool and borrows il-c's 16 idle blocks, never il-b's;
    il-c's request, sent once every block of it is lent, gets them back at il-a's next
    step; every greedy answer is the offline one, and GetStats reports the loans."""
    check_borrow_and_reclaim(deployment, targets, tiny_model_dir, NAMES,
                             borrower="il-a", lender="il-c", bystander="il-b")


def test_a_lender_that_sleeps_punches_its_range_and_the_files_go_with_the_deployment(
        ray_session, tiny_model_dir, tmp_path):
    """A lender with sleep_after_idle gives its range's pages back out of the shared
    file (the neighbour's stay), wakes with the same greedy answer, and the
    supervisor removes the pool and exchange files when the deployment stops."""
    from colocate.cluster.deploy import Deployment
    from tests.deployment.helpers import cpu_deployment

    lender_tokens = 16384                  # tiny: 4 KiB of fp32 K+V per token: 64 MiB
    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["sl-a", "sl-c"], per_service={
        "sl-c": {"sleep_after_idle": "1s",
                 "kv_cache": {"dtype": "auto", "tokens": lender_tokens, "lend": True}}})
    ledger = Path(os.environ["COLOCATE_LEDGER_DIR"])
    before = set(ledger.glob("colocate-kv-*"))
    prompt, greedy = [1, 50, 60, 70], dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    with Deployment(config, torch_threads=1, health_interval_s=0.5) as dep:
        dep.wait_ready(timeout=180)
        targets = {e.service: e.target for e in dep.endpoints()}
        ours = set(ledger.glob("colocate-kv-*")) - before
        pool = next(p for p in ours if p.suffix == ".pool")
        assert len(ours) == 2                                  # the pool and its exchange
        awake = stream_tokens(targets["sl-c"], token_of("sl-c"), prompt, **greedy)
        deadline = time.monotonic() + 30
        while not service_rows(dep)["sl-c"]["stats"].sleeping:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        asleep_bytes = pool.stat().st_blocks * 512
        assert asleep_bytes < 8 * 2**20, asleep_bytes          # sl-a's 1 MiB range and fringes
        again = stream_tokens(targets["sl-c"], token_of("sl-c"), prompt, **greedy)
        assert again == awake
        assert pool.stat().st_blocks * 512 > asleep_bytes + 60 * 2**20   # resident again
    assert not (set(ledger.glob("colocate-kv-*")) - before)


def test_a_borrower_killed_holding_loans_gives_them_back_when_restarted(
        deployment, targets, tiny_model_dir):
    """il-a dies holding all 16 of il-c's blocks; the supervisor restarts it, and its
    new process gives them back as it joins: il-c then answers a request that needs
    its whole pool, as the offline engine does, and nothing is lent after."""
    whole_pool = ([1] + [(11 * i) % 2000 + 3 for i in range(199)],
                  dict(max_tokens=50, temperature=0.0, ignore_eos=True))   # 250 of 256 tokens
    want = offline_tokens(tiny_model_dir, 4096, {"lender": whole_pool})["lender"]
    old_pid = service_rows(deployment)["il-a"]["stats"].pid

    workers = start_flood(targets["il-a"], "il-a", {}, tolerate_errors=True)  # it is killed
    wait_whole_loan(targets, "il-a", "il-c", workers)
    handle = ray.get(deployment.supervisor("cpu").service_actor.remote("il-a"))
    ray.kill(handle, no_restart=True)             # an isolated service's own actor
    for w in workers:
        w.join(60)
    deadline = time.monotonic() + 120
    while not (service_rows(deployment)["il-a"]["state"] == "running"
               and service_rows(deployment)["il-a"]["stats"] is not None
               and service_rows(deployment)["il-a"]["stats"].pid != old_pid):
        assert time.monotonic() < deadline, service_rows(deployment)["il-a"]
        time.sleep(0.2)
    rows = service_rows(deployment)
    assert rows["il-c"]["stats"].kv_blocks_lent == 0 == rows["il-a"]["stats"].kv_blocks_borrowed
    assert stream_tokens(targets["il-c"], token_of("il-c"), whole_pool[0], **whole_pool[1]) == want
    assert len(stream_tokens(targets["il-a"], token_of("il-a"), [1, 2], max_tokens=2,
                             ignore_eos=True)) == 2
    wait_service_pools_empty(deployment)
