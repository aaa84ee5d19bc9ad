"""bench/colocation_bursty.py's arithmetic, on hand-made inputs: the quantile read from
histogram buckets as Prometheus reads it, the per-scenario summary and its table. The
end-to-end run is `bench/colocation.py --bursty`; it asserts nothing about speed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from colocation_bursty import (histogram_quantile, markdown, percentile,  # noqa: E402
                               scenario_config, summarize_scenario)
from tests.deployment.helpers import cpu_deployment  # noqa: E402

INF = float("inf")


def test_histogram_quantile_interpolates_within_the_bucket():
    buckets = [(0.01, 0.0), (0.1, 10.0), (1.0, 20.0), (INF, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 0.98)
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 4.0)]) == 0.1   # past the last bound


def test_summary_separates_each_bursts_first_request():
    rows = [dict(service=n, ttft_s=t, error=None, first_in_burst=f)
            for n, t, f in (("a", 0.5, True), ("a", 0.1, False), ("a", 0.1, False),
                            ("b", 0.1, False), ("b", 0.4, True))]
    rows.append(dict(service="b", ttft_s=None, error="UNAVAILABLE", first_in_burst=False))
    wakes = {"buckets": [(0.1, 1.0), (1.0, 2.0), (INF, 2.0)], "sum": 0.6}
    s = summarize_scenario(rows, {"servers_mean_bytes": 2**20, "servers_min_bytes": 2**20,
                                  "servers_max_bytes": 2**20, "available_mean_bytes": 2**30,
                                  "borrowed_blocks_max": 12},
                           wakes)
    assert (s["completed"], s["failed"], s["wakes"]) == (5, 1, 2)
    assert s["first_in_burst_ttft_p50_s"] == 0.4 and s["ttft_p50_s"] == 0.1
    assert s["wake_mean_s"] == pytest.approx(0.3)
    assert s["by_service"] == {"a": {"completed": 3, "ttft_p50_s": 0.1, "ttft_p99_s": 0.5},
                               "b": {"completed": 2, "ttft_p50_s": 0.1, "ttft_p99_s": 0.4}}
    table = markdown({"scenarios": {"sleep": s, "lend": {"status": "failed",
                                                         "reason": "no start"}}})
    assert "| sleep | 5 | 1 | 100 / 500 | 400 / 500 | a 100/500, b 100/400 |" in table
    assert "| 12 | 2 |" in table and "| lend | failed: no start |" in table
    assert percentile([], 0.5) is None


def test_the_sleep_scenario_differs_only_in_sleep_after_idle(tmp_path, tiny_model_dir):
    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["a", "b"])
    static, sleep = (scenario_config(config, n, 2.0).gpus[0] for n in ("static", "sleep"))
    assert [s.sleep_after_idle for s in static.services] == [None, None]
    assert [s.sleep_after_idle for s in sleep.services] == [2.0, 2.0]
    assert [s.name for s in sleep.services] == [s.name for s in static.services]


@pytest.mark.parametrize("scenario, batching", [("lend", "fused"),
                                                ("lend-isolated", "isolated")])
def test_the_lend_scenarios_have_every_service_but_the_first_lend(
        tmp_path, tiny_model_dir, scenario, batching):
    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["a", "b", "c"])
    lend = scenario_config(config, scenario, 2.0).gpus[0]
    assert (lend.batching, lend.share_weights) == (batching, True)
    assert [(s.name, s.kv_cache.lend, s.sleep_after_idle) for s in lend.services] == \
        [("a", False, None), ("b", True, None), ("c", True, None)]
    assert [s.kv_cache.tokens for s in lend.services] == \
        [s.kv_cache.tokens for s in config.gpus[0].services]      # the same budgets
