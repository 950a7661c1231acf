"""Which services exist, who calls whom, where they listen by default, and how each is built.

This is the one statement of the service graph. `autodidact serve NAME`
hosts one service; `autodidact up` hosts every implemented one in one
process, each on its own loopback port, so a local stack is addressed exactly
like a cluster; `autodidact run` and the integration tests host the few a
recipe needs. All of them wire the services through `wired` and `LocalStack`
here. Builders import their backends only when called: a container image
carries just what its service needs (the coordinator image has no torch,
FAISS or llama.cpp).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.backends.llm.llamacpp import LlamaCppSettings
from autodidact.backends.registry import EMBEDDER_PORT, LLM_PORT
from autodidact.backends.remote import RemoteSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.critic.service import CriticSettings
from autodidact.dedup.defaults import NamespaceSettings
from autodidact.dedup.routing import Shard
from autodidact.generator.requests import GeneratorLimits
from autodidact.runtime.component import Component
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.tool_executor.service import ToolExecutorSettings

if TYPE_CHECKING:
    pass

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
LOOPBACK = "127.0.0.1"

# Who calls whom. A service starts after the ones it calls, and its settings
# name each of them as `<neighbour>_target` (e.g. CriticSettings.scorer_target).
CALLS: dict[str, tuple[str, ...]] = {
    "generator": (),
    "scorer": (),
    "tool-executor": ("generator",),  # QA and translation ask the generator
    "critic": ("generator", "scorer"),
    "dedup": (),
    "coordinator": ("generator", "dedup", "scorer", "tool-executor", "critic"),
}


def shifted_ports(base_port: int) -> dict[str, int]:
    """Every service's port when the coordinator's is `base_port` (`up --base-port`), in the README's order."""
    if not 1 <= base_port <= 65535 - (len(DEFAULT_PORTS) - 1):
        raise ValueError(f"--base-port must be between 1 and {65535 - (len(DEFAULT_PORTS) - 1):,}, got {base_port}")
    return {name: base_port + port - BASE_PORT for name, port in DEFAULT_PORTS.items()}


@dataclass(frozen=True)
class StackOptions:
    """What the implemented services need to build their backends."""

    llm_backend: str = LLM_PORT.default  # a name in backends/registry.py
    llamacpp: LlamaCppSettings = field(default_factory=LlamaCppSettings)
    # The server behind a tgi or openai_compat backend.
    llm_remote: RemoteSettings | None = None
    generator: GeneratorLimits = field(default_factory=GeneratorLimits)
    embedder_backend: str = EMBEDDER_PORT.default
    embedder: LocalEmbedderSettings = field(default_factory=LocalEmbedderSettings)
    # The server behind a tei embedder.
    embedder_remote: RemoteSettings | None = None
    namespaces: NamespaceSettings = field(default_factory=NamespaceSettings)
    # The dedup service's namespaces live under dedup_data_dir/tenants/<tenant>/namespaces.
    dedup_data_dir: Path = Path(".autodidact/dedup")
    # This dedup server's place among the shards (dedup/routing.py); None: it serves every namespace.
    dedup_shard: Shard | None = None
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    tool_executor: ToolExecutorSettings = field(default_factory=ToolExecutorSettings)
    critic: CriticSettings = field(default_factory=CriticSettings)

    def under(self, data_dir: Path) -> StackOptions:
        """These options with every service's files in its own folder of `data_dir`."""
        return replace(
            self,
            dedup_data_dir=data_dir / "dedup",
            coordinator=replace(self.coordinator, data_dir=data_dir / "coordinator"),
            tool_executor=replace(self.tool_executor, data_dir=data_dir / "tool-executor"),
        )


def _settings_field(service: str) -> str:
    return service.replace("-", "_")


def wired(options: StackOptions, targets: Mapping[str, str]) -> StackOptions:
    """These options with every service pointed at its neighbours (CALLS) at `targets`
    (service name -> host:port). A neighbour absent from `targets` keeps its configured
    address: a local stack starts what its recipe calls, and grpc logs an error for
    every channel to an empty address, so absent ones are not blanked."""
    changes = {}
    for service, neighbours in CALLS.items():
        if neighbours:
            settings = getattr(options, _settings_field(service))
            addresses = {
                f"{_settings_field(n)}_target": targets.get(n, getattr(settings, f"{_settings_field(n)}_target")) for n in neighbours
            }
            changes[_settings_field(service)] = replace(settings, **addresses)
    return replace(options, **changes)


