"""The standard health service, with Watch streams that end on shutdown.

Watch streams never end by themselves, and server.stop(grace) waits for every
RPC in flight: one open Watch would hold a stopping server for its whole grace
period. This servicer is the library's, except that during shutdown a Watch
stream closes (status OK) right after it has sent NOT_SERVING.
"""

from __future__ import annotations

from typing import Any, cast

from grpc.aio import ServicerContext
from grpc_health.v1 import health, health_pb2


class _WatchEnded(Exception):
    pass


class _ClosingAfterShutdownNotice:
    """Proxies a servicer context; its write() ends the Watch once NOT_SERVING
    has been sent during shutdown."""

    def __init__(self, context: Any, servicer: HealthServicer) -> None:
        self._context = context
        self._servicer = servicer

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._servicer.stopping and message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            raise _WatchEnded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthServicer(health.aio.HealthServicer):
    stopping = False

    async def enter_graceful_shutdown(self) -> None:
        self.stopping = True
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        try:
            # The proxy stands in for the context (every attribute but write() is the context's): a cast says so,
            # as __getattr__ delegation has no nominal type.
            notice = cast(
                ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse], _ClosingAfterShutdownNotice(context, self)
            )
            await super().Watch(request, notice)
        except _WatchEnded:
            return
