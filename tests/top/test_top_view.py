"""colocate top's arithmetic over two hand-written scrapes, and its 80-column layout."""
from __future__ import annotations

import pytest

from colocate import top_view


def _text(done: int, out_tokens: int, ttft_fast: int, ttft_slow: int) -> str:
    svc = 'gpu="cpu",service="chat-a"'
    dev = 'gpu="cpu",service="_device"'
    return "\n".join([
        f'colocate_service_info{{{svc},model="m",dtype="float32",quantization="none",'
        f'kv_dtype="auto"}} 1',
        f"colocate_requests_running{{{svc}}} 2",
        f"colocate_requests_waiting{{{svc}}} 1",
        f"colocate_kv_cache_blocks_used{{{svc}}} 5",
        f"colocate_kv_cache_blocks_capacity{{{svc}}} 16",
        f"colocate_prompt_tokens_total{{{svc}}} {10 * done}",
        f"colocate_generation_tokens_total{{{svc}}} {out_tokens}",
        f'colocate_requests_finished_total{{{svc},reason="length"}} {done}',
        f'colocate_requests_finished_total{{{svc},reason="stop"}} 1',
        f'colocate_requests_rejected_total{{{svc},reason="auth"}} 3',
        f'colocate_time_to_first_token_seconds_bucket{{{svc},le="0.1"}} {ttft_fast}',
        f'colocate_time_to_first_token_seconds_bucket{{{svc},le="1.0"}} {ttft_fast + ttft_slow}',
        f'colocate_time_to_first_token_seconds_bucket{{{svc},le="+Inf"}} {ttft_fast + ttft_slow}',
        f"colocate_time_to_first_token_seconds_count{{{svc}}} {ttft_fast + ttft_slow}",
        f"colocate_time_to_first_token_seconds_sum{{{svc}}} 1.0",
        f"colocate_device_memory_capacity_bytes{{{dev}}} {16 * 2**30}",
        f'colocate_memory_reserved_bytes{{{dev},kind="weights"}} {2**30}',
        f'colocate_memory_reserved_bytes{{gpu="cpu",service="chat-a",kind="kv_cache"}} {2**29}',
        f'colocate_memory_reserved_bytes{{gpu="cpu",service="chat-a",kind="workspace"}} {2**28}',
        ""])


def test_rates_and_quantiles_over_the_window():
    old = top_view.parse(_text(done=4, out_tokens=100, ttft_fast=4, ttft_slow=0), "u", 100.0)
    new = top_view.parse(_text(done=14, out_tokens=300, ttft_fast=8, ttft_slow=6), "u", 110.0)
    (row,) = top_view.services([old, new])
    assert (row.service, row.running, row.waiting, row.kv_used, row.kv_total) == \
        ("chat-a", 2, 1, 5, 16)
    assert row.tokens_out_per_s == pytest.approx(20.0)          # 200 tokens in 10 s
    assert row.tokens_in_per_s == pytest.approx(10.0)
    assert (row.finished, row.refused) == (15, 3)
    # In the window: 4 fast (<= 0.1 s) and 6 slow (0.1-1 s) first tokens. The median's
    # rank 5 is the first slow one: 0.1 + 0.9 * 1/6; p99's rank 9.9 near the top.
    assert row.ttft_p50 == pytest.approx(0.1 + 0.9 / 6)
    assert row.ttft_p99 == pytest.approx(0.1 + 0.9 * 5.9 / 6)
    assert row.itl_p50 is None                                   # no ITL series at all
    (dev,) = top_view.devices(new)
    assert (dev.capacity, dev.weights, dev.kv_budgets) == (16 * 2**30, 2**30, 2**29)
    assert dev.reserved == 2**30 + 2**29 + 2**28


def test_one_scrape_has_no_rates_and_an_old_one_leaves_the_window():
    new = top_view.parse(_text(14, 300, 8, 6), "u", 200.0)
    assert top_view.services([new])[0].tokens_out_per_s is None
    stale = top_view.parse(_text(4, 100, 4, 0), "u", 200.0 - top_view.WINDOW_S - 1)
    assert top_view.services([stale, new])[0].tokens_out_per_s is None


def test_screen_fits_80_columns_and_sorts():
    rows = [top_view.ServiceRow("cpu", f"svc-{c}", running, 0, 1, 16, 1.5, 22.25, 0.12, 0.5,
                                0.03, 0.09, 7, 0, 0)
            for c, running in (("a", 1), ("b", 5))]
    dev = top_view.DeviceRow("cpu", "u", 16 * 2**30, 2**30, 2**29, 2**31)
    lines = top_view.render([dev], rows, sort="running")
    assert all(len(line) <= 80 for line in lines)
    body = [line for line in lines if line.startswith("svc-")]
    assert [line.split()[:2] for line in body] == [["svc-b", "serving"], ["svc-a", "serving"]]
    assert "120/500" in body[0] and "30/90" in body[0] and "22.2" in body[0]


def test_state_from_the_supervisor_and_the_sleeping_gauge():
    def state(service, which):
        return "\n".join(f'colocate_service_state{{gpu="cpu",service="{service}",'
                         f'state="{s}"}} {int(s == which)}'
                         for s in ("serving", "restarting", "draining", "failed"))
    text = "\n".join([_text(done=1, out_tokens=1, ttft_fast=1, ttft_slow=0),
                      state("chat-a", "serving"), state("chat-b", "restarting"),
                      'colocate_service_sleeping{gpu="cpu",service="chat-c"} 1',
                      state("chat-c", "serving"), ""])
    rows = {r.service: r for r in top_view.services([top_view.parse(text, "u", 1.0)])}
    # chat-b answers no scrape while it restarts: listed from its state alone.
    assert {n: r.state for n, r in rows.items()} == {
        "chat-a": "serving", "chat-b": "restarting", "chat-c": "sleeping"}
    assert (rows["chat-b"].running, rows["chat-b"].kv_total) == (0, 0)
    lines = top_view.render([], list(rows.values()))
    assert [line.split()[:2] for line in lines if line.startswith("chat-")] == [
        ["chat-a", "serving"], ["chat-b", "restarting"], ["chat-c", "sleeping"]]
    assert all(len(line) <= 80 for line in lines)
