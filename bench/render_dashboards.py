"""Draw every panel of the Grafana dashboard from a real Prometheus, with matplotlib.

Reads deploy/grafana/colocate.json, runs each panel's PromQL against a Prometheus
(query_range, the table's too) with the dashboard's variables set as Grafana's "All"
sets them, and writes one PNG per panel: the same queries, units, legends
({{service}} p50 ...) and stacking as the dashboard, so a reader sees what Grafana
would show before installing it.

    python bench/render_dashboards.py --prometheus http://127.0.0.1:9090 --out docs/metrics
        [--minutes 10] [--step 2] [--rate-interval 1m]

Prints one line per panel (its file, series and points); docs/metrics.md shows them.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "colocate.json"
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Grafana unit -> (divisor, axis label): values are drawn in the unit people read.
UNITS = {"s": (1e-3, "ms"), "bytes": (2**20, "MiB"), "percentunit": (0.01, "%"),
         "reqps": (1.0, "requests/s"), "short": (1.0, ""), "none": (1.0, "")}


@dataclass(frozen=True)
class Drawn:
    title: str
    path: Path
    series: int          # lines (or table rows) drawn
    points: int          # finite values drawn, over every series


def panels(dashboard: dict) -> list[dict]:
    """Every panel with queries, those inside collapsed rows included, in order."""
    out = []
    for panel in dashboard["panels"]:
        out += [p for p in (panel, *panel.get("panels", [])) if p.get("targets")]
    return out


def expand(expr: str, rate_interval: str) -> str:
    """The dashboard's variables as Grafana expands them with "All" selected."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$gpu", ".*")
            .replace("$service", ".*"))


def legend(fmt: str, labels: dict) -> str:
    """Grafana's legendFormat filled in. The device's label, "_device", loses its
    underscore: matplotlib leaves labels that start with one out of the legend."""
    text = LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), fmt).strip() or \
        ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
    return text.lstrip("_")


class Prometheus:
    """Prometheus' HTTP query API (the metrics test's server asks through it too)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, **params) -> list[dict]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:       # 400 / 422: a bad expression
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{params.get('query')}: {body.get('error')}")
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr`; raises ValueError, naming it, on a PromQL error."""
        return self._get("/api/v1/query", query=expr)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _series(prom: Prometheus, panel: dict, start: float, end: float, step: float,
            rate_interval: str) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times, values) for every series every query of the panel returns."""
    out = []
    for target in panel["targets"]:
        for row in prom.query_range(expand(target["expr"], rate_interval), start, end, step):
            times = [float(t) for t, _ in row["values"]]
            values = [float(v) for _, v in row["values"]]
            out.append((legend(target.get("legendFormat", ""), row["metric"]), times, values))
    return out


def draw_timeseries(plt, prom: Prometheus, panel: dict, out: Path, start: float,
                    end: float, step: float, rate_interval: str) -> Drawn:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    divisor, unit = UNITS.get(defaults.get("unit", "none"), (1.0, defaults.get("unit", "")))
    stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
    series = _series(prom, panel, start, end, step, rate_interval)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    base: dict[float, float] = {}
    points = 0
    for name, times, values in sorted(series):
        xs = [t - end for t in times]                    # seconds before the end
        ys = [v / divisor for v in values]
        points += sum(math.isfinite(v) for v in ys)
        if stacked and "capacity" not in name:           # capacity stays a line on top
            lows = [base.get(t, 0.0) for t in times]
            highs = [lo + (y if math.isfinite(y) else 0.0) for lo, y in zip(lows, ys)]
            ax.fill_between(xs, lows, highs, label=name, alpha=0.7, step="post")
            base.update(zip(times, highs))
        else:
            ax.plot(xs, ys, label=name, linewidth=1.4)
    ax.set_title(panel["title"])
    ax.set_xlabel("seconds before the scrape's end")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.2),
                  frameon=False)
    path = out / f"{_slug(panel['title'])}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Drawn(panel["title"], path, len(series), points)


def draw_table(plt, prom: Prometheus, panel: dict, out: Path, start: float, end: float,
               step: float) -> Drawn:
    """A table panel: one row per series its queries return over the range, its labels
    as columns. Over the range rather than at its end: a scrape that timed out on a
    busy machine leaves the series stale for a moment, and the table would be empty."""
    rows = [row["metric"] for target in panel["targets"]
            for row in prom.query_range(expand(target["expr"], "1m"), start, end, step)]
    columns = sorted({k for r in rows for k in r if k not in ("__name__", "instance", "job")})
    fig, ax = plt.subplots(figsize=(8, 0.4 + 0.3 * max(len(rows), 1)))
    ax.axis("off")
    if rows:
        ax.table(cellText=[[r.get(c, "") for c in columns] for r in rows], colLabels=columns,
                 loc="center", cellLoc="left").auto_set_font_size(True)
    ax.set_title(panel["title"])
    path = out / f"{_slug(panel['title'])}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Drawn(panel["title"], path, len(rows), len(rows) * len(columns))


def render(prometheus: str, out: Path, minutes: float = 10.0, step: float = 2.0,
           rate_interval: str = "1m", dashboard: Path = DASHBOARD,
           end: float | None = None) -> list[Drawn]:
    """One PNG per panel under `out`, drawn over the last `minutes` before `end`."""
    import matplotlib
    matplotlib.use("Agg")                   # files only; no display here
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    prom = Prometheus(prometheus)
    end = time.time() if end is None else end
    start = end - 60.0 * minutes
    drawn = []
    for panel in panels(json.loads(dashboard.read_text())):
        if panel.get("type") == "table":
            drawn.append(draw_table(plt, prom, panel, out, start, end, step))
        else:
            drawn.append(draw_timeseries(plt, prom, panel, out, start, end, step,
                                         rate_interval))
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus' base URL")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "metrics")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--minutes", type=float, default=10.0, help="the time range drawn")
    parser.add_argument("--step", type=float, default=2.0, help="seconds between points")
    parser.add_argument("--rate-interval", default="1m",
                        help="what $__rate_interval stands for (Grafana's default here)")
    args = parser.parse_args(argv)
    for d in render(args.prometheus, args.out, args.minutes, args.step, args.rate_interval,
                    args.dashboard):
        print(f"{d.path}  {d.title}: {d.series} series, {d.points} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
