"""`colocate status` lines of a fused group's services: the KV blocks each has lent
and borrowed, shown only where some are out (a snapshot as cluster_status builds it)."""
from __future__ import annotations

from colocate.cluster.cluster_status import format_status
from colocate.service.runtime import ServiceStats


def row(name: str, used: int, lent: int = 0, borrowed: int = 0) -> dict:
    stats = ServiceStats(name=name, pid=1, port=1, num_running=1, num_waiting=0,
                         kv_blocks_used=used, kv_blocks_total=16, pss_bytes=0, healthy=True,
                         kv_blocks_lent=lent, kv_blocks_borrowed=borrowed)
    return dict(name=name, port=50051, host="127.0.0.1", state="running", restarts=0,
                stats=stats)


def test_status_shows_the_blocks_lent_and_borrowed():
    status = dict(metrics_url="http://127.0.0.1:9400/metrics", capacity_bytes=2**30,
                  reserved_bytes=2**20, weight_store_bytes=2**20, weight_copies=1, ledger=[],
                  services=[row("batch", 16, borrowed=5), row("chat", 9, lent=5),
                            row("quiet", 0)])
    entry = dict(entry="cpu", index=0, device="cpu", node_id="abcdef0123", node_ip="10.0.0.1",
                 state="running", error="", host="127.0.0.1", services=[], status=status)
    text = format_status([dict(deployment="d", source="x.yaml", replacements=0,
                               entries=[entry], events=[])])
    assert "service batch at 127.0.0.1:50051: running, 0 restart(s), 1 running, " \
           "0 waiting, KV 16/16 blocks (5 borrowed)\n" in text
    assert "KV 9/16 blocks (5 lent)\n" in text
    assert "KV 0/16 blocks\n" in text
