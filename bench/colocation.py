"""Co-location benchmark: do N services sharing one copy of the weights answer about as
fast as one alone, in far less memory than N separate servers?

    python bench/colocation.py [--config YAML] [--rate R | --rates R1,R2 | --concurrency C]
                               [--duration S | --requests N] [--results DIR]

Scenarios, run one after the other in one invocation on one machine, every tenant
replaying the same seeded requests (see colocation_load.py):
  alone     the first service of the config's first device entry, one tenant's load;
  shared    all N services of that entry on one copy of the weights, N such loads,
            a process each (batching: isolated);
  fused     the same N services in one process, decoding as one batch (batching: fused),
            with the threads the N isolated processes had between them;
  unshared  the same with `share_weights: false` (one copy per service);
  peer      the same N loads to other servers over an OpenAI-compatible streaming API,
            started here on CPU (--peer transformers: `transformers serve`; --peer
            llamacpp: `llama_cpp.server` on the same GGUF), or --peer-url.
Loads, each run against every scenario in turn: Poisson arrivals (--rate, --rates), a
closed loop (--concurrency), the machine saturated (--saturate C: C in flight per
service; its figure is the total output tok/s) and a flood (--flood F: tenant 1 keeps F
in flight while tenant 0 has one; its figure is tenant 0's latency over alone's).
--door http drives the colocate scenarios through their own OpenAI-compatible HTTP
ports with the peers' client, so that every scenario is measured through one door.
Writes colocation.json, colocation.md and PNG plots under --results and prints a
table. With --bursty, instead: the services busy in turns, static budgets against
sleep_after_idle and against lending (colocation_bursty.py), to bursty.json and
bursty.md. Asserts nothing about speed: the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))    # run as a script, not a package
from common import machine_info, write_json  # noqa: E402
from colocation_bursty import markdown as bursty_markdown  # noqa: E402
from colocation_bursty import SCENARIOS as BURSTY_SCENARIOS  # noqa: E402
from colocation_bursty import run_bursty  # noqa: E402
from colocation_load import LoadSpec, PromptMaker, run_load  # noqa: E402
from colocation_report import (headline_ratios, markdown_report, scenario_result,  # noqa: E402
                               terminal_report, write_plots)
from colocation_peers import PEERS, ProcessPeers, UrlPeers, peer_unavailable  # noqa: E402
from colocation_servers import (SCENARIOS, ColocateServers, cpu_seconds,  # noqa: E402
                                describe, load_bench_config, scenario_configs,
                                write_default_config)

# Measured here (2 cores, `small` preset, 1 torch thread per service, default
# lengths): a request costs a service about 5 CPU-seconds, so at 0.1 req/s one
# service alone keeps about half a core busy, far from saturating the machine, and
# three keep about 1.5 of the 2 cores busy: loaded, not yet saturated. 90 s of
# arrivals x 4 scenarios, plus start-up and drain, end in about 8 minutes.
DEFAULT_RATE = 0.1
DEFAULT_DURATION_S = 90.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="deployment YAML; its first device entry gives the "
                   "scenarios (default: --services copies of --model on the CPU)")
    p.add_argument("--model", default="preset:small", help="checkpoint dir or preset:NAME")
    p.add_argument("--services", type=int, default=3)
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV pool per service")
    p.add_argument("--max-model-len", type=int, default=1024)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help=f"Poisson requests/s per service "
                      f"(default {DEFAULT_RATE} when no other load is given)")
    rate.add_argument("--rates", help="a sweep: comma-separated rates, each run in turn")
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight "
                   "per service")
    p.add_argument("--saturate", type=int, metavar="C", help="a closed loop of C in flight "
                   "per service, to measure the total output tok/s with every service flooded")
    p.add_argument("--flood", type=int, metavar="F", help="tenant 1 keeps F requests in "
                   "flight while tenant 0 keeps one (the others idle)")
    p.add_argument("--duration", type=float, help=f"seconds of arrivals per load "
                   f"(default {DEFAULT_DURATION_S:g} unless --requests is given)")
    p.add_argument("--requests", type=int, help="requests per service")
    p.add_argument("--prompt-tokens", default="32,512", help="MIN,MAX (uniform)")
    p.add_argument("--output-tokens", default="16,128", help="MIN,MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server process, "
                   "in every scenario alike")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--door", choices=("grpc", "http"), default="grpc",
                   help="how the colocate scenarios are driven: gRPC Generate, or their "
                        "OpenAI-compatible HTTP port, through the same client as the peers")
    p.add_argument("--peer", choices=PEERS, default="transformers",
                   help="the peer servers started here on CPU (without --peer-url)")
    p.add_argument("--peer-url", action="append", default=[], help="an OpenAI-compatible "
                   "server (vLLM, SGLang, TGI); repeat or comma-separate, 1 or N of them")
    p.add_argument("--peer-model", help="model name the peers serve (default: the checkpoint)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--results", default="results/colocation", help="output directory")
    bursty = p.add_argument_group("bursty load (colocation_bursty.py): static budgets "
                                  "against sleep_after_idle and against lending")
    bursty.add_argument("--bursty", action="store_true", help="run the bursty load instead "
                        "of the scenarios above")
    bursty.add_argument("--burst", type=float, default=10.0,
                        help="seconds each service is busy in its turn")
    bursty.add_argument("--cycles", type=int, default=3, help="rounds of turns")
    bursty.add_argument("--sleep-after", type=float, default=2.0,
                        help="sleep_after_idle of every service in the sleep scenario")
    bursty.add_argument("--sample", type=float, default=1.0,
                        help="seconds between memory samples")
    bursty.add_argument("--burst-concurrency", type=int, default=1,
                        help="requests in flight during a service's burst")
    bursty.add_argument("--bursty-scenarios", default=",".join(BURSTY_SCENARIOS),
                        help=f"comma-separated, of {','.join(BURSTY_SCENARIOS)}")
    args = p.parse_args(argv)
    unknown = set(args.bursty_scenarios.split(",")) - set(BURSTY_SCENARIOS)
    if unknown:
        p.error(f"--bursty-scenarios: unknown {', '.join(sorted(unknown))}")
    if args.burst_concurrency < 1:
        p.error("--burst-concurrency: must be >= 1")
    args.peer_url = [u for arg in args.peer_url for u in arg.split(",") if u]
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(sorted(unknown))} (of {', '.join(SCENARIOS)})")
    return args


def load_specs(args: argparse.Namespace) -> list[LoadSpec]:
    pair = lambda s: tuple(int(x) for x in s.split(","))    # noqa: E731
    duration = args.duration if args.duration or args.requests else DEFAULT_DURATION_S
    common = dict(duration_s=duration, num_requests=args.requests,
                  prompt_tokens=pair(args.prompt_tokens), output_tokens=pair(args.output_tokens),
                  seed=args.seed, request_timeout_s=args.request_timeout)
    rates = ([float(r) for r in args.rates.split(",")] if args.rates
             else [args.rate] if args.rate else [])
    specs = ([LoadSpec(concurrency=args.concurrency, **common)] if args.concurrency else [])
    specs += [LoadSpec(rate=r, **common) for r in rates]
    specs += [LoadSpec(concurrency=args.saturate, **common)] if args.saturate else []
    specs += [LoadSpec(concurrency=1, flood=args.flood, **common)] if args.flood else []
    # Each load its own requests (seed + its place): a server answering a second load
    # would otherwise find the first one's prompts in its prefix cache.
    return [replace(s, seed=args.seed + i) for i, s in enumerate(specs)] or [
        LoadSpec(rate=DEFAULT_RATE, **common)]


def describe_load(specs: list[LoadSpec]) -> str:
    spec = specs[0]                  # the specs differ only in how requests arrive
    how = ", ".join(s.label for s in specs)
    until = " and ".join(x for x in (spec.duration_s and f"{spec.duration_s:g} s",
                                     spec.num_requests and f"{spec.num_requests} requests") if x)
    return (f"loads {how}, each until {until}; prompts {spec.prompt_tokens[0]}-{spec.prompt_tokens[1]} "
            f"tokens, outputs {spec.output_tokens[0]}-{spec.output_tokens[1]} (uniform, "
            f"seed {spec.seed} plus the load's place); greedy, EOS ignored, every request "
            f"streamed")


def start_servers(name: str, configs: dict, args: argparse.Namespace, results: Path):
    """The scenario's servers (a context manager with .targets and .memory()), or the
    reason they cannot run here."""
    if name == "fused":
        # One process instead of N: it gets the threads the N isolated ones had between
        # them (up to the cores), or fusing would be measured on a fraction of the CPU.
        threads = min(os.cpu_count() or 1, args.threads * len(configs["fused"].gpus[0].services))
        return ColocateServers(configs[name], threads, args.startup_timeout, args.door), None
    if name != "peer":
        return ColocateServers(configs[name], args.threads, args.startup_timeout,
                               args.door), None
    from colocate.cluster.supervisor import checkpoint_dir
    gpu = configs["shared"].gpus[0]
    checkpoint = str(checkpoint_dir(configs["shared"].models[gpu.services[0].model]))
    if args.peer_url:
        return UrlPeers(args.peer_url, [s.name for s in gpu.services],
                        args.peer_model or checkpoint), None
    reason = peer_unavailable(args.peer, gpu.device, checkpoint)
    if reason:
        return None, reason
    return ProcessPeers(args.peer, configs["shared"], args.threads, args.startup_timeout,
                        results / "logs"), None


def warm_up(targets, prompts: PromptMaker, spec: LoadSpec) -> None:
    """A short and a longest-prompt request to every server at once, untimed: first
    calls pay for lazy initialisation and per-shape kernel set-up."""
    import random

    errors: list[Exception] = []

    def one(t):
        try:
            for length in (spec.prompt_tokens[0], spec.prompt_tokens[1]):
                for _ in t.stream(prompts.make(random.Random(length), length), 4, 600):
                    pass
        except Exception as exc:    # raised below, in the caller's thread
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"warm-up: {short_error(errors[0])}")


def start_private_ray() -> None:
    """A Ray of this run's own, as `colocate serve` starts one. Never one found running
    on the machine (a plain ray.init() joins it): the servers measured must be ours
    alone, and the deployments then see every scenario the same way."""
    import logging

    import ray

    from colocate.cluster.deploy import OBJECT_STORE_BYTES
    ray.init(address="local", object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level=logging.WARNING)


def run(args: argparse.Namespace) -> dict:
    from colocate.cluster.supervisor import checkpoint_dir

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "load_average_before": list(os.getloadavg())}
    config_path = args.config or write_default_config(
        results / "deployment.yaml", args.model, args.services, kv_tokens=args.kv_tokens,
        max_model_len=args.max_model_len, max_num_seqs=16)
    config = load_bench_config(config_path)
    configs = scenario_configs(config)
    gpu = configs["shared"].gpus[0]
    prompts = PromptMaker(checkpoint_dir(config.models[gpu.services[0].model]))
    specs = load_specs(args)
    runs = [{"rate": s.rate, "concurrency": s.concurrency, "flood": s.flood, "load": s.label,
             "scenarios": {}} for s in specs]
    skipped: dict[str, str] = {}
    start_private_ray()       # one Ray for every scenario: start-up once, not 3 times
    try:
        for name in [s for s in args.scenarios.split(",") if s]:
            run_scenario(name, configs, args, results, prompts, specs, runs, skipped)
    finally:
        import ray
        ray.shutdown()
    for r in runs:
        r["ratios"] = headline_ratios(r["scenarios"])
    machine["load_average_after"] = list(os.getloadavg())
    return {"machine": machine, "config": describe(configs["shared"]),
            "settings": {"scenario_source": str(args.config or f"{args.services} x {args.model}"),
                         "torch_threads": args.threads, "door": args.door, "peer": args.peer,
                         "load_description": describe_load(specs), "argv": sys.argv[1:]},
            "skipped": skipped, "runs": runs}


def short_error(exc: BaseException) -> str:
    """The root error's type and last line: Ray wraps a remote one in its traceback."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[-1]}"


