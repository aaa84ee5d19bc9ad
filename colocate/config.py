"""The deployment YAML (see DESIGN.md) read into frozen, validated dataclasses.

Validation happens here, once, so everything downstream can trust a DeploymentConfig:
every error is a ConfigError naming the file, the key path
(`gpus[0].services[1].kv_cache.budget`) and what is wrong, because the person reading
it is editing a YAML file, not reading a traceback.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import yaml

from colocate.config_batching import check_batching
from colocate.config_topology import Topology
from colocate.config_values import ConfigError, ValueReader, kind
from colocate.model.model_config import KV_CACHE_DTYPES, MODEL_DTYPES, LlamaConfig
from colocate.presets import PRESET_PREFIX, preset_config, preset_names, tiny_presets

# None: as stored (a GGUF keeps its Q4 / Q8 blocks); "none": dequantized to `dtype`;
# "gguf": as stored or an error; "int8" / "int4": quantized at load.
QUANTIZATIONS = (None, "none", "gguf", "int8", "int4")
RESTART_POLICIES = ("never", "anywhere")   # what to do with an entry whose node is lost
BATCHING_MODES = ("isolated", "fused")     # a process per service, or one per model
DEFAULT_QUANT_GROUP_SIZE = 128
# gRPC's own default receive limit; 4 MiB of prompt (~1M tokens) is a mistake or an attack.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES_LIMIT = 2**31 - 1        # gRPC keeps the limit in a C int
# Calls beyond those the engine can run or queue: Tokenize, GetModelInfo, GetStats, health.
EXTRA_CONCURRENT_RPCS = 16
_DEVICE_RE = re.compile(r"^(cpu|cuda:[0-9]+)$")


# ---- the dataclasses -------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str                        # absolute directory or .gguf file, or "preset:<name>"
    dtype: str = "auto"              # "auto": the checkpoint's torch_dtype
    quantization: str | None = None  # None (as stored) | "none" | "gguf" | "int8" | "int4"
    quant_group_size: int = DEFAULT_QUANT_GROUP_SIZE

    @property
    def preset(self) -> str | None:
        """The built-in tiny checkpoint's name when the path is `preset:<name>`."""
        return self.path[len(PRESET_PREFIX):] if self.path.startswith(PRESET_PREFIX) else None

    def llama_config(self) -> LlamaConfig:
        """The model's shape, from config.json or a GGUF header alone (no weights are read)."""
        if self.preset is not None:
            return preset_config(self.preset)
        return LlamaConfig.from_pretrained(self.path)

    @property
    def quant_group_arg(self) -> int | None:
        """The group size to load with: only int4 asks for one (a GGUF has its own)."""
        return self.quant_group_size if self.quantization == "int4" else None


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


@dataclass(frozen=True)
class DeviceSpec:
    device: str                      # "cpu" | "cuda:N"
    services: tuple[ServiceSpec, ...]
    memory: int | None = None        # bytes; None: what the device reports
    headroom: int | None = None      # bytes; None: the arbiter's per-device default
    share_weights: bool = True
    metrics_port: int | None = None
    tls: TLSSpec | None = None       # what its services inherit unless they set their own
    name: str | None = None          # None: see entry_name
    node: str | None = None          # a Ray node id, an IP or a label `key=value`; None: any
    restart: str = "never"           # "anywhere": re-place it on another node if its node dies
    # "fused": the services of one model run in one process and decode as one batch
    # (colocate/service/group_runtime.py); "isolated": a process per service.
    batching: str = "isolated"

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def entry_name(self) -> str:
        """How the deployment names this entry (and its supervisor actor): `name`,
        else the device, qualified by the node pin when there is one."""
        if self.name:
            return self.name
        return self.device if self.node is None else f"{self.device}@{self.node}"