def _generator(options: StackOptions) -> Component:
    from autodidact.generator.service import generator_component

    return generator_component(LLM_PORT.loader(options.llm_backend, options.llamacpp, options.llm_remote), options.generator)


def _scorer(options: StackOptions) -> Component:
    from autodidact.scorer.service import scorer_component

    return scorer_component(LLM_PORT.loader(options.llm_backend, options.llamacpp, options.llm_remote))


def _tool_executor(options: StackOptions) -> Component:
    from autodidact.tool_executor.service import tool_executor_component

    return tool_executor_component(options.tool_executor)


def _critic(options: StackOptions) -> Component:
    from autodidact.critic.service import critic_component

    return critic_component(options.critic)


def _dedup(options: StackOptions) -> Component:
    from autodidact.dedup.service import dedup_component

    load_embedder = EMBEDDER_PORT.loader(options.embedder_backend, options.embedder, options.embedder_remote)
    return dedup_component(load_embedder, options.dedup_data_dir, options.namespaces, options.dedup_shard)


def _coordinator(options: StackOptions) -> Component:
    from autodidact.coordinator.service import coordinator_component

    return coordinator_component(options.coordinator)


def services_for(recipe_name: str) -> list[str]:
    """The services a job of `recipe_name` needs running (what the in-process runner
    starts): those the recipe declares (Recipe.services), and whatever they call (CALLS).
    An unknown recipe needs none; the coordinator then refuses it by name."""
    from autodidact.coordinator.recipes.registry import RECIPES  # the recipes: only the runner asks

    recipe = RECIPES.get(recipe_name)
    wanted = [service.replace("_", "-") for service in recipe.services] if recipe is not None else []
    needed: set[str] = set()
    while wanted:
        service = wanted.pop()
        if service not in needed:
            needed.add(service)
            wanted.extend(CALLS[service])
    return start_order(needed)


# In start order, each after the services it calls (CALLS): the coordinator's jobs resume only once those are up.
BUILDERS = {
    "generator": _generator,
    "scorer": _scorer,
    "tool-executor": _tool_executor,
    "critic": _critic,
    "dedup": _dedup,
    "coordinator": _coordinator,
}
IMPLEMENTED = tuple(BUILDERS)


def _check_service(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(f"no service named {name!r}; services: {', '.join(IMPLEMENTED)}")


def build_component(name: str, options: StackOptions) -> Component:
    _check_service(name)
    return BUILDERS[name](options)


def start_order(names: Iterable[str]) -> list[str]:
    """`names` in the order they start: each after the services it calls."""
    wanted = set(names)
    for name in wanted:
        _check_service(name)
    return [name for name in BUILDERS if name in wanted]


@dataclass
class LocalStack:
    """Services hosted in this process, each on its own loopback port, each wired to
    the services of the stack it calls: what `autodidact up` and `autodidact run` serve
    and what the integration tests start."""

    options: StackOptions
    hosts: dict[str, ServiceHost] = field(default_factory=dict)

    def target(self, name: str) -> str:
        """Where service `name` of this stack listens: its bound port, else the port it will bind."""
        host = self.hosts[name]
        return f"{LOOPBACK}:{host.port or host.settings.port}"

    def add(self, name: str, settings: ServerSettings) -> ServiceHost:
        """Builds service `name` wired to the services added before it. A service on port 0
        learns its port when started: start it before adding the services that call it."""
        options = wired(self.options, {added: self.target(added) for added in self.hosts})
        self.hosts[name] = ServiceHost([build_component(name, options)], settings)
        return self.hosts[name]

    async def start(self, names: Iterable[str], settings: ServerSettings, wait_each: bool = False) -> None:
        """Adds and starts `names` in start order; `wait_each`: each one's backend is loaded before the next starts."""
        for name in start_order(names):
            host = self.add(name, settings)
            await host.start()
            if wait_each:
                await host.wait_ready()

    async def wait_ready(self) -> None:
        for host in self.hosts.values():
            await host.wait_ready()

    async def stop(self, grace: float | None = None) -> None:
        """Stops every service, callers first; `grace` None: each host's own."""
        for host in reversed(list(self.hosts.values())):
            await host.stop(grace)
