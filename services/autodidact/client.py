"""Client-side helpers for talking to autodidact services."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autodidact.runtime.neighbours import rpc_error_text


async def wait_until_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 60.0) -> None:
    """Polls the standard health service until `service` ("" = the whole
    server) reports SERVING; raises TimeoutError with the last status seen."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            # types-grpcio's HealthStub declares no methods; the generated class has Check.
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)  # type: ignore[attr-defined]
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            last = rpc_error_text(exc)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{service or 'server'} not SERVING after {timeout:g}s (last: {last})")
