"""Every backend of every port, as data.

A port (the LLM the generator and scorer use, the embedder dedup uses) has
backends by name. The CLI's choices and help, the start-up check that a
remote backend has its server's address, and the choice of what to load all
read these tables: adding a backend is one module under backends/ and one row
here (docs/extending.md, "Adding a backend").

An implementation is named, not imported: a container image carries only
the packages of the backends it runs (the TGI generator image has no
llama.cpp), so a backend's module is imported only when it is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from autodidact.backends.remote import RemoteSettings

if TYPE_CHECKING:
    from autodidact.backends.embed import Embedder
    from autodidact.backends.llm import LLM

T = TypeVar("T")


@dataclass(frozen=True)
class Backend:
    """One implementation of a port."""

    # "package.module:Class"; the class has `async classmethod load(settings)` returning the port's
    # type. An embedded backend gets the port's embedded settings, a remote one RemoteSettings.
    implementation: str
    summary: str  # one phrase for --help and the docs
    remote: bool = False  # built from a server's address, which the start refuses to go without

    def implementation_class(self) -> Any:
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Port(Generic[T]):
    """The backends of one port, and the flags that choose and address them."""

    flag: str  # chooses the backend, e.g. "--llm-backend"
    url_flag: str  # a remote backend's server, e.g. "--llm-url"
    default: str
    backends: Mapping[str, Backend]

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.backends)

    def help(self) -> str:
        return "; ".join(f"{name}: {backend.summary}" for name, backend in self.backends.items())

    def backend(self, name: str) -> Backend:
        if name not in self.backends:
            raise ValueError(f"{self.flag}: no backend named {name!r}; backends: {', '.join(self.backends)}")
        return self.backends[name]

    def check(self, name: str, remote: RemoteSettings | None) -> None:
        """Refuses, at start rather than at first load, a backend that cannot be built as configured."""
        if self.backend(name).remote and (remote is None or not remote.url):
            raise ValueError(f"this backend needs the server's address: {self.url_flag} URL")

    def loader(self, name: str, embedded: object, remote: RemoteSettings | None) -> Callable[[], Awaitable[T]]:
        """How to build backend `name` (from `remote` when it is a remote one, else from
        `embedded`), for a service to call when it loads; refuses a misconfigured one now."""
        self.check(name, remote)
        backend = self.backend(name)

        async def load() -> T:
            return cast(T, await backend.implementation_class().load(remote if backend.remote else embedded))

        return load


LLM_PORT: Port[LLM] = Port(
    flag="--llm-backend",
    url_flag="--llm-url",
    default="llamacpp",
    backends={
        "llamacpp": Backend("autodidact.backends.llm.llamacpp:LlamaCppLLM", "embedded llama.cpp (default)"),
        "tgi": Backend("autodidact.backends.llm.tgi:TgiLLM", "a text-generation-inference server", remote=True),
        "openai_compat": Backend(
            "autodidact.backends.llm.openai_compat:OpenAICompatLLM", "an OpenAI-compatible server (vLLM, SGLang)", remote=True
        ),
    },
)

EMBEDDER_PORT: Port[Embedder] = Port(
    flag="--embedder",
    url_flag="--embedder-url",
    default="local",
    backends={
        "local": Backend("autodidact.backends.embed.local:LocalEmbedder", "embedded MiniLM (default)"),
        "tei": Backend("autodidact.backends.embed.tei:TeiEmbedder", "a text-embeddings-inference server", remote=True),
    },
)
