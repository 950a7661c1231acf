"""The whole stack in this process, over real gRPC on loopback, for integration tests.

Wired by autodidact.stack.LocalStack, exactly as `autodidact up` and `autodidact run` wire theirs.
"""

from __future__ import annotations

from pathlib import Path

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import LocalStack, StackOptions
from tests.conftest import MODEL

Stack = LocalStack


async def start_stack(data_dir: Path, names: tuple[str, ...] = ("generator", "dedup", "coordinator")) -> LocalStack:
    """Starts `names` (in start order, each loaded before the next) with the test model; a job
    waits out a service that is down for 30 s, not 10 minutes."""
    options = StackOptions(
        llamacpp=MODEL, embedder=LocalEmbedderSettings(threads=2), coordinator=CoordinatorSettings(patience_seconds=30)
    ).under(data_dir)
    stack = LocalStack(options)
    await stack.start(names, ServerSettings(grace_seconds=0), wait_each=True)
    return stack
