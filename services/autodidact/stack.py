"""Which services exist, where they listen by default, and how each is built.

`autodidact serve NAME` hosts one of them; `autodidact up` hosts every
implemented one in one process, each on its own loopback port, so a local
stack is addressed exactly like a cluster. Builders import their backends
only when called: a container image carries just what its service needs
(the coordinator image has no torch, FAISS or llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.backends.llm.llamacpp import LlamaCppSettings
from autodidact.backends.remote import RemoteSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.critic.service import CriticSettings
from autodidact.dedup.defaults import NamespaceSettings
from autodidact.generator.requests import GeneratorLimits
from autodidact.runtime.server import Component
from autodidact.tool_executor.service import ToolExecutorSettings

# Default ports of every service of the architecture (README "Ports").
DEFAULT_PORTS = {
    "coordinator": 50050,
    "generator": 50051,
    "scorer": 50052,
    "critic": 50053,
    "tool-executor": 50054,
    "dedup": 50055,
}
BASE_PORT = DEFAULT_PORTS["coordinator"]  # `up --base-port N` shifts them all by N - BASE_PORT
# Prometheus ports of `serve NAME`: one per service, so several share a host
# (the container images set AUTODIDACT_METRICS_PORT=9464 for every pod).
DEFAULT_METRICS_PORTS = {name: 9464 + port - BASE_PORT for name, port in DEFAULT_PORTS.items()}
LLM_BACKENDS = ("llamacpp", "tgi", "openai_compat")
EMBEDDERS = ("local", "tei")


@dataclass(frozen=True)
class StackOptions:
    """What the implemented services need to build their backends."""

    llm_backend: Literal["llamacpp", "tgi", "openai_compat"] = "llamacpp"
    llamacpp: LlamaCppSettings = LlamaCppSettings()
    # The server behind a tgi or openai_compat backend.
    llm_remote: RemoteSettings | None = None
    generator: GeneratorLimits = GeneratorLimits()
    embedder_backend: Literal["local", "tei"] = "local"
    embedder: LocalEmbedderSettings = LocalEmbedderSettings()
    # The server behind a tei embedder.
    embedder_remote: RemoteSettings | None = None
    namespaces: NamespaceSettings = NamespaceSettings()
    # The dedup service's namespaces live under dedup_data_dir/namespaces.
    dedup_data_dir: Path = Path(".autodidact/dedup")
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    tool_executor: ToolExecutorSettings = field(default_factory=ToolExecutorSettings)
    critic: CriticSettings = field(default_factory=CriticSettings)


def _remote(settings: RemoteSettings | None, flag: str) -> RemoteSettings:
    if settings is None or not settings.url:
        raise ValueError(f"this backend needs the server's address: {flag} URL")
    return settings


async def load_llm(options: StackOptions):  # noqa: ANN201  (-> LLM)
    if options.llm_backend == "tgi":
        from autodidact.backends.llm.tgi import TgiLLM

        return await TgiLLM.load(_remote(options.llm_remote, "--llm-url"))
    if options.llm_backend == "openai_compat":
        from autodidact.backends.llm.openai_compat import OpenAICompatLLM

        return await OpenAICompatLLM.load(_remote(options.llm_remote, "--llm-url"))
    from autodidact.backends.llm.llamacpp import LlamaCppLLM

    return await LlamaCppLLM.load(options.llamacpp)


async def load_embedder(options: StackOptions):  # noqa: ANN201  (-> Embedder)
    if options.embedder_backend == "tei":
        from autodidact.backends.embed.tei import TeiEmbedder

        return await TeiEmbedder.load(_remote(options.embedder_remote, "--embedder-url"))
    from autodidact.backends.embed.local import LocalEmbedder

    return await LocalEmbedder.load(options.embedder)


def _generator(options: StackOptions) -> Component:
    from autodidact.generator.service import generator_component

    if options.llm_backend != "llamacpp":
        _remote(options.llm_remote, "--llm-url")  # refuse at start, not at first load
    return generator_component(lambda: load_llm(options), options.generator)


def _scorer(options: StackOptions) -> Component:
    from autodidact.scorer.service import scorer_component

    if options.llm_backend != "llamacpp":
        _remote(options.llm_remote, "--llm-url")
    return scorer_component(lambda: load_llm(options))


def _tool_executor(options: StackOptions) -> Component:
    from autodidact.tool_executor.service import tool_executor_component

    return tool_executor_component(options.tool_executor)


def _critic(options: StackOptions) -> Component:
    from autodidact.critic.service import critic_component

    return critic_component(options.critic)


def _dedup(options: StackOptions) -> Component:
    from autodidact.dedup.service import dedup_component

    if options.embedder_backend != "local":
        _remote(options.embedder_remote, "--embedder-url")
    return dedup_component(lambda: load_embedder(options), options.dedup_data_dir, options.namespaces)


def _coordinator(options: StackOptions) -> Component:
    from autodidact.coordinator.service import coordinator_component

    return coordinator_component(options.coordinator)


# The services each recipe calls (the in-process runner starts just these).
RECIPE_SERVICES = {
    "self_instruct": ("generator", "dedup"),
    "toolformer": ("generator", "scorer", "tool-executor"),
    "constitutional": ("generator", "scorer", "critic"),
    "self_consistency": ("generator", "scorer"),
}

# In start order: the coordinator's jobs resume only once the services they call are up.
BUILDERS = {
    "generator": _generator,
    "scorer": _scorer,
    "tool-executor": _tool_executor,
    "critic": _critic,
    "dedup": _dedup,
    "coordinator": _coordinator,
}
IMPLEMENTED = tuple(BUILDERS)


def build_component(name: str, options: StackOptions) -> Component:
    if name not in BUILDERS:
        known = ", ".join(IMPLEMENTED)
        raise ValueError(f"no service named {name!r}; services: {known}")
    return BUILDERS[name](options)
