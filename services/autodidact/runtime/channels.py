"""Channels for service-to-service calls.

Every call gets a deadline (the service config's timeout applies when the
caller sets none), UNAVAILABLE is retried with backoff through the service
config (never other codes: most of our methods are not idempotent), and calls
are balanced round_robin over every address the name resolves to (a headless
Kubernetes Service gives one per pod; HTTP/2 connections defeat kube-proxy
balancing). The caller's request id travels along in x-request-id.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import structlog

from autodidact.runtime.interceptors import REQUEST_ID_HEADER
from autodidact.runtime.settings import CLIENT_KEEPALIVE_OPTIONS, MIB


def service_config(timeout_seconds: float, max_attempts: int = 4) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{}],  # every method of every service
                    "timeout": f"{timeout_seconds:.3f}s",
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


class _RequestIdPropagator(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the current request id (bound by the server interceptor) to outgoing calls."""

    def _with_request_id(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if REQUEST_ID_HEADER not in metadata:
            metadata.add(REQUEST_ID_HEADER, request_id)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_request_id(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_request_id(details), request)


def create_channel(
    target: str,
    *,
    timeout_seconds: float = 60.0,
    max_message_bytes: int = 8 * MIB,
) -> grpc.aio.Channel:
    """An insecure channel to `target` ("host:port" or "dns:///name:port")."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.service_config", service_config(timeout_seconds)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *CLIENT_KEEPALIVE_OPTIONS,
        ],
        interceptors=[_RequestIdPropagator()],
    )
