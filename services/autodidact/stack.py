"""Which services exist, where they listen by default, and how each is built.

`autodidact serve NAME` hosts one of them; `autodidact up` hosts every
implemented one in one process, each on its own loopback port, so a local
stack is addressed exactly like a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autodidact.backends.embed.local import LocalEmbedder, LocalEmbedderSettings
from autodidact.backends.llm.llamacpp import LlamaCppLLM, LlamaCppSettings
from autodidact.coordinator.service import CoordinatorSettings, coordinator_component
from autodidact.dedup.namespaces import NamespaceSettings
from autodidact.dedup.service import dedup_component
from autodidact.generator.requests import GeneratorLimits
from autodidact.generator.service import generator_component
from autodidact.runtime.server import Component

# Default ports of every service of the architecture (README "Ports").
DEFAULT_PORTS = {
    "coordinator": 50050,
    "generator": 50051,
    "scorer": 50052,
    "critic": 50053,
    "tool-executor": 50054,
    "dedup": 50055,
}
DEFAULT_METRICS_PORT = 9464


@dataclass(frozen=True)
class StackOptions:
    """What the implemented services need to build their backends."""

    llamacpp: LlamaCppSettings = LlamaCppSettings()
    generator: GeneratorLimits = GeneratorLimits()
    embedder: LocalEmbedderSettings = LocalEmbedderSettings()
    namespaces: NamespaceSettings = NamespaceSettings()
    # The dedup service's namespaces live under dedup_data_dir/namespaces.
    dedup_data_dir: Path = Path(".autodidact/dedup")
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)


def _generator(options: StackOptions) -> Component:
    return generator_component(lambda: LlamaCppLLM.load(options.llamacpp), options.generator)


def _dedup(options: StackOptions) -> Component:
    return dedup_component(lambda: LocalEmbedder.load(options.embedder), options.dedup_data_dir, options.namespaces)


def _coordinator(options: StackOptions) -> Component:
    return coordinator_component(options.coordinator)


# In start order: the coordinator's jobs resume only once the services they call are up.
BUILDERS = {"generator": _generator, "dedup": _dedup, "coordinator": _coordinator}
IMPLEMENTED = tuple(BUILDERS)


def build_component(name: str, options: StackOptions) -> Component:
    if name not in BUILDERS:
        known = ", ".join(IMPLEMENTED)
        raise ValueError(f"service {name!r} is not implemented yet; implemented: {known}")
    return BUILDERS[name](options)
