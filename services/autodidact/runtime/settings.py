"""Transport settings shared by servers and the channels that call them."""

from __future__ import annotations

from dataclasses import dataclass

from autodidact.runtime.auth import AuthSettings

MIB = 1024 * 1024

# Keepalive must agree on both sides: a client that pings more often than the
# server permits gets GOAWAY (too_many_pings). Clients ping every 30 s on idle
# connections; servers accept pings down to every 10 s.
CLIENT_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


@dataclass(frozen=True)
class ServerSettings:
    # Address to bind; "0.0.0.0" in containers, "127.0.0.1" for local use.
    host: str = "127.0.0.1"
    # Port to bind; 0 picks a free one (tests).
    port: int = 0
    # Largest request or response message, in bytes. Larger ones are refused
    # with RESOURCE_EXHAUSTED before any handler runs.
    max_message_bytes: int = 8 * MIB
    # Unary calls in progress at once; one more is answered RESOURCE_EXHAUSTED
    # at once instead of queueing. Health checks and reflection never count.
    max_concurrent_rpcs: int = 32
    # Response streams in progress at once (WatchJob, StreamSamples, health
    # Watch), counted apart from the calls so idle watchers cannot starve them.
    max_concurrent_streams: int = 64
    # Seconds in-flight RPCs may take to finish after SIGTERM.
    grace_seconds: float = 30.0
    # Prometheus /metrics port; None disables the endpoint.
    metrics_port: int | None = None
    # Who may call, and TLS. None: no authentication interceptor at all, every
    # call ANONYMOUS. That is the library default because in-process hosts
    # (tests, `run`'s stack when it sets none) bind loopback ports only this
    # process uses; the `serve` command is what refuses to start without an
    # auth configuration or an explicit --insecure.
    auth: AuthSettings | None = None
