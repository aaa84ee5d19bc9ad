"""ServiceRuntime: one service's process. Maps the shared weights, builds its engine over
its own KV pool, and serves it over gRPC (and, with `http_port:`, OpenAI's HTTP API).

The supervisor hands every service a ServiceLaunch: the weight handle it got from the
WeightStore, the service's KV budget in tokens as the MemoryArbiter admitted it, and
the tenants' tokens, which the driver resolved from its own environment (Ray workers
need not share it). The pool is sized from that budget once, here, and the engine
cannot grow it: the budget is enforced by construction, not by watching.

All the work happens in the constructor, so a service that cannot start fails its
actor creation, and the supervisor sees the cause when it first pings it. After that
the actor's methods only observe (ping, stats, metrics) or stop (shutdown); requests never pass
through Ray, they go straight to the gRPC server in this process. The supervisor runs
it as a Ray actor (ServiceActor, in supervisor.py); nothing here imports Ray, so a
service also runs as a plain process (bench/gpu_check.py does, on a GPU without Ray).

shutdown() is graceful: the health service turns NOT_SERVING and new requests are
refused with UNAVAILABLE at once, while those in flight get `grace` seconds to end.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from colocate.config import ServiceSpec
from colocate.engine.block_pool import pool_blocks
from colocate.engine.config import EngineConfig
from colocate.engine.shared_lending import LendingCircle
from colocate.memory.weight_store import WeightHandle, attach, detach
from colocate.metrics.rejections import RejectionCounter
from colocate.metrics.samples import ServiceReport
from colocate.model.model_config import LlamaConfig
from colocate.model.tokenizer import load_tokenizer
from colocate.service.async_engine import AsyncEngine
from colocate.service.engine_loop import EngineLoop
from colocate.service.engine_protocol import EngineDeadError
from colocate.service import test_hooks
from colocate.service.grpc_server import model_info_from_engine, serve
from colocate.service.http_server import HttpServer, serve_http
from colocate.worker.engine_factory import build_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLaunch:
    """Everything a service process needs; picklable, built by the supervisor."""
    spec: ServiceSpec
    weights: WeightHandle
    checkpoint_dir: str            # for the tokenizer; the weights come from `weights`
    kv_tokens: int                 # the admitted budget (whole blocks' worth)
    device: str = "cpu"            # as this process sees it (CUDA: after Ray's remapping)
    host: str = "127.0.0.1"
    torch_threads: int = 1
    weights_shared: bool = True    # one published copy for every service of the model
    kv_budget_bytes: int = 0       # the arbiter's KV figure for this service
    test_hooks: str | None = None  # tests only: "module:factory" (service/test_hooks.py)
    # Isolated lending on CPU: the one KV pool file it shares (engine/shared_lending.py).
    kv_circle: LendingCircle | None = None
    # token -> tenant name. Kept out of repr so a logged launch never leaks a token.
    tenants: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_blocks(self) -> int:
        """The pool's size: the budget's blocks plus the null block (block 0)."""
        return pool_blocks(self.kv_tokens)


@dataclass(frozen=True)
class ServiceStats:
    name: str
    pid: int
    port: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    pss_bytes: int                 # proportional set size: shared pages split by sharers
    healthy: bool
    message: str = ""
    sleeping: bool = False         # sleep_after_idle: the KV pool is given back for now
    kv_blocks_lent: int = 0        # lending: of this pool, held by other services
    kv_blocks_borrowed: int = 0    # lending: of other pools, held by this service


class ServiceDoor:
    """One service's front (its queue, streams, health) and gRPC server over an engine
    a loop steps: the loop is the service's own (loop=None) or its fused group's."""

    def __init__(self, launch: ServiceLaunch, llm_engine, loop: EngineLoop | None = None) -> None:
        spec = launch.spec
        self.launch, self.name, self.llm_engine = launch, spec.name, llm_engine
        self.engine = AsyncEngine(
            llm_engine, max_queued_requests=spec.max_queued_requests, loop=loop,
            sleep_after_idle=None if loop else spec.sleep_after_idle,
            intra_op_threads=None if loop else max(1, launch.torch_threads))
        quant = launch.weights.quantization or {}
        info = model_info_from_engine(
            llm_engine, model_name=spec.model, dtype=launch.weights.dtype,
            quantization=quant.get("method", ""), kv_cache_dtype=spec.kv_cache.dtype,
            weight_bytes=launch.weights.tensor_bytes, weights_shared=launch.weights_shared,
            kv_cache_bytes=launch.kv_budget_bytes)
        self.rejections = RejectionCounter()
        self.http: HttpServer | None = None
        try:
            self.server = serve(self.engine, spec.port, launch.tenants, spec.name, info,
                                host=launch.host, on_reject=self.rejections.add,
                                tls=spec.tls, max_request_bytes=spec.max_request_bytes,
                                max_concurrent_rpcs=spec.rpc_limit)
        except BaseException:
            self.engine.shutdown()
            raise
        if spec.http_port is not None:
            try:
                self.http = serve_http(self.engine, spec.http_port, launch.tenants, spec.name,
                                       spec.model_names, host=launch.host, tls=spec.tls,
                                       max_request_bytes=spec.max_request_bytes,
                                       max_in_flight=spec.rpc_limit,
                                       on_reject=self.rejections.add)
            except BaseException:
                self.server.stop(0)
                self.engine.shutdown()
                raise
        log.info("service %s serving on %s:%d%s (pid %d, %d KV blocks)", spec.name,
                 launch.host, self.server.port,
                 f", HTTP on {self.http.port}" if self.http is not None else "",
                 os.getpid(), launch.num_blocks - 1)

    @property
    def port(self) -> int:
        return self.server.port

    def ping(self) -> bool:
        """True while the engine loop runs; False once it failed or stopped."""
        try:
            self.engine.check_health()
        except EngineDeadError:
            return False
        return True

    def stats(self) -> ServiceStats:
        s = self.engine.stats()
        message = ""
        try:
            self.engine.check_health()
        except EngineDeadError as exc:
            message = str(exc)
        return ServiceStats(
            name=self.name, pid=os.getpid(), port=self.port, num_running=s.num_running,
            num_waiting=s.num_waiting, kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total, pss_bytes=process_pss(),
            healthy=not message, message=message, sleeping=s.sleeping,
            kv_blocks_lent=s.kv_blocks_lent, kv_blocks_borrowed=s.kv_blocks_borrowed)

    def metrics(self) -> ServiceReport:
        """The engine's statistics and the refusals so far, for a metrics scrape."""
        return ServiceReport(pid=os.getpid(), dtype=self.launch.weights.dtype,
                             stats=self.llm_engine.statistics(),
                             rejected=self.rejections.counts())

    def close(self, grace: float) -> bool:
        """Refuse new requests (health NOT_SERVING, calls UNAVAILABLE), give those in
        flight up to `grace` seconds, then stop the server and the front. True if
        every request in flight finished in time."""
        drained = self.engine.drain(grace)
        if not drained:
            log.warning("service %s: requests still running after %.1f s; aborting them",
                        self.name, grace)
        # The streams have their final outputs; a second lets the handlers send them.
        self.server.stop(1.0)
        if self.http is not None:
            self.http.stop()
        self.engine.shutdown()
        return drained