def run_scenario(name, configs, args, results, prompts, specs, runs, skipped) -> None:
    print(f"== {name}: starting", flush=True)
    t_start = time.perf_counter()
    try:
        servers, reason = start_servers(name, configs, args, results)
    except Exception as exc:        # e.g. unshared copies that do not fit the device
        servers, reason = None, f"could not start: {short_error(exc)}"
    if servers is None:
        print(f"== {name}: skipped: {reason}", flush=True)
        skipped[name] = reason
        for r in runs:
            r["scenarios"][name] = {"status": "skipped", "reason": reason}
        return
    with servers:
        print(f"== {name}: ready in {time.perf_counter() - t_start:.0f} s; warming up",
              flush=True)
        try:
            warm_up(servers.targets, prompts, specs[0])
            measure_loads(name, servers, prompts, specs, runs)
        except Exception as exc:    # a server lost mid-run: keep the other scenarios
            reason = f"failed: {short_error(exc)}"
            print(f"== {name}: {reason}", flush=True)
            for r in runs:
                r["scenarios"].setdefault(name, {"status": "failed", "reason": reason})


def measure_loads(name: str, servers, prompts: PromptMaker, specs: list[LoadSpec],
                  runs: list[dict]) -> None:
    """Every load in turn against one scenario's running servers."""
    for spec, r in zip(specs, runs):
        print(f"== {name}: {spec.label} per service x {len(servers.targets)}", flush=True)
        pids = servers.pids()
        cpu_before = cpu_seconds(pids)
        records, wall = run_load(servers.targets, spec, prompts,
                                 label=f"{name} {spec.label}")
        result = scenario_result(records, wall, [t.name for t in servers.targets],
                                 servers.memory())
        # How busy the servers kept the machine: near the core count means the
        # scenario was bound by CPU, not by its load.
        result["server_cpu_cores_busy"] = ((cpu_seconds(pids) - cpu_before) / wall
                                           if pids and wall > 0 else None)
        if hasattr(servers, "command"):
            result["command"] = servers.command
        r["scenarios"][name] = result
        o = result["overall"]
        print(f"   {o['completed']} done, {o['failed']} failed in {wall:.0f} s", flush=True)


