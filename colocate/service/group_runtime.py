"""GroupRuntime: the services of one model on one device in ONE process, stepping
as one batch (`batching: fused` in the YAML).

It maps the shared weights once, builds an engine group over them (one runner, one
KV cache, each service its own block range: colocate/worker/engine_factory.py), runs
one loop thread for the group (colocate/service/engine_loop.py) and opens one door
per service: its own gRPC port, tenants, TLS, queue limit, health and metrics. On
CUDA this is also one CUDA context for all of them.

The trade against `isolated`: a failed step ends only the requests it held, in
whichever services they were, and the group goes on; but if this process dies,
every service in it is down until the supervisor restarts the group.

The supervisor calls it per service, naming the member (ping, stats, metrics,
shutdown); MemberHandle lets it treat one member of a group actor as it treats a
service actor.
"""
from __future__ import annotations

import sys

from collections.abc import Sequence
from pathlib import Path

import torch

from colocate.memory.weight_store import attach, detach
from colocate.metrics.samples import ServiceReport
from colocate.engine.config import EngineConfig
from colocate.model.model_config import LlamaConfig
from colocate.model.tokenizer import load_tokenizer
from colocate.service.engine_loop import EngineLoop, FusedEngines
from colocate.service import test_hooks
from colocate.service.runtime import (ServiceDoor, ServiceLaunch, ServiceStats,
                                      keep_to_one_thread)
from colocate.worker.engine_factory import GroupMember, build_engine_group


class GroupRuntime:
    def __init__(self, launches: Sequence[ServiceLaunch]) -> None:
        if not launches:
            raise ValueError("a fused group needs at least one service")
        first = launches[0]
        models = {launch.weights.model_name for launch in launches}
        if len(models) != 1:
            raise ValueError(f"a fused group serves one model, got {sorted(models)}")
        self.launches = {launch.spec.name: launch for launch in launches}
        keep_to_one_thread()        # the loop's thread computes on torch_threads
        # The group's engine thread hands the GIL to the gRPC threads of every member
        # during each C step; at Python's default 5 ms interval, taking it back could
        # cost a step its length again. Measured once (3 fused SmolLM2 services, Zen 4):
        # ITL p50 27.9 -> 23.5 ms.
        sys.setswitchinterval(0.0005)
        # One mapping of the weights for the whole group; each launch's share lease
        # is kept so the supervisor's bookkeeping is per service as with isolated.
        self.model = attach(first.weights)
        config = LlamaConfig.from_dict(dict(first.weights.config))
        specs = [launch.spec for launch in launches]
        self.group = build_engine_group(
            self.model, config, load_tokenizer(Path(first.checkpoint_dir)),
            [GroupMember(s.name, EngineConfig.from_service(s, launch.kv_tokens), s.weight,
                         lend=s.kv_cache.lend)
             for s, launch in zip(specs, launches)],
            dtype=getattr(torch, first.weights.dtype), device=torch.device(first.device),
            max_num_batched_tokens=max(s.max_num_batched_tokens for s in specs))
        self.hooks = test_hooks.load_test_hooks(first.test_hooks)
        if self.hooks is not None:
            faulty = self.hooks.wrap_runner(self.group.runner)
            self.group.runner = faulty
            for engine in self.group.members.values():
                engine.runner = faulty
        # Each member sleeps after its own idle time (alone on CPU; on CUDA, where the
        # config gives a group one sleep_after_idle, only with the others).
        self.loop = EngineLoop(FusedEngines(self.group),
                               {self.group.members[s.name]: s.sleep_after_idle for s in specs},
                               intra_op_threads=max(1, first.torch_threads))
        self.doors: dict[str, ServiceDoor] = {}
        try:
            for name, launch in self.launches.items():
                self.doors[name] = ServiceDoor(launch, self.group.members[name], self.loop)
        except BaseException:
            for door in self.doors.values():
                door.close(0.0)
            self.loop.shutdown()
            detach(first.weights)
            raise

    # ---- per service, as the supervisor calls a service actor --------------------
    def port(self, name: str) -> int:
        return self.doors[name].port

    def ping(self, name: str) -> bool:
        return test_hooks.ping_allowed(self.hooks) and self.doors[name].ping()

    def stats(self, name: str) -> ServiceStats:
        return self.doors[name].stats()

    def metrics(self, name: str) -> ServiceReport:
        return self.doors[name].metrics()

    def inject_fault(self, name: str, kind: str, count: int = 1,
                     message: str = "injected fault", seconds: float = 0.0) -> None:
        """Tests only; a step fault hits the group's next steps, whoever is in them."""
        test_hooks.arm(self.hooks, kind, count, message, seconds)

    def shutdown(self, name: str, grace: float = 10.0) -> bool:
        """Drain and close one service's door; the last one stops the loop and unmaps
        the weights."""
        door = self.doors.pop(name, None)
        drained = door.close(grace) if door is not None else True
        if not self.doors:
            self.loop.shutdown()
            detach(next(iter(self.launches.values())).weights)
        return drained


class MemberHandle:
    """One member of a group actor, called like a service actor: handle.ping.remote()
    becomes group.ping.remote(name). `actor` is the group's actor (to kill it)."""

    def __init__(self, actor, name: str) -> None:
        self.actor, self.name = actor, name

    def __getattr__(self, method: str) -> "_MemberMethod":
        # Dunder lookups (pickle's, copy's) and a half-built handle get no forwarding.
        if method.startswith("__") or "actor" not in self.__dict__:
            raise AttributeError(method)
        return _MemberMethod(getattr(self.actor, method), self.name)


class _MemberMethod:
    def __init__(self, method, name: str) -> None:
        self.method, self.name = method, name

    def remote(self, *args, **kwargs):
        return self.method.remote(self.name, *args, **kwargs)