@dataclass(frozen=True)
class DeploymentConfig:
    source: str                      # the YAML file, for messages
    models: Mapping[str, ModelSpec]  # read-only view
    gpus: tuple[DeviceSpec, ...]
    name: str | None = None          # the deployment's name on a cluster; None: from the file

    def services(self) -> Iterator[tuple[DeviceSpec, ServiceSpec]]:
        """Every (entry, service) pair: a replicated service once per replica."""
        for gpu in self.gpus:
            for service in gpu.services:
                yield gpu, service

    def replicas(self) -> dict[str, list[tuple[DeviceSpec, ServiceSpec]]]:
        """service name -> its copies, one per device entry that lists it."""
        out: dict[str, list[tuple[DeviceSpec, ServiceSpec]]] = {}
        for gpu, service in self.services():
            out.setdefault(service.name, []).append((gpu, service))
        return out


# ---- loading ---------------------------------------------------------------------

def load_config(path: str | os.PathLike, env: Mapping[str, str] | None = None,
                check_paths: bool = True, check_env: bool = True) -> DeploymentConfig:
    """Read and validate a deployment file.

    check_paths: model directories must exist and hold a config.json.
    check_env: every tenant's token_env must be set (non-empty) in `env`
    (os.environ by default); `colocate plan` turns this off, it needs no secrets.
    """
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    reader = _Reader(file, os.environ if env is None else env, check_paths, check_env)
    return reader.deployment(data)


