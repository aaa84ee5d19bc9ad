"""Figures of bench/colocation.py from the requests' records: percentiles per scenario
and per service, the headline ratios, and the terminal table, markdown and plots."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from colocation_load import RequestRecord
from common import format_markdown_table, format_table

# (key, title, unit in plots): end-to-end runs to tens of seconds, the others below one.
LATENCIES = (("ttft_s", "TTFT", "ms"), ("itl_s", "inter-token", "ms"),
             ("e2e_s", "end-to-end", "s"))
SCALE = {"ms": 1e3, "s": 1.0}
PERCENTILES = (50, 90, 99)
MiB = 2**20


def distribution(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(samples, dtype=float)
    return {"n": len(samples), "mean": float(arr.mean()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """One group of requests (a service, or a whole scenario). Latencies over the
    completed requests only; failures are counted, with their most common reasons."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error for r in records if not r.ok).most_common(3)),
        "ttft_s": distribution([r.ttft_s for r in ok]),
        "itl_s": distribution([g for r in ok for g in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in ok]),
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "prompt_tokens_mean": (float(np.mean([r.prompt_tokens for r in ok]))
                               if ok and all(r.prompt_tokens is not None for r in ok) else None),
    }


def scenario_result(records: list[RequestRecord], wall_s: float, names: list[str],
                    memory: dict | None) -> dict[str, Any]:
    return {"status": "ok", "wall_s": wall_s, "memory": memory,
            "overall": summarize(records, wall_s),
            "services": {n: summarize([r for r in records if r.service == n], wall_s)
                         for n in names},
            "records": [r.to_json() for r in records]}


def headline_ratios(scenarios: dict[str, dict]) -> dict[str, float | None]:
    """Mean latencies of shared over alone and over peer (1.0: as fast; above: slower),
    and memory of shared over unshared and over peer (below 1: less memory).

    Against alone, shared's first tenant is compared: it replays exactly alone's
    requests, where the other tenants' have other lengths. Against peer, all tenants:
    both ran the same N loads."""
    def ok(name: str) -> dict | None:
        s = scenarios.get(name, {})
        return s if s.get("status") == "ok" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    alone = ok("alone")
    first = next(iter(alone["services"])) if alone else None
    out = {}
    # shared: a process per service (batching: isolated); fused: one batch for all.
    for mode in ("shared", "fused"):
        mine = ok(mode)
        groups = {"alone": (mine and first and mine["services"].get(first),
                            alone and alone["overall"]),
                  "peer": (mine and mine["overall"], ok("peer") and ok("peer")["overall"])}
        for other, (a, b) in groups.items():
            for key, _, _ in LATENCIES:
                out[f"{key[:-2]}_mean_{mode}_over_{other}"] = (
                    ratio(a[key]["mean"], b[key]["mean"]) if a and b else None)
        for other in ("unshared", "peer"):
            mem = [(ok(n) or {}).get("memory") or {} for n in (mode, other)]
            out[f"memory_{mode}_over_{other}"] = ratio(mem[0].get("total_bytes"),
                                                       mem[1].get("total_bytes"))
    # Total output tok/s: the capacity when every service is flooded (--saturate).
    tok_s = {n: ok(n) and ok(n)["overall"]["output_tokens_per_s"] for n in ("shared", "fused")}
    out["output_tok_s_fused_over_shared"] = ratio(tok_s["fused"], tok_s["shared"])
    return out


# ---- tables ---------------------------------------------------------------------------

HEADERS = ["rate", "scenario", "service", "done", "failed",
           "TTFT p50 ms", "p90", "p99", "ITL p50 ms", "p90", "p99",
           "E2E p50 s", "p90", "p99", "out tok/s", "cores busy", "memory MiB"]


def table_rows(runs: list[dict]) -> list[list[Any]]:
    rows = []
    for run in runs:
        for name, sc in run["scenarios"].items():
            if sc["status"] != "ok":
                rows.append([run["load"], name, f"skipped: {sc['reason'][:60]}"]
                            + [None] * (len(HEADERS) - 3))
                continue
            mem = (sc.get("memory") or {}).get("total_bytes")
            # Busy cores and memory belong to the scenario's processes, not to a service.
            groups = [("all", sc["overall"], sc.get("server_cpu_cores_busy"),
                       mem / MiB if mem else None)]
            if len(sc["services"]) > 1:
                groups += [(n, s, None, None) for n, s in sc["services"].items()]
            for label, s, busy, mib in groups:
                rows.append([run["load"], name, label, s["completed"], s["failed"],
                             *_ms(s["ttft_s"], 1e3), *_ms(s["itl_s"], 1e3), *_ms(s["e2e_s"], 1),
                             s["output_tokens_per_s"], busy, mib])
    return rows


