"""The HTTP endpoint a device's metrics are scraped from.

Its own CollectorRegistry, not prometheus_client's global one: a process may hold
more than one supervisor (tests do), and each must expose only its own device.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

from colocate.metrics.exporter import DeviceCollector
from colocate.metrics.samples import DeviceSample


class MetricsEndpoint:
    """Serves `gather()`'s sample at http://host:port/metrics until stop()."""

    def __init__(self, gather: Callable[[], DeviceSample], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        """port 0 picks a free port (see .port). Raises OSError if it is taken."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DeviceCollector(gather))
        self.host = host
        self._server, self._thread = start_http_server(port, host, self.registry)
        self.port: int = self._server.server_port
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
