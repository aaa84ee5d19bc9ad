"""The standard grpc.health.v1.Health service, answered from the engine's state.

SERVING while the engine can serve (its loop thread is alive), NOT_SERVING once
it has shut down or failed, or once the server has begun to stop. The names
known are "" (the server as a whole) and whatever serve() passes: the gRPC
service's full name and the deployment's service name.

The engine protocol has no way to announce that it died, so Watch re-reads
check_health every `poll_interval` seconds; a server stop or a cancelled call
wakes it at once.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

import grpc

from colocate.service.engine_protocol import EngineDeadError, EngineProtocol
from colocate.service.proto_gen import health_pb2
from colocate.service.proto_gen import health_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, engine: EngineProtocol, service_names: Iterable[str],
                 poll_interval: float = 0.2) -> None:
        self._engine = engine
        self._names = frozenset(["", *service_names])
        self._poll_interval = poll_interval
        self._cond = threading.Condition()
        # Guarded by _cond. _wakeups counts notifications, so a Watch that was
        # between reading the status and waiting does not sleep through one.
        self._stopping = False
        self._wakeups = 0

    def status(self) -> int:
        """The status of the server as a whole (every known name shares it)."""
        with self._cond:
            if self._stopping:
                return health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            self._engine.check_health()
        except EngineDeadError:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        except Exception:        # a broken check is no evidence of health
            log.exception("check_health failed")
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        """Say NOT_SERVING from now on and end every Watch, so that the server
        can stop without waiting out its grace period on them."""
        with self._cond:
            self._stopping = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self._names:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status())

    def Watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        known = request.service in self._names
        # The spec: an unknown name gets SERVICE_UNKNOWN and the call stays open,
        # as the name might become known later (here it never does).
        context.add_callback(self._wake)
        sent = None
        while context.is_active():
            with self._cond:
                seen = self._wakeups
                stopping = self._stopping
            status = self.status() if known else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status)
                sent = status
            if stopping:
                return
            with self._cond:
                if self._wakeups == seen:
                    self._cond.wait(self._poll_interval)
