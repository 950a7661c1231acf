"""Shared fixtures: real servers with the embedded model on port 0."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from autodidact.backends.llm.llamacpp import LlamaCppSettings
from autodidact.generator.requests import GeneratorLimits
from autodidact.runtime.channels import create_channel
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import StackOptions, build_component
from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc

# Small public data sets in the repository (examples/data/README.md: sources, licences).
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SEED_TASKS = EXAMPLE_DATA / "self_instruct_seed_tasks.jsonl"
GSM8K = EXAMPLE_DATA / "gsm8k_train_300.jsonl"
SVAMP = EXAMPLE_DATA / "svamp_300.json"

# Two threads: the machines this runs on have two cores.
MODEL = LlamaCppSettings(context_length=2048, threads=2)


def free_port() -> int:
    """A port nobody listens on right now (for servers started outside this process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def details_of(error: grpc.aio.AioRpcError) -> str:
    """A refused call's status message, "" when the server sent none: grpc types details() as optional,
    and assertions on its text should fail on a missing message, not raise TypeError."""
    return error.details() or ""


def text_request(text: str, **fields: Any) -> generator_pb2.GenerateRequest:
    sampling = fields.pop("sampling", common_pb2.SamplingParams(max_tokens=16))
    return generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=text), sampling=sampling, **fields)


StartHost = Callable[..., Awaitable[ServiceHost]]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the whole run (tests/postgres.py); each test takes a database of its own."""
    from tests.postgres import start_postgres

    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
async def start_generator() -> AsyncIterator[StartHost]:
    """Starts generator hosts on free ports; stops them after the test."""
    hosts: list[ServiceHost] = []

    async def start(**settings: Any) -> ServiceHost:
        options = StackOptions(
            llamacpp=settings.pop("llamacpp", MODEL), generator=GeneratorLimits(max_samples=settings.pop("max_samples", 64))
        )
        host = ServiceHost([build_component("generator", options)], ServerSettings(**{"grace_seconds": 1.0, **settings}))
        hosts.append(host)
        await host.start()
        await host.wait_ready()
        return host

    yield start
    for host in hosts:
        await host.stop(grace=0)


@pytest.fixture
async def generator_target(start_generator: StartHost) -> str:
    """host:port of a running generator with default settings."""
    host = await start_generator()
    return f"127.0.0.1:{host.port}"


@pytest.fixture
async def generator(generator_target: str) -> AsyncIterator[generator_pb2_grpc.GeneratorServiceStub]:
    """A stub connected to a running generator with default settings."""
    async with create_channel(generator_target, timeout_seconds=120) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)