class _Reader(ValueReader):
    """Walks the parsed YAML, keeping the key path for messages and the ports seen."""

    def __init__(self, file: Path, env: Mapping[str, str], check_paths: bool,
                 check_env: bool):
        super().__init__(file, check_paths)
        self.env = env
        self.check_env = check_env
        self.topology = Topology(self.error)     # ports and names across device entries

    def port(self, value: Any, key: str) -> int:
        port = self.integer(value, key, minimum=1, maximum=65535)
        self.topology.claim_port(port, key)
        return port

    # -- the schema --
    def deployment(self, data: Any) -> DeploymentConfig:
        top = self.mapping(data, "", required=("models", "gpus"), optional=("name",))
        name = self.string(top["name"], "name") if "name" in top else None
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise self.error("name", f"{name!r} may hold only letters, digits, '_', '.', '-'")
        models = self.models(top["models"])
        gpus_raw = top["gpus"]
        if not isinstance(gpus_raw, list) or not gpus_raw:
            raise self.error("gpus", f"expected a non-empty list, got {kind(gpus_raw)}")
        gpus = [self.device(raw, f"gpus[{i}]", models, index=i)
                for i, raw in enumerate(gpus_raw)]
        return DeploymentConfig(source=str(self.file), models=MappingProxyType(models),
                                gpus=tuple(gpus), name=name)

    def models(self, raw: Any) -> dict[str, ModelSpec]:
        if not isinstance(raw, dict) or not raw:
            raise self.error("models", f"expected a non-empty mapping, got {kind(raw)}")
        return {self.string(name, "models"): self.model(name, spec, f"models.{name}")
                for name, spec in raw.items()}

    def model(self, name: str, raw: Any, key: str) -> ModelSpec:
        m = self.mapping(raw, key, required=("path",),
                         optional=("dtype", "quantization", "quant_group_size"))
        dtype = self.choice(m.get("dtype", "auto"), f"{key}.dtype", ("auto",) + MODEL_DTYPES)
        quant = self.choice(m.get("quantization"), f"{key}.quantization", QUANTIZATIONS)
        group = DEFAULT_QUANT_GROUP_SIZE
        if "quant_group_size" in m:
            if quant != "int4":
                raise self.error(f"{key}.quant_group_size",
                                 "only applies to quantization: int4 (int8 is per channel)")
            group = self.integer(m["quant_group_size"], f"{key}.quant_group_size")
        path = self.model_path(self.string(m["path"], f"{key}.path"), f"{key}.path")
        return ModelSpec(name=name, path=path, dtype=dtype, quantization=quant,
                         quant_group_size=group)

    def model_path(self, raw: str, key: str) -> str:
        if raw.startswith(PRESET_PREFIX):
            presets = tiny_presets()
            name = raw[len(PRESET_PREFIX):]
            # Without the tiny module we cannot know the names; the plan will say so.
            if self.check_paths and presets is not None and name not in preset_names():
                raise self.error(key, f"unknown preset {name!r}; choose from {preset_names()}")
            return raw
        path = self.resolve(raw)
        if self.check_paths:
            if path.is_file():
                from colocate.model.gguf_file import check_model_file

                try:
                    check_model_file(path)
                except ValueError as e:
                    raise self.error(key, str(e)) from None
            elif not path.is_dir():
                raise self.error(key, f"model directory or .gguf file {path} does not exist")
            elif not (path / "config.json").is_file():
                raise self.error(key, f"model directory {path} has no config.json")
        return str(path)

    def tls(self, raw: Any, key: str) -> TLSSpec:
        t = self.mapping(raw, key, required=("cert", "key"), optional=("client_ca",))
        ca = self.existing_file(t["client_ca"], f"{key}.client_ca") if "client_ca" in t else None
        return TLSSpec(cert=self.existing_file(t["cert"], f"{key}.cert"),
                       key=self.existing_file(t["key"], f"{key}.key"), client_ca=ca)

    def device(self, raw: Any, key: str, models: Mapping[str, ModelSpec],
               index: int = 0) -> DeviceSpec:
        d = self.mapping(raw, key, required=("device", "services"),
                         optional=("memory", "headroom", "share_weights", "metrics_port",
                                   "tls", "name", "node", "restart", "batching"))
        device = self.string(d["device"], f"{key}.device")
        if not _DEVICE_RE.match(device):
            raise self.error(f"{key}.device", f"{device!r} is not 'cpu' or 'cuda:N'")
        # The pin first: which ports may repeat depends on it.
        node = self.string(str(d["node"]), f"{key}.node") if "node" in d else None
        self.topology.begin_entry(index, node)
        name = self.string(d["name"], f"{key}.name") if "name" in d else None
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]+", name):
            raise self.error(f"{key}.name", f"{name!r} may hold only letters, digits and _.:@-")
        restart = self.choice(d.get("restart", "never"), f"{key}.restart", RESTART_POLICIES)
        memory = self.size(d["memory"], f"{key}.memory") if "memory" in d else None
        headroom = (self.size(d["headroom"], f"{key}.headroom", allow_zero=True)
                    if "headroom" in d else None)
        share = self.boolean(d.get("share_weights", True), f"{key}.share_weights")
        batching = self.choice(d.get("batching", "isolated"), f"{key}.batching", BATCHING_MODES)
        metrics_port = (self.port(d["metrics_port"], f"{key}.metrics_port")
                        if "metrics_port" in d else None)
        tls = self.tls(d["tls"], f"{key}.tls") if "tls" in d else None
        raw_services = d["services"]
        if not isinstance(raw_services, list) or not raw_services:
            raise self.error(f"{key}.services",
                             f"expected a non-empty list, got {kind(raw_services)}")
        services = tuple(self.service(s, f"{key}.services[{i}]", models, tls)
                         for i, s in enumerate(raw_services))
        check_batching(self.error, key, batching, share, services, device)
        spec = DeviceSpec(device=device, services=services, memory=memory, headroom=headroom,
                          share_weights=share, metrics_port=metrics_port, tls=tls, name=name,
                          node=node, restart=restart, batching=batching)
        if name is not None:
            self.topology.claim_entry(name, key, f"{key}.name")
        else:
            self.topology.claim_entry(spec.entry_name, key, f"{key}.device",
                                      "; give each a distinct node or name")
        return spec

    def service(self, raw: Any, key: str, models: Mapping[str, ModelSpec],
                device_tls: TLSSpec | None = None) -> ServiceSpec:
        s = self.mapping(raw, key,
                         required=("name", "model", "port", "max_model_len", "kv_cache",
                                   "tenants"),
                         optional=("max_num_seqs", "max_num_batched_tokens",
                                   "max_queued_requests", "tls", "max_request_bytes",
                                   "max_concurrent_rpcs", "weight", "http_port",
                                   "served_model_name", "sleep_after_idle"))
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

