"""A real Prometheus server scrapes a running CPU deployment: after known traffic,
its HTTP API holds every service's TTFT histogram, KV usage and memory series, with
request counts exactly as sent. Also runs every dashboard query against it and
checks each panel shows a series for every service.

Not skipped without the `prometheus` binary: it fails saying how to install it.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from colocate.metrics.samples import DEVICE
from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import cpu_deployment, free_ports, stream_tokens, token_of
from tests.metrics.dashboard import DASHBOARD, panel_queries
from tests.metrics.prometheus_server import PrometheusServer, prometheus_binary

import render_dashboards  # noqa: E402  (bench/, on the path prometheus_server puts it)

REPO = Path(__file__).resolve().parents[2]
KV_TOKENS = 256
MAX_TOKENS = 4
# A different number of requests per service, so a mix-up between services shows.
PROMPTS = {
    "met-a": [[1, 11, 12]],
    "met-b": [[1, 21, 22, 23], [1, 24, 25]],
    "met-c": [[1, 31], [1, 32, 33, 34, 35], [1, 36, 37]],
}


@pytest.fixture(scope="module")
def prometheus_path():
    try:
        return prometheus_binary()
    except RuntimeError as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)     # outside `except`: one clear line, no chain


@pytest.fixture(scope="module")
def deployment(prometheus_path, ray_session, tiny_model_dir, tmp_path_factory):
    config = cpu_deployment(tmp_path_factory.mktemp("metrics"), str(tiny_model_dir),
                            list(PROMPTS), kv_tokens=KV_TOKENS)
    (port,) = free_ports(1)
    gpu = dataclasses.replace(config.gpus[0], metrics_port=port)
    config = dataclasses.replace(config, gpus=(gpu,))
    with Deployment(config, torch_threads=1) as dep:
        dep.wait_ready(timeout=180)
        yield dep


@pytest.fixture(scope="module")
def prometheus(deployment, tmp_path_factory):
    urls = deployment.metrics_urls()
    targets = [url.split("//")[1].split("/")[0] for url in urls.values()]
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets) as prom:
        prom.wait_ready()
        yield prom


def send_traffic(deployment) -> None:
    targets = {e.service: e.target for e in deployment.endpoints()}
    for name, prompts in PROMPTS.items():
        for prompt in prompts:
            tokens = stream_tokens(targets[name], token_of(name), prompt,
                                   max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            assert len(tokens) == MAX_TOKENS
        refusals = [(token_of(name) + "-wrong", [1, 2], MAX_TOKENS),     # auth
                    (token_of(name), [1, 10**9], MAX_TOKENS),             # invalid
                    (token_of(name), [1, 2], 10 * KV_TOKENS)]             # too_long
        for token, prompt, max_tokens in refusals:
            with pytest.raises(grpc.RpcError):
                stream_tokens(targets[name], token, prompt, max_tokens=max_tokens)


def wait_for(prom: PrometheusServer, expr: str, expected: dict, timeout: float = 60.0):
    """Poll until Prometheus has scraped the expected values (it scrapes every 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        got = prom.values(expr)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_prometheus_sees_every_service(deployment, prometheus):
    assert deployment.metrics_urls()["cpu"].endswith(
        f":{deployment.config.gpus[0].metrics_port}/metrics")    # the YAML's port
    send_traffic(deployment)
    names = list(PROMPTS)
    requests = {n: float(len(p)) for n, p in PROMPTS.items()}

    finished = wait_for(prometheus, "sum by (service) (colocate_requests_finished_total)",
                        requests)
    assert finished == requests
    q = prometheus.values
    assert q('colocate_requests_finished_total{reason="length"}') == requests
    assert q("colocate_time_to_first_token_seconds_count") == requests
    assert q('colocate_time_to_first_token_seconds_bucket{le="+Inf"}') == requests
    assert q("colocate_e2e_request_latency_seconds_count") == requests
    assert q("colocate_inter_token_latency_seconds_count") == {
        n: r * (MAX_TOKENS - 1) for n, r in requests.items()}
    assert q("colocate_generation_tokens_total") == {
        n: r * MAX_TOKENS for n, r in requests.items()}
    assert q("colocate_prompt_tokens_total") == {
        n: float(sum(map(len, p))) for n, p in PROMPTS.items()}
    for reason in ("auth", "invalid", "too_long"):
        assert q(f'colocate_requests_rejected_total{{reason="{reason}"}}') == dict.fromkeys(
            names, 1.0), reason
    assert q('colocate_requests_rejected_total{reason="overloaded"}') == dict.fromkeys(
        names, 0.0)
    # A TTFT quantile exists for every service (the histogram has real buckets).
    p50 = q("histogram_quantile(0.5, sum by (service, le) "
            "(colocate_time_to_first_token_seconds_bucket))")
    assert set(p50) == set(names) and all(0 < v < 60 for v in p50.values())

    # KV usage against the budget: idle now, the pool's whole size, a budget in bytes.
    assert q("colocate_kv_cache_blocks_used") == dict.fromkeys(names, 0.0)
    assert q("colocate_kv_cache_blocks_capacity") == dict.fromkeys(names, KV_TOKENS / 16)
    assert q("colocate_kv_cache_capacity_tokens") == dict.fromkeys(names, float(KV_TOKENS))
    assert set(q("colocate_kv_cache_budget_bytes > 0")) == set(names)

    # Device memory: capacity, measured per process, the weights, the ledger.
    (status,) = deployment.status(with_stats=False)
    assert q("colocate_device_memory_capacity_bytes") == {DEVICE: 16 * 2**30}
    assert set(q("colocate_memory_used_bytes > 0")) == set(names) | {DEVICE}
    assert q("colocate_weight_store_bytes", by="model") == {
        "m": float(status["weight_store_bytes"])}
    assert q("sum by (gpu) (colocate_memory_reserved_bytes)", by="gpu") == {
        "cpu": float(status["reserved_bytes"])}
    assert q("colocate_service_info") == dict.fromkeys(names, 1.0)
    assert q("up", by="job") == {"colocate": 1.0}


def test_every_dashboard_panel_shows_every_service(prometheus):
    """Each panel's queries, as Grafana would send them with "All" selected, return
    series: one per service where the panel is per service (its query filters or
    groups by service), else one for the device. Runs after the traffic above."""
    names = set(PROMPTS)
    # rate() needs two scrapes inside its window: wait for them (1 s apart) first.
    ready = wait_for(prometheus, "count_over_time(up[1m]) >= bool 3", {"": 1.0})
    assert ready == {"": 1.0}, f"Prometheus has not scraped 3 times in a minute: {ready}"
    for title, expr in panel_queries(DASHBOARD):
        per_service = 'service=~"$service"' in expr or re.search(r"by \([^)]*service", expr)
        # Grafana's variables, as "All" and a default rate window would expand them.
        expr = (expr.replace("$__rate_interval", "1m").replace("$gpu", ".*")
                .replace("$service", ".*"))
        rows = prometheus.query(expr)     # raises, naming the expression, if invalid
        if per_service:
            shown = {r["metric"].get("service") for r in rows}
            assert names <= shown, (title, expr, shown)
        else:
            assert {r["metric"].get("gpu") for r in rows} == {"cpu"}, (title, expr, rows)


def test_render_script_draws_every_panel_with_data(deployment, prometheus, tmp_path):
    """bench/render_dashboards.py against the same Prometheus: a PNG per panel of the
    dashboard, each with finite points drawn. The traffic is sent again once
    Prometheus is scraping, so the latency rates have growth inside their window."""
    ready = wait_for(prometheus, "count_over_time(up[1m]) >= bool 3", {"": 1.0})
    assert ready == {"": 1.0}, ready
    send_traffic(deployment)
    twice = {n: 2.0 * len(p) for n, p in PROMPTS.items()}
    expr = "sum by (service) (colocate_requests_finished_total)"
    assert wait_for(prometheus, expr, twice) == twice
    drawn = render_dashboards.render(prometheus.url, tmp_path, minutes=3, step=1)
    assert [d.title for d in drawn] == list(dict.fromkeys(t for t, _ in panel_queries()))
    for d in drawn:
        assert d.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", d.title
        assert d.series > 0 and d.points > 0, d


def test_the_example_prometheus_config_is_valid(prometheus_path):
    promtool = Path(prometheus_path).with_name("promtool")
    result = subprocess.run([str(promtool), "check", "config",
                             str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
