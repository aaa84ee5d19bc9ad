"""The `colocate` command: tiny-model | demo | plan | serve | apply | generate | status | top."""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from colocate.model.tiny import PRESETS, write_tiny_checkpoint

    if args.preset not in PRESETS:
        print(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2
    path = write_tiny_checkpoint(args.dir, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} checkpoint to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from colocate.demo import run_demo

    return run_demo(args.model, num_prompts=args.num_prompts, max_tokens=args.max_tokens)


def _cmd_plan(args: argparse.Namespace) -> int:
    from colocate.memory.plan_report import run_plan

    return run_plan(args.config, out=sys.stdout, err=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from colocate.client import Client

    token = args.token or os.environ.get("COLOCATE_TOKEN")
    if not token:
        print("error: no token: pass --token or set COLOCATE_TOKEN", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    wrote = False
    try:
        with Client(args.target, token, timeout=args.timeout, tls=args.tls,
                    tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
            deltas = (client.chat([{"role": "user", "content": prompt}], **sampling)
                      if args.chat else client.generate(prompt, **sampling))
            for delta in deltas:
                sys.stdout.write(delta.text)
                sys.stdout.flush()          # show each piece as it arrives
                wrote = wrote or bool(delta.text)
    except grpc.RpcError as err:
        if wrote:
            sys.stdout.write("\n")
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except ValueError as err:       # an unreadable TLS file, a value out of proto range
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from colocate.cluster.deploy import run_serve
    from colocate.serve_demo import send_demo_requests

    return run_serve(args.config, args.address, host=args.host,
                     torch_threads=args.torch_threads, grace=args.grace, quiet=args.quiet,
                     on_ready=send_demo_requests if args.demo else None)


def _cmd_apply(args: argparse.Namespace) -> int:
    from colocate.cluster.apply import run_apply

    return run_apply(args.config, args.address, args.deployment, grace=args.grace)


def _cmd_status(args: argparse.Namespace) -> int:
    from colocate.cluster.cluster_status import run_status

    return run_status(args.address, timeout=args.timeout)


def _cmd_top(args: argparse.Namespace) -> int:
    from colocate.top import run_top, urls_from_config

    try:
        urls = list(args.url or []) + (urls_from_config(args.config) if args.config else [])
        if args.address:
            from colocate.cluster.cluster_status import cluster_status, metrics_urls
            from colocate.cluster.registry import ClusterUnreachable, on_cluster

            try:
                with on_cluster(args.address, "colocate top"):
                    urls += metrics_urls(cluster_status())
            except ClusterUnreachable as exc:
                raise ConnectionError(str(exc)) from None
        return run_top(urls, interval=args.interval, once=args.once)
    except (ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cluster_command(sub, name: str, func, *, help: str, description: str,
                     timeout: tuple[str, float, str]) -> argparse.ArgumentParser:
    """A subcommand that joins a running cluster (apply, status): --address, and the
    one wait it bounds (`timeout`: flag, default seconds, help)."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--address", default="auto",
                   help="the Ray cluster (HOST:PORT, or auto for the one this host is in)")
    flag, seconds, what = timeout
    p.add_argument(flag, type=float, default=seconds, help=what)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colocate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a deterministic random LLaMA checkpoint (HF layout)")
    p.add_argument("dir")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("demo", help="offline generation over a batch of prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plan", help="the memory plan per device; exit 1 if it does not fit")
    p.add_argument("config", help="deployment YAML")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "generate", help="stream a completion from a running service",
        description="Stream a completion from a running service to stdout. On failure, "
                    "print the gRPC status code and message to stderr and exit 1.",
        epilog="The token may be given in the environment variable COLOCATE_TOKEN instead "
               "of --token, which keeps it out of shell history and process listings.")
    p.add_argument("prompt", help='the prompt text; "-" reads it from stdin')
    p.add_argument("--target", required=True, help="the service's HOST:PORT")
    p.add_argument("--token", help="a tenant's bearer token (default: $COLOCATE_TOKEN)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message, through the model's chat template")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--stop", action="append", help="a stop string; repeat for more")
    p.add_argument("--timeout", type=float, help="deadline in seconds for the whole call")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, trusting the system's CAs (implied by --tls-*)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the service's")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="this client's certificate, for a service that requires mutual TLS")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "serve", help="start a deployment and serve it until Ctrl-C",
        epilog="Models given as preset:NAME are written once to "
               "$COLOCATE_CACHE/presets/NAME (default ~/.cache/colocate/presets/NAME).")
    p.add_argument("config", nargs="?", default=None,
                   help="deployment YAML (default: the built-in 3-service CPU demo)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of "
                   "starting a local one: auto (the cluster this host is in) or HOST:PORT")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface the services bind (0.0.0.0 on a cluster)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per service (default: cores // services)")
    p.add_argument("--demo", action="store_true",
                   help="after startup, send one request to every service and print it")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds requests in flight get to finish on Ctrl-C / SIGTERM")
    p.add_argument("--quiet", action="store_true",
                   help="no progress for loading and starting (bars on a terminal, else "
                        "one line per stage)")
    p.set_defaults(func=_cmd_serve)

    p = _cluster_command(
        sub, "apply", _cmd_apply, help="change a running deployment live to a new YAML",
        description="Check the new YAML's plan on every device first (refusing the whole "
                    "change, exit 1, if it does not fit); then start, stop (drained) or "
                    "restart only the services that differ. `colocate serve` does the "
                    "same with its own file on SIGHUP.",
        timeout=("--grace", 10.0, "seconds a stopped service's requests in flight get to finish"))
    p.add_argument("config", help="the new deployment YAML")
    p.add_argument("--deployment", default=None,
                   help="the deployment's name (default: the YAML's name, else the only one)")

    _cluster_command(
        sub, "status", _cmd_status,
        help="every deployment on a Ray cluster: devices, services, health, ledgers",
        description="Join a Ray cluster and list each colocate deployment on it: every "
                    "device entry and the node it runs on (or lost), every service with its "
                    "endpoint, health, restarts and load, and each device's memory ledger.",
        timeout=("--timeout", 10.0, "seconds to wait for each supervisor's answer"))

    p = sub.add_parser(
        "top", help="a live view of a running deployment's devices and services",
        description="Refresh every second from each device's metrics endpoint: memory per "
                    "device; per service requests running and waiting, KV blocks used, "
                    "tokens/s in and out, TTFT and ITL p50/p99 over the last minute, "
                    "requests finished and refused. Keys: s sorts, q quits.")
    p.add_argument("config", nargs="?", default=None,
                   help="deployment YAML: watch every device's metrics_port on this host")
    p.add_argument("--url", action="append",
                   help="a device's /metrics URL (as `colocate serve` prints); repeatable")
    p.add_argument("--address", default=None,
                   help="a Ray cluster (HOST:PORT, or auto): watch every device of every "
                        "deployment on it")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=_cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
