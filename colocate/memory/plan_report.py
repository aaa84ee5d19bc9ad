"""`colocate plan`: admit every service of a deployment on paper and print the books.

Services are admitted in file order, as `colocate serve` would start them, so a
refusal names the first service that does not fit and by how many bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from colocate.config import DeploymentConfig, DeviceSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.sizing import ServiceDemand
from colocate.sizes import format_size, format_size_both


@dataclass
class DevicePlan:
    gpu: DeviceSpec
    arbiter: MemoryArbiter
    capacity_source: str                      # where the capacity figure came from
    refusals: list[AdmissionRefused] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.refusals


def plan_device(gpu: DeviceSpec, config: DeploymentConfig) -> DevicePlan:
    arbiter = MemoryArbiter.for_device(gpu, config)
    source = "set by memory:" if gpu.memory is not None else "as the device reports"
    plan = DevicePlan(gpu, arbiter, source)
    for service in gpu.services:
        demand = arbiter.demand(service)
        max_pos = arbiter.footprint(service.model).shape.max_position_embeddings
        if service.max_model_len > max_pos:
            plan.warnings.append(
                f"{service.name}: max_model_len {service.max_model_len} exceeds the model's "
                f"max_position_embeddings {max_pos}")
        if demand.kv_tokens < service.max_model_len:
            plan.warnings.append(
                f"{service.name}: its KV budget holds {demand.kv_tokens:,} tokens, fewer than "
                f"max_model_len {service.max_model_len}; a full-length request cannot run")
        try:
            arbiter.admit(service)
        except AdmissionRefused as refusal:
            plan.refusals.append(refusal)
    return plan


def plan_deployment(config: DeploymentConfig) -> list[DevicePlan]:
    return [plan_device(gpu, config) for gpu in config.gpus]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return "  " + "  ".join(cells).rstrip()

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _size_row(item: str, n: int) -> tuple[str, str, str, str]:
    # Both units: budgets are written in GiB, spec sheets and DESIGN.md speak GB.
    return item, format_size(n), f"{n / 1e9:.2f} GB", f"{n:,}"


def render_device(plan: DevicePlan) -> str:
    a = plan.arbiter
    out = [f"{a.device}: capacity {format_size_both(a.capacity)} ({plan.capacity_source}), "
           f"share_weights: {str(a.share_weights).lower()}"]
    rows = [_size_row(r.item, r.bytes) for r in a.ledger()]
    rows.append(_size_row("total reserved", a.reserved_bytes))
    rows.append(_size_row("free", a.free_bytes))
    out += _table(("item", "binary", "decimal", "bytes"), rows, right={1, 2, 3})

    demands: list[ServiceDemand] = a.admitted() + [r.demand for r in plan.refusals]
    footprints = {d.model: a.footprint(d.model) for d in demands}
    if footprints:
        # What each copy of the weights holds: the quantized linears per parameter
        # (scales and zeros included) and the parts that stay in the model dtype.
        out += ["", "  Weights per model (one copy):"]
        out += _table(
            ("model", "scheme", "linear params", "bytes/param", "linears", "embeddings+norms",
             "total"),
            [(name, f.describe(), f"{f.linear_parameters():,}",
              f"{f.linear_bytes() / f.linear_parameters():.3f}", format_size(f.linear_bytes()),
              format_size(f.unquantized_bytes()), format_size(f.weight_bytes()))
             for name, f in footprints.items()],
            right={2, 3, 4, 5, 6})
    if demands:
        out += ["", "  KV cache per service:"]
        out += _table(
            ("service", "model", "KV dtype", "bytes/token", "budget", "tokens", "admitted"),
            [(d.service, d.model, d.kv_dtype, f"{d.kv_bytes_per_token:,}",
              format_size(d.kv_bytes), f"{d.kv_tokens:,}",
              "no" if any(r.demand is d for r in plan.refusals) else "yes")
             for d in demands],
            right={3, 4, 5})
    for w in plan.warnings:
        out.append(f"  warning: {w}")
    for r in plan.refusals:
        out.append(f"  DOES NOT FIT: {r}")
    return "\n".join(out)


def render_plan(plans: list[DevicePlan]) -> str:
    parts = [render_device(p) for p in plans]
    refused = [r for p in plans for r in p.refusals]
    if refused:
        parts.append(f"plan: {len(refused)} service(s) do not fit: "
                     + ", ".join(f"{r.demand.service} (short by {r.shortfall:,} bytes)"
                                 for r in refused))
    else:
        parts.append("plan: every service fits")
    return "\n\n".join(parts)


def run_plan(path: str, out: TextIO, err: TextIO) -> int:
    """The CLI's work: 0 if everything fits, 1 if not, 2 if the plan cannot be made."""
    from colocate.config import ConfigError, load_config
    from colocate.memory.probe import ProbeError

    try:
        config = load_config(path, check_env=False)  # a plan needs no tenant secrets
        plans = plan_deployment(config)
    except (ConfigError, ProbeError, ValueError, FileNotFoundError) as e:
        print(f"colocate plan: {e}", file=err)
        return 2
    print(render_plan(plans), file=out)
    return 0 if all(p.fits for p in plans) else 1
