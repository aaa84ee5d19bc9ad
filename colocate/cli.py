"""The `colocate` command: tiny-model | demo (later: plan | serve | generate | status)."""
from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
