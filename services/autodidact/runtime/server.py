"""The gRPC host every autodidact service runs in.

One ServiceHost serves one or more components (a servicer plus the resource it
needs: runtime/component.py) on one port, with:
- the standard health service: NOT_SERVING for each component until its
  backend is loaded, SERVING after; the overall status ("") turns SERVING once
  every component is;
- reflection, so outside clients (grpcurl) can list and call methods;
- the request-id, tracing (spans only once runtime/tracing.py is configured),
  metrics, error and authentication interceptors (the last only when the
  settings carry an AuthSettings), and TLS when they name a certificate;
- explicit message size limits, keepalive, and bounds on calls and on
  streams in progress (health and reflection exempt: runtime/interceptors.py);
- graceful shutdown: health goes NOT_SERVING (health Watch streams then end),
  new calls are refused, calls in flight get `grace_seconds` to finish.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from autodidact.errors import StartupError
from autodidact.runtime.component import Component
from autodidact.runtime.health import HealthServicer
from autodidact.runtime.interceptors import server_interceptors
from autodidact.runtime.metrics import start_metrics_endpoint
from autodidact.runtime.settings import SERVER_KEEPALIVE_OPTIONS, ServerSettings

log = structlog.get_logger("autodidact.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# The cyclic collector's thresholds once a process serves: a young collection
# every 5,000 net allocations instead of 700. A coordinator allocates a few
# objects per stage result; at the default a busy job ran a young collection
# every few hundred microseconds and a full one that scanned every live object
# several times a second (benchmarks/control_plane.py: loop lag p99 85 -> 52 ms,
# durable results/s 12,600 -> 14,100).
SERVING_GC_THRESHOLDS = (5000, 20, 10)


def settle_heap() -> None:
    """Called once a process has loaded what it serves: what exists now (modules,
    models, settings) lives as long as the process, so the cyclic collector stops
    scanning it (gc.freeze; reference counting still frees it), and young
    collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


def _bind_problem(host: str, port: int) -> str | None:
    """Why a listening socket could not bind host:port now (SO_REUSEADDR, as servers set), or None."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return "the port is in use" if exc.errno == errno.EADDRINUSE else str(exc.strerror or exc)
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS from the certificate files of the auth settings, or None (plaintext).
    With a client CA, clients must present a certificate it signed (mutual TLS)."""
    auth = settings.auth
    if auth is None or auth.tls_cert is None or auth.tls_key is None:
        return None
    pair = (_read(auth.tls_key, "TLS key"), _read(auth.tls_cert, "TLS certificate"))
    client_ca = _read(auth.tls_client_ca, "TLS client CA") if auth.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


@dataclass
class ServiceHost:
    components: list[Component]
    settings: ServerSettings = field(default_factory=ServerSettings)
    port: int = 0
    _server: grpc.aio.Server | None = None
    _health: HealthServicer | None = None
    _loading: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds, starts serving (health NOT_SERVING) and starts loading backends.

        Returns the bound port.
        """
        size = self.settings.max_message_bytes
        server = grpc.aio.server(
            # The RPC limits live in an interceptor: grpc's maximum_concurrent_rpcs
            # would count health checks and idle streams with the calls.
            interceptors=server_interceptors(self.settings.max_concurrent_rpcs, self.settings.max_concurrent_streams, self.settings.auth),
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                # Without this a second server on a port in use shares it silently
                # (SO_REUSEPORT) instead of failing to start.
                ("grpc.so_reuseport", 0),
                *SERVER_KEEPALIVE_OPTIONS,
            ],
        )
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for component in self.components:
            component.register(server)
            await self._health.set(component.name, NOT_SERVING)
        await self._health.set("", NOT_SERVING)
        names = [c.name for c in self.components]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        problem = _bind_problem(self.settings.host, self.settings.port) if self.settings.port else None
        if problem:  # checked here as well as by grpc, which would first log its own multi-line error
            raise StartupError(f"cannot listen on {address}: {problem}")
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc says only "Failed to bind"; in use is by far the likeliest
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}: the port is in use or the address is not this host's")
        if self.settings.metrics_port is not None:
            try:
                metrics_port = start_metrics_endpoint(self.settings.metrics_port, self.settings.host)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port}: {exc.strerror or exc} "
                    "(choose another port with --metrics-port, or 0 to turn metrics off)"
                ) from None
            log.info("metrics endpoint", port=metrics_port, path="/metrics")
        await server.start()
        self._server = server
        auth = self.settings.auth
        log.info(
            "listening",
            services=names,
            host=self.settings.host,
            port=self.port,
            tls=credentials is not None,
            authentication="off" if auth is None or auth.insecure else "on",
        )
        self._loading = asyncio.create_task(self._load_components())
        return self.port

    async def _load_components(self) -> None:
        assert self._health is not None
        for component in self.components:
            await component.load()
            await self._health.set(component.name, SERVING)
            log.info("serving", service=component.name)
        await self._health.set("", SERVING)

    async def wait_ready(self) -> None:
        """Returns once every backend is loaded; raises what a failed load raised."""
        assert self._loading is not None, "start() first"
        await self._loading

    async def stop(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, refuse new calls, let in-flight calls finish
        within the grace period, then release the backends."""
        if self._server is None:
            return
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("stopping", grace_seconds=grace)
        assert self._health is not None
        await self._health.enter_graceful_shutdown()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self._server.stop(grace)
        self._server = None
        for component in self.components:
            await component.close()
        log.info("stopped")


async def run_until_signalled(hosts: list[ServiceHost]) -> None:
    """Serves every host until SIGTERM or SIGINT, then stops them all gracefully.

    One set of signal handlers for the whole process (`autodidact up` runs
    several hosts). A backend that fails to load stops the process with that
    error, so an orchestrator restarts it instead of it staying NOT_SERVING.
    """
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    started: list[ServiceHost] = []
    try:
        for host in hosts:
            await host.start()
            started.append(host)
    except BaseException:  # a port in use: stop the hosts already listening, then say why
        await asyncio.gather(*(host.stop(grace=0) for host in started))
        raise
    loaded = asyncio.ensure_future(asyncio.gather(*(host.wait_ready() for host in hosts)))
    signalled = asyncio.ensure_future(stop_requested.wait())
    first: set[asyncio.Future[Any]] = {loaded, signalled}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    failure = loaded.exception() if loaded.done() else None
    if failure is not None:
        signalled.cancel()
        await asyncio.gather(*(host.stop(grace=0) for host in hosts))
        raise failure
    if loaded.done():
        settle_heap()  # every backend is loaded
    await signalled
    loaded.cancel()  # still loading: stop() cancels the loads
    log.info("signal received")
    await asyncio.gather(*(host.stop() for host in hosts))
