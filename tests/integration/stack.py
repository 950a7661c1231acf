"""The whole stack in this process, over real gRPC on loopback, for integration tests."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.critic.service import CriticSettings
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import StackOptions, build_component
from autodidact.tool_executor.service import ToolExecutorSettings
from tests.conftest import MODEL

# Start order: the tool-executor asks the generator; the coordinator calls them all.
SERVICES = ("generator", "scorer", "tool-executor", "critic", "dedup")


@dataclass
class Stack:
    hosts: dict[str, ServiceHost]
    options: StackOptions

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.hosts[name].port}"

    async def stop(self) -> None:
        for host in reversed(list(self.hosts.values())):
            await host.stop(grace=0)


async def start_stack(data_dir: Path, names: tuple[str, ...] = ("generator", "dedup", "coordinator")) -> Stack:
    options = StackOptions(llamacpp=MODEL, embedder=LocalEmbedderSettings(threads=2), dedup_data_dir=data_dir / "dedup")
    stack = Stack({}, options)
    for name in SERVICES:
        if name not in names:
            continue
        generator = stack.target("generator") if "generator" in stack.hosts else ""
        scorer = stack.target("scorer") if "scorer" in stack.hosts else ""
        options = replace(
            options,
            tool_executor=ToolExecutorSettings(data_dir=data_dir / "tool-executor", generator_target=generator),
            critic=CriticSettings(generator_target=generator, scorer_target=scorer),
        )
        stack.hosts[name] = ServiceHost([build_component(name, options)], ServerSettings(grace_seconds=0))
        await stack.hosts[name].start()
        await stack.hosts[name].wait_ready()
    stack.options = options
    if "coordinator" in names:
        targets = {f"{n.replace('-', '_')}_target": stack.target(n) for n in SERVICES if n in stack.hosts}
        stack.options = replace(
            options, coordinator=CoordinatorSettings(data_dir=data_dir / "coordinator", patience_seconds=30, **targets)
        )
        stack.hosts["coordinator"] = ServiceHost([build_component("coordinator", stack.options)], ServerSettings(grace_seconds=0))
        await stack.hosts["coordinator"].start()
        await stack.hosts["coordinator"].wait_ready()
    return stack
