"""The whole stack in this process, over real gRPC on loopback, for integration tests."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import StackOptions, build_component
from tests.conftest import MODEL


@dataclass
class Stack:
    hosts: dict[str, ServiceHost]
    options: StackOptions

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.hosts[name].port}"

    async def stop(self) -> None:
        for name in ("coordinator", "dedup", "generator"):
            if name in self.hosts:
                await self.hosts[name].stop(grace=0)


async def start_stack(data_dir: Path, names: tuple[str, ...] = ("generator", "dedup", "coordinator")) -> Stack:
    options = StackOptions(llamacpp=MODEL, embedder=LocalEmbedderSettings(threads=2), dedup_data_dir=data_dir / "dedup")
    stack = Stack({}, options)
    for name in ("generator", "dedup"):
        if name in names:
            stack.hosts[name] = ServiceHost([build_component(name, options)], ServerSettings(grace_seconds=0))
            await stack.hosts[name].start()
            await stack.hosts[name].wait_ready()
    if "coordinator" in names:
        stack.options = replace(
            options,
            coordinator=CoordinatorSettings(
                data_dir=data_dir / "coordinator", generator_target=stack.target("generator"), dedup_target=stack.target("dedup"),
                patience_seconds=30,
            ),
        )
        stack.hosts["coordinator"] = ServiceHost([build_component("coordinator", stack.options)], ServerSettings(grace_seconds=0))
        await stack.hosts["coordinator"].start()
        await stack.hosts["coordinator"].wait_ready()
    return stack