def keep_to_one_thread() -> None:
    """For the thread that builds a service's engine: torch's work here stays on this
    thread, so that the engine loop's thread is the process's only OpenMP team."""
    torch.set_num_threads(1)


class ServiceRuntime:
    """The service itself, without Ray: tests and ServiceActor both use it."""

    def __init__(self, launch: ServiceLaunch) -> None:
        spec = launch.spec
        self.launch = launch
        self.name = spec.name
        # Several services share the cores; one intra-op pool each, sized by the
        # supervisor (launch.torch_threads), keeps them from oversubscribing the
        # machine. That pool is the engine loop thread's (engine_loop.py: why this
        # thread, which builds the engine, computes on one).
        keep_to_one_thread()
        device = torch.device(launch.device)
        model = attach(launch.weights)
        dtype = getattr(torch, launch.weights.dtype)
        config = LlamaConfig.from_dict(dict(launch.weights.config))
        self.llm_engine = build_engine(
            model, config, load_tokenizer(Path(launch.checkpoint_dir)),
            EngineConfig.from_service(spec, launch.kv_tokens), dtype=dtype, device=device,
            circle=launch.kv_circle, name=spec.name)
        self.hooks = test_hooks.load_test_hooks(launch.test_hooks)
        if self.hooks is not None:
            self.llm_engine.runner = self.hooks.wrap_runner(self.llm_engine.runner)
        self.door = ServiceDoor(launch, self.llm_engine)
        self.engine, self.server = self.door.engine, self.door.server

    @property
    def port(self) -> int:
        return self.door.port

    def ping(self) -> bool:
        """True while the engine loop runs; False once it failed or stopped."""
        return test_hooks.ping_allowed(self.hooks) and self.door.ping()

    def stats(self) -> ServiceStats:
        return self.door.stats()

    def metrics(self) -> ServiceReport:
        return self.door.metrics()

    def inject_fault(self, kind: str, count: int = 1, message: str = "injected fault",
                     seconds: float = 0.0) -> None:
        """Tests only (see service/test_hooks.py); refused unless launched with hooks."""
        test_hooks.arm(self.hooks, kind, count, message, seconds)

    def shutdown(self, grace: float = 10.0) -> bool:
        """Drain and stop (ServiceDoor.close), then unmap the weights."""
        drained = self.door.close(grace)
        detach(self.launch.weights)
        return drained


def process_pss(pid: int | None = None) -> int:
    """PSS of a process: each shared page counts 1/N to each of its N mappers, so the
    PSS of all services adds up to what they really hold together."""
    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):    # no /proc/PID/smaps access
        return 0
