"""A real Prometheus server for a test: its own free port, a temporary storage
directory, a 1 s scrape interval; stopped (and waited for) on exit."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.deployment.helpers import free_ports

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from render_dashboards import Prometheus  # noqa: E402

INSTALL_HINT = ("the metrics integration test needs the Prometheus server, and "
                "`prometheus` is not on PATH: install it with `sudo apt-get install -y "
                "prometheus` (Debian/Ubuntu), or run `make test`, which does")


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s"):
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {scrape_interval}, scrape_timeout: {scrape_interval}}}\n"
            f"scrape_configs:\n"
            f"  - job_name: colocate\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.log_path = workdir / "prometheus.log"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s")

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr`; raises on a PromQL error."""
        return Prometheus(self.url).query(expr)

    def values(self, expr: str, by: str = "service") -> dict[str, float]:
        return {row["metric"].get(by, ""): float(row["value"][1]) for row in self.query(expr)}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
