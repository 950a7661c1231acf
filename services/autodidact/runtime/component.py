"""What a service host serves: a servicer and the resource it needs.

A servicer's resource (a model, an embedder and its namespaces, channels to
its neighbours, a job store) is built only after the port is bound, so health
can say NOT_SERVING meanwhile and an orchestrator sees the pod start. Every
servicer reaches it through `Resource.get()`, which answers UNAVAILABLE with
the one "still loading" message until it exists: no servicer writes its own guard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc

from autodidact.errors import Unavailable


class Closeable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T", bound=Closeable)


async def _nothing_more(_: Any) -> None:
    return None


class Resource(Generic[T]):
    """The thing a servicer needs, built by `load()` once the port is bound
    and released by `close()`.

    `opener` builds it. `after_open` runs once it is published and before
    health says SERVING: the coordinator resumes its jobs there, answering
    calls meanwhile; work that must finish before any call is answered (a
    model's warm-up) belongs in `opener` instead.
    """

    def __init__(
        self,
        what: str,
        opener: Callable[[], Awaitable[T]],
        after_open: Callable[[T], Awaitable[None]] = _nothing_more,
    ) -> None:
        self.what = what  # "the model": the subject of the "still loading" answer
        self._opener = opener
        self._after_open = after_open
        self._value: T | None = None

    def get(self) -> T:
        """The loaded resource; until then UNAVAILABLE, which clients retry."""
        if self._value is None:
            raise Unavailable(f"{self.what} is still loading; retry shortly")
        return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    async def load(self) -> None:
        self._value = await self._opener()
        await self._after_open(self._value)

    async def close(self) -> None:
        value, self._value = self._value, None
        if value is not None:
            await value.close()


@dataclass
class Component:
    """A service to host: its full proto name, its servicer, how to add the
    servicer to a server, and the resource the servicer reaches through
    `Resource.get()`."""

    name: str  # e.g. "autodidact.v1.GeneratorService"
    servicer: object
    add_servicer: Callable[[Any, grpc.aio.Server], None]  # the generated add_XServicer_to_server
    resource: Resource[Any]

    def register(self, server: grpc.aio.Server) -> None:
        self.add_servicer(self.servicer, server)

    async def load(self) -> None:
        await self.resource.load()

    async def close(self) -> None:
        await self.resource.close()
