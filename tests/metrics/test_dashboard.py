"""The Grafana dashboard loads, and every query names series the exporter produces."""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from colocate.metrics.exporter import DeviceCollector
from tests.metrics import fixtures
from tests.metrics.dashboard import DASHBOARD, SERIES_NAME, panel_queries, panels


def exported_names() -> set[str]:
    """Series names of a scrape with every kind of series present."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(lambda: fixtures.device("a", "b")))
    return {s.name for family in registry.collect() for s in family.samples}


def test_dashboard_is_valid_json_with_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert graphs and all(p.get("targets") for p in graphs)


def test_every_query_names_an_exported_series():
    exported = exported_names()
    used = set()
    for title, expr in panel_queries():
        names = set(SERIES_NAME.findall(expr))
        assert names, f"panel {title!r}: {expr} names no colocate_ series"
        assert names <= exported, f"panel {title!r}: unknown {names - exported}"
        used |= names
    # The operator's questions are all on the board.
    for needed in ("colocate_time_to_first_token_seconds_bucket",
                   "colocate_inter_token_latency_seconds_bucket",
                   "colocate_generation_tokens_total", "colocate_kv_cache_budget_bytes",
                   "colocate_memory_reserved_bytes", "colocate_memory_used_bytes",
                   "colocate_preemptions_total", "colocate_requests_rejected_total"):
        assert needed in used, needed