def run_bursty_load(args: argparse.Namespace) -> dict:
    """--bursty: the config's services in turns, static budgets against sleep and lending."""
    from colocate.cluster.supervisor import checkpoint_dir

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "load_average_before": list(os.getloadavg())}
    config = load_bench_config(args.config or write_default_config(
        results / "deployment.yaml", args.model, args.services, kv_tokens=args.kv_tokens,
        max_model_len=args.max_model_len, max_num_seqs=16))
    prompts = PromptMaker(checkpoint_dir(config.models[config.gpus[0].services[0].model]))
    spec = load_specs(args)[0]
    args.prompt_range, args.output_range = spec.prompt_tokens, spec.output_tokens

    def servers(cfg):
        started = ColocateServers(cfg, args.threads, args.startup_timeout)
        warm_up(started.targets, prompts, spec)
        return started

    start_private_ray()
    try:
        result = run_bursty(args, config, prompts, servers)
    finally:
        import ray
        ray.shutdown()
    return {"machine": machine, "config": describe(config), **result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bursty:
        result = run_bursty_load(args)
        results = Path(args.results)
        write_json(results / "bursty.json", result)
        (results / "bursty.md").write_text(bursty_markdown(result))
        print("\n" + bursty_markdown(result))
        print(f"wrote {results / 'bursty.json'} and {results / 'bursty.md'}")
        return 0
    result = run(args)
    results = Path(args.results)
    plots, why_not = write_plots(result["runs"], results)
    if why_not:
        print(why_not)
    result["plots"] = [Path(p).name for p in plots]
    write_json(results / "colocation.json", result)
    (results / "colocation.md").write_text(markdown_report(result, plots))
    print()
    print(terminal_report(result["runs"]))
    print(f"\nwrote {results / 'colocation.json'}, {results / 'colocation.md'}"
          + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
