"""Client-side helpers for talking to autodidact services."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autodidact.runtime.neighbours import rpc_error_text


class HealthCalls(Protocol):
    """The standard health service's calls, as a HealthStub on an aio channel has them (types-grpcio-health-checking
    declares HealthStub without its methods, so mypy would know neither the calls nor their replies)."""

    Check: grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
    Watch: grpc.aio.UnaryStreamMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


def health_stub(channel: grpc.aio.Channel) -> HealthCalls:
    """grpc_health's own stub, typed: its generated __init__ binds exactly these two calls on the channel."""
    return cast(HealthCalls, health_pb2_grpc.HealthStub(channel))


async def wait_until_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 60.0) -> None:
    """Polls the standard health service until `service` ("" = the whole
    server) reports SERVING; raises TimeoutError with the last status seen."""
    stub = health_stub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            last = rpc_error_text(exc)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{service or 'server'} not SERVING after {timeout:g}s (last: {last})")