def _ms(dist: dict, scale: float) -> list[float | None]:
    return [None if dist[f"p{p}"] is None else dist[f"p{p}"] * scale for p in PERCENTILES]


def ratio_rows(runs: list[dict]) -> list[list[Any]]:
    return [[run["load"], k, v] for run in runs for k, v in run["ratios"].items()]


def terminal_report(runs: list[dict]) -> str:
    return (format_table(HEADERS, table_rows(runs)) + "\n\nheadline ratios\n"
            + format_table(["rate", "ratio", "value"], ratio_rows(runs)))


def markdown_report(result: dict, plots: list[str]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# colocation benchmark: {s['scenario_source']}", "",
             f"{m['date']}; {m['cpu_count']} CPU cores ({m['processor']}); load average "
             f"before the run {', '.join(f'{x:.2f}' for x in m['load_average_before'])}, "
             f"after {', '.join(f'{x:.2f}' for x in m.get('load_average_after', []))}; "
             f"torch threads per server: {s['torch_threads']}.", "",
             f"Load per service: {s['load_description']}.", "",
             format_markdown_table(HEADERS, table_rows(result["runs"])), "",
             "Headline ratios (latency: mean of shared over the other, against alone on "
             "its first tenant, which replays alone's requests; memory: total measured):", "",
             format_markdown_table(["rate", "ratio", "value"], ratio_rows(result["runs"])), ""]
    for name, reason in result.get("skipped", {}).items():
        lines += [f"`{name}` skipped: {reason}", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------

def write_plots(runs: list[dict], out_dir: Path) -> tuple[list[str], str | None]:
    """PNG files written, and why none were, if so."""
    try:
        import matplotlib
        matplotlib.use("Agg")               # files only; no display here
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install -e '.[bench]'): no plots"
    files = []
    for run in runs:
        suffix = "" if len(runs) == 1 else f"_{run['load'].split()[0]}"
        files.append(_percentile_bars(plt, run, out_dir / f"latency{suffix}.png"))
    files.append(_memory_bars(plt, runs[-1], out_dir / "memory.png"))
    if len(runs) > 1:
        files.append(_latency_vs_load(plt, runs, out_dir / "latency_vs_rate.png"))
    return [str(f) for f in files if f is not None], None


def _ok(run: dict) -> dict[str, dict]:
    return {n: s for n, s in run["scenarios"].items() if s["status"] == "ok"}


def _percentile_bars(plt, run: dict, path: Path) -> Path:
    scenarios = _ok(run)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / max(1, len(scenarios))
    for ax, (key, title, unit) in zip(axes, LATENCIES):
        for i, (name, sc) in enumerate(scenarios.items()):
            vals = [(sc["overall"][key][f"p{p}"] or 0) * SCALE[unit] for p in PERCENTILES]
            ax.bar(np.arange(len(PERCENTILES)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(PERCENTILES)) + width * (len(scenarios) - 1) / 2,
                      [f"p{p}" for p in PERCENTILES])
        ax.set_title(f"{title} ({unit})")
    axes[0].legend()
    fig.suptitle(f"latency per scenario, {run['load']} per service")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _memory_bars(plt, run: dict, path: Path) -> Path | None:
    mem = {n: s["memory"]["total_bytes"] / MiB for n, s in _ok(run).items() if s.get("memory")}
    if not mem:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(mem), list(mem.values()), color="tab:gray")
    for i, v in enumerate(mem.values()):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("MiB (serving processes)")
    ax.set_title("memory as measured")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latency_vs_load(plt, runs: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = list(dict.fromkeys(n for run in runs for n in _ok(run)))
    for ax, (key, title, unit) in zip(axes, LATENCIES):
        for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], names):
            pts = [(run["rate"], _ok(run)[name]["overall"][key]) for run in runs
                   if name in _ok(run)]
            xs = [x for x, _ in pts]
            for p, style in ((50, "-"), (99, "--")):
                ax.plot(xs, [(d[f"p{p}"] or 0) * SCALE[unit] for _, d in pts], style,
                        color=color, marker="o", label=f"{name} p{p}")
        ax.set_xlabel("requests/s per service")
        ax.set_title(f"{title} ({unit})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
