"""The services of the deployment YAML: their dataclasses and how the reader reads them.

colocate/config.py reads the file and the device entries; a service's keys (its
limits, KV cache, tenants, TLS) are read here, by the same reader (ServiceReader is
its service half), with the same messages: the file, the key path, what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from colocate.config_values import ValueReader, kind
from colocate.model.model_config import KV_CACHE_DTYPES
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
from colocate.engine.time_shares import DEFAULT_TIME_SLICE_S

# gRPC's own default receive limit; 4 MiB of prompt (~1M tokens) is a mistake or an attack.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES_LIMIT = 2**31 - 1        # gRPC keeps the limit in a C int
# Calls beyond those the engine can run or queue: Tokenize, GetModelInfo, GetStats, health.
EXTRA_CONCURRENT_RPCS = 16


@dataclass(frozen=True)
class TenantSpec:
    name: str
    token_env: str
    # Resolved from the environment at load time; None when env checking was skipped.
    # Kept out of repr so a logged config never leaks a bearer token.
    token: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class KVCacheSpec:
    dtype: str = "auto"               # "auto" (the model's dtype) | "int8"
    budget_bytes: int | None = None   # exactly one of budget_bytes and tokens is set
    tokens: int | None = None
    # Its free blocks may serve the other members of its fused group while it does not
    # need them; it takes them back within one step (colocate/engine/kv_lending.py).
    lend: bool = False


@dataclass(frozen=True)
class TLSSpec:
    """PEM files (absolute paths) for a service's gRPC port. With client_ca, mutual
    TLS: a client must present a certificate signed by that CA."""
    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    model: str
    port: int
    max_model_len: int
    kv_cache: KVCacheSpec
    tenants: tuple[TenantSpec, ...]
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queued_requests: int = 256
    tls: TLSSpec | None = None        # None: plaintext
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_concurrent_rpcs: int | None = None   # None: derived, see rpc_limit
    weight: float = 1.0               # its share of a fused group's step, against the others
    http_port: int | None = None      # the OpenAI-compatible HTTP door; None: gRPC only
    served_model_name: str | None = None   # the model's name over HTTP; None: the model key
    sleep_after_idle: float | None = None   # seconds idle before its KV pool is given back
    # Prefill tokens a step that also decodes may take (a fused group: the strictest of
    # its members'): smaller, the others' next token waits less; larger, prompts cost less.
    max_prefill_tokens_per_mixed_step: int = DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
    # Seconds of engine time a fused group's member may lead the least served before
    # it sits out steps (the group: the strictest of its members'; engine/time_shares.py).
    time_slice: float = DEFAULT_TIME_SLICE_S

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names an HTTP request may give the model; the first is listed."""
        return tuple(dict.fromkeys(n for n in (self.served_model_name, self.model) if n))

    @property
    def rpc_limit(self) -> int:
        """Calls the gRPC server runs at once (a streaming call holds a thread for
        its whole life); one more is refused with RESOURCE_EXHAUSTED. Default: room
        for every request the engine can run or queue, plus EXTRA_CONCURRENT_RPCS."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return self.max_num_seqs + self.max_queued_requests + EXTRA_CONCURRENT_RPCS


class ServiceReader(ValueReader):
    """The service keys of _Reader (colocate/config.py), which gives `port`, `env`,
    `check_env` and `topology`."""

    def tls(self, raw: Any, key: str) -> TLSSpec:
        t = self.mapping(raw, key, required=("cert", "key"), optional=("client_ca",))
        ca = self.existing_file(t["client_ca"], f"{key}.client_ca") if "client_ca" in t else None
        return TLSSpec(cert=self.existing_file(t["cert"], f"{key}.cert"),
                       key=self.existing_file(t["key"], f"{key}.key"), client_ca=ca)

    def service(self, raw: Any, key: str, models: Mapping[str, object],
                device_tls: TLSSpec | None = None) -> ServiceSpec:
        s = self.mapping(raw, key,
                         required=("name", "model", "port", "max_model_len", "kv_cache",
                                   "tenants"),
                         optional=("max_num_seqs", "max_num_batched_tokens",
                                   "max_queued_requests", "tls", "max_request_bytes",
                                   "max_concurrent_rpcs", "weight", "http_port",
                                   "served_model_name", "sleep_after_idle",
                                   "max_prefill_tokens_per_mixed_step", "time_slice"))
        name = self.string(s["name"], f"{key}.name")
        model = self.string(s["model"], f"{key}.model")
        if model not in models:
            raise self.error(f"{key}.model", f"model {model!r} is not defined under models "
                                             f"(defined: {', '.join(models)})")
        port = self.port(s["port"], f"{key}.port")
        max_seqs = self.integer(s.get("max_num_seqs", 64), f"{key}.max_num_seqs")
        max_tokens = self.integer(s.get("max_num_batched_tokens", 2048),
                                  f"{key}.max_num_batched_tokens")
        if max_tokens < max_seqs:  # every running sequence needs a token slot per step
            raise self.error(f"{key}.max_num_batched_tokens",
                             f"{max_tokens} is less than max_num_seqs ({max_seqs})")
        spec = ServiceSpec(
            name=name, model=model, port=port,
            max_model_len=self.integer(s["max_model_len"], f"{key}.max_model_len"),
            kv_cache=self.kv_cache(s["kv_cache"], f"{key}.kv_cache"),
            tenants=self.tenants(s["tenants"], f"{key}.tenants"),
            max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
            # At least 1: a queue of 0 would refuse every request that arrives while
            # the previous one is still being scheduled, and "unlimited" is not offered
            # (an unbounded queue is how a flood takes a service's memory).
            max_queued_requests=self.integer(s.get("max_queued_requests", 256),
                                             f"{key}.max_queued_requests"),
            tls=self.tls(s["tls"], f"{key}.tls") if "tls" in s else device_tls,
            weight=self.positive_number(s.get("weight", 1.0), f"{key}.weight"),
            sleep_after_idle=(self.duration(s["sleep_after_idle"], f"{key}.sleep_after_idle")
                              if "sleep_after_idle" in s else None),
            max_request_bytes=self.size(s.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
                                        f"{key}.max_request_bytes",
                                        maximum=MAX_REQUEST_BYTES_LIMIT),
            max_concurrent_rpcs=(self.integer(s["max_concurrent_rpcs"],
                                              f"{key}.max_concurrent_rpcs")
                                 if "max_concurrent_rpcs" in s else None),
            http_port=self.port(s["http_port"], f"{key}.http_port") if "http_port" in s else None,
            served_model_name=(self.string(s["served_model_name"], f"{key}.served_model_name")
                               if "served_model_name" in s else None),
            max_prefill_tokens_per_mixed_step=self.integer(
                s.get("max_prefill_tokens_per_mixed_step",
                      DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP),
                f"{key}.max_prefill_tokens_per_mixed_step"),
            time_slice=self.duration(s.get("time_slice", DEFAULT_TIME_SLICE_S),
                                     f"{key}.time_slice"),
        )
        # Checked once whole: a replica must equal its first copy but for the port.
        self.topology.claim_service(spec, key)
        return spec

    def kv_cache(self, raw: Any, key: str) -> KVCacheSpec:
        kv = self.mapping(raw, key, required=(), optional=("dtype", "budget", "tokens", "lend"))
        dtype = self.choice(kv.get("dtype", "auto"), f"{key}.dtype", KV_CACHE_DTYPES)
        lend = self.boolean(kv.get("lend", False), f"{key}.lend")
        if ("budget" in kv) == ("tokens" in kv):
            raise self.error(key, "give exactly one of budget (a size like 20GiB) or tokens")
        if "budget" in kv:
            return KVCacheSpec(dtype, self.size(kv["budget"], f"{key}.budget"), lend=lend)
        return KVCacheSpec(dtype, tokens=self.integer(kv["tokens"], f"{key}.tokens"), lend=lend)

    def tenants(self, raw: Any, key: str) -> tuple[TenantSpec, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.error(key, f"expected a non-empty list of tenants, got {kind(raw)}")
        tenants, names = [], set()
        for i, item in enumerate(raw):
            tkey = f"{key}[{i}]"
            t = self.mapping(item, tkey, required=("name", "token_env"))
            name = self.string(t["name"], f"{tkey}.name")
            if name in names:
                raise self.error(f"{tkey}.name", f"duplicate tenant name {name!r}")
            names.add(name)
            var = self.string(t["token_env"], f"{tkey}.token_env")
            token = self.env.get(var) or None
            if self.check_env and token is None:
                raise self.error(f"{tkey}.token_env",
                                 f"environment variable {var} is not set (or is empty)")
            tenants.append(TenantSpec(name=name, token_env=var, token=token))
        return tuple(tenants)

