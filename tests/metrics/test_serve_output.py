"""`colocate serve` tells the operator where to point Prometheus."""
from __future__ import annotations

import io

from colocate.cluster.deploy import Endpoint, print_endpoints


def test_serve_prints_one_metrics_url_per_device():
    out = io.StringIO()
    endpoints = [Endpoint("svc-a", "cpu", "127.0.0.1:50051", ("TOKEN_A",), "running", 0)]
    print_endpoints(endpoints, {}, out, {"cpu": "http://127.0.0.1:9400/metrics"})
    assert "cpu  http://127.0.0.1:9400/metrics" in out.getvalue()


def test_serve_prints_the_http_url_and_a_curl_line_when_a_service_has_one():
    out = io.StringIO()
    endpoints = [Endpoint("svc-a", "cpu", "127.0.0.1:50051", ("TOKEN_A",), "running", 0,
                          http_url="http://127.0.0.1:8001/v1")]
    print_endpoints(endpoints, {}, out)
    text = out.getvalue()
    assert "svc-a  127.0.0.1:50051  http://127.0.0.1:8001/v1" in text
    assert "curl http://127.0.0.1:8001/v1/chat/completions" in text and "$TOKEN_A" in text
