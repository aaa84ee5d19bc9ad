"""The deployment YAML (see DESIGN.md) read into frozen, validated dataclasses.

Validation happens here, once, so everything downstream can trust a DeploymentConfig:
every error is a ConfigError naming the file, the key path
(`gpus[0].services[1].kv_cache.budget`) and what is wrong, because the person reading
it is editing a YAML file, not reading a traceback.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import yaml

from colocate.config_batching import check_batching
from colocate.config_service import (  # noqa: F401  (re-exported: the YAML's names)
    DEFAULT_MAX_REQUEST_BYTES, EXTRA_CONCURRENT_RPCS, MAX_REQUEST_BYTES_LIMIT, KVCacheSpec,
    ServiceReader, ServiceSpec, TenantSpec, TLSSpec)
from colocate.config_topology import Topology
from colocate.config_values import ConfigError, kind
from colocate.model.model_config import MODEL_DTYPES, LlamaConfig
from colocate.presets import PRESET_PREFIX, preset_config, preset_names, tiny_presets

# None: as stored (a GGUF keeps its Q4 / Q8 blocks); "none": dequantized to `dtype`;
# "gguf": as stored or an error; "int8" / "int4": quantized at load.
QUANTIZATIONS = (None, "none", "gguf", "int8", "int4")
RESTART_POLICIES = ("never", "anywhere")   # what to do with an entry whose node is lost
BATCHING_MODES = ("isolated", "fused")     # a process per service, or one per model
DEFAULT_QUANT_GROUP_SIZE = 128
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


class _Reader(ServiceReader):
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
