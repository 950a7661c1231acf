"""What every remote backend shares: settings, retries with backoff on
overload, and errors that name the backend, its address and what it said."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

from autodidact.errors import InvalidArgument, ResourceExhausted, Unavailable

log = structlog.get_logger("autodidact.backends")
T = TypeVar("T")

# Overloaded (TGI answers 429 when its queue is full), restarting, or a gateway in between.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RemoteSettings:
    # Base URL of the server, e.g. http://tgi:80 or http://vllm:8000.
    url: str
    # Model name sent in OpenAI-compatible requests and recorded in lineage;
    # empty: ask the server.
    model: str = ""
    # Per request.
    timeout_seconds: float = 300.0
    # Attempts for a retryable failure (overload, connection refused, timeout).
    max_attempts: int = 6
    initial_backoff_seconds: float = 0.5
    # Token context, when the server cannot tell (OpenAI-compatible servers).
    context_length: int = 4096


class Retryable(Exception):
    """A failure worth retrying after a pause; `overloaded` when the server said
    it is full (HTTP 429), not down."""

    def __init__(self, message: str, *, overloaded: bool = False) -> None:
        super().__init__(message)
        self.overloaded = overloaded


class Refused(Exception):
    """The server answered and refused the request (a 4xx other than 429)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


async def with_backoff(backend: str, settings: RemoteSettings, call: Callable[[], Awaitable[T]], field: str = "request") -> T:
    """Runs `call`, retrying Retryable failures with jittered exponential backoff.

    Maps what is left to domain errors: the server's refusal is the client's
    INVALID_ARGUMENT (naming `field`), exhaustion is UNAVAILABLE, or
    RESOURCE_EXHAUSTED when the server was full (429): the coordinator's
    adaptive limits read that as "fewer calls at once" (coordinator/concurrency.py).
    """
    delay = settings.initial_backoff_seconds
    for attempt in range(1, settings.max_attempts + 1):
        try:
            return await call()
        except Refused as exc:
            raise InvalidArgument(field, f"{backend} at {settings.url} refused it: {exc}") from exc
        except Retryable as exc:
            if attempt == settings.max_attempts:
                kind = ResourceExhausted if exc.overloaded else Unavailable
                raise kind(f"{backend} at {settings.url}: {exc} (after {attempt} attempts)") from exc
            pause = delay * (0.5 + random.random() / 2)
            log.warning("backend busy or down; retrying", backend=backend, url=settings.url, error=str(exc), retry_in=round(pause, 2))
            await asyncio.sleep(pause)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


async def _request(session: aiohttp.ClientSession, method: str, url: str, payload: dict[str, Any] | None, timeout: float) -> Any:
    """Sends one request and returns the decoded JSON answer; raises Retryable or Refused."""
    try:
        async with session.request(method, url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            body = await response.text()
            if response.status in RETRYABLE_STATUS:
                raise Retryable(f"HTTP {response.status}: {body[:300]}", overloaded=response.status == 429)
            if response.status >= 400:
                raise Refused(response.status, body[:500])
            return json.loads(body)
    except (TimeoutError, aiohttp.ClientConnectionError) as exc:
        raise Retryable(f"{type(exc).__name__}: {exc}") from exc


async def post_json(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], timeout: float) -> Any:
    return await _request(session, "POST", url, payload, timeout)


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float) -> Any:
    return await _request(session, "GET", url, None, timeout)
