"""Channels for service-to-service calls.

Every call gets a deadline (the service config's timeout applies when the
caller sets none), UNAVAILABLE is retried with backoff through the service
config (never other codes: most of our methods are not idempotent), and calls
are balanced round_robin over every address the name resolves to (a headless
Kubernetes Service gives one per pod; HTTP/2 connections defeat kube-proxy
balancing). The caller's request id travels along in x-request-id, and, while
tracing is on, each call is a CLIENT span whose context travels in W3C
`traceparent` (runtime/tracing.py).

Credentials: one process has one identity. The CLI sets it once at start
(`set_default_client_credentials`) and every channel created without explicit
credentials uses it: each call carries `authorization: Bearer <token>`, and,
inside a served call or a job (a principal other than ANONYMOUS), the tenant
it acts for in the on-behalf-of header, which servers honour for services only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from autodidact.runtime import tracing
from autodidact.runtime.interceptors import EXEMPT_PREFIXES, REQUEST_ID_HEADER
from autodidact.runtime.principal import ANONYMOUS, ON_BEHALF_OF_HEADER, current_principal
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


@dataclass
class TokenFile:
    """A bearer token kept in a file, read again whenever the file changes:
    Kubernetes rewrites projected ServiceAccount tokens before they expire."""

    path: Path
    _mtime: int = field(default=-1, repr=False)
    _token: str = field(default="", repr=False)

    def token(self) -> str:
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._token = self.path.read_text(encoding="utf-8").strip()
                self._mtime = mtime
        except OSError:
            pass  # a moment of rotation: keep sending the token read last
        return self._token


@dataclass(frozen=True)
class ClientCredentials:
    """How a process's channels prove who it is and check whom they talk to."""

    # A literal token, a TokenFile, or None (no authorization metadata).
    token: str | TokenFile | None = None
    # Talk TLS, verifying servers against this CA bundle (None: plaintext).
    tls_ca: Path | None = None
    # A client certificate and key, for servers that require mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def bearer(self) -> str | None:
        token = self.token.token() if isinstance(self.token, TokenFile) else self.token
        return f"Bearer {token}" if token else None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        key = self.tls_key.read_bytes() if self.tls_key is not None else None
        cert = self.tls_cert.read_bytes() if self.tls_cert is not None else None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes(), private_key=key, certificate_chain=cert)


_default_credentials: ClientCredentials | None = None


def set_default_client_credentials(credentials: ClientCredentials | None) -> None:
    """The identity of every channel this process creates without explicit credentials."""
    global _default_credentials
    _default_credentials = credentials


def default_client_credentials() -> ClientCredentials | None:
    return _default_credentials


class _OutgoingMetadata:
    """Adds to outgoing calls the current request id (bound by the server
    interceptor), the bearer token, and the tenant the call acts for, and
    makes each call but health checks a span of the current trace. Metadata
    the caller set itself are left as they are."""

    def __init__(self, credentials: ClientCredentials | None = None) -> None:
        self._credentials = credentials

    def _with_metadata(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id is not None and REQUEST_ID_HEADER not in metadata:
            metadata.add(REQUEST_ID_HEADER, request_id)
        bearer = self._credentials.bearer() if self._credentials is not None else None
        if bearer is not None and "authorization" not in metadata:
            metadata.add("authorization", bearer)
        principal = current_principal()
        if principal is not ANONYMOUS and ON_BEHALF_OF_HEADER not in metadata:
            metadata.add(ON_BEHALF_OF_HEADER, principal.tenant)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)

    async def _start(self, details: grpc.aio.ClientCallDetails, start: Callable[[grpc.aio.ClientCallDetails], Awaitable[Any]]) -> Any:
        """Starts the call (`start` with the details it is to carry)."""
        details = self._with_metadata(details)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not tracing.enabled() or method.startswith(EXEMPT_PREFIXES):
            return await start(details)
        return await tracing.client_call(details, start)


# grpc.aio files each interceptor under the first kind of call it implements
# (an if/elif on its classes), so one object implementing all four would see
# unary-unary calls only: each kind gets its own.
class _UnaryUnaryMetadata(_OutgoingMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._start(details, lambda details: continuation(details, request))


class _UnaryStreamMetadata(_OutgoingMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._start(details, lambda details: continuation(details, request))


class _StreamUnaryMetadata(_OutgoingMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._start(details, lambda details: continuation(details, request_iterator))


class _StreamStreamMetadata(_OutgoingMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._start(details, lambda details: continuation(details, request_iterator))


def create_channel(
    target: str,
    *,
    timeout_seconds: float = 60.0,
    max_message_bytes: int = 8 * MIB,
    credentials: ClientCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` ("host:port" or "dns:///name:port"), with
    `credentials` or else the process's default ones (TLS when they name a CA)."""
    credentials = credentials if credentials is not None else _default_credentials
    options = [
        ("grpc.service_config", service_config(timeout_seconds)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *CLIENT_KEEPALIVE_OPTIONS,
    ]
    kinds = (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata, _StreamStreamMetadata)
    interceptors: list[grpc.aio.ClientInterceptor] = [kind(credentials) for kind in kinds]
    tls = credentials.channel_credentials() if credentials is not None else None
    if tls is not None:
        return grpc.aio.secure_channel(target, tls, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
