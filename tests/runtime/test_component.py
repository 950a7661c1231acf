"""runtime/component.py: a servicer's resource, its "still loading" answer, and the host's health while it loads."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from autodidact.backends.llm import LLM
from autodidact.client import health_stub
from autodidact.critic.service import SERVICE_NAME as CRITIC
from autodidact.critic.service import CriticSettings, critic_component
from autodidact.errors import Unavailable
from autodidact.generator.service import SERVICE_NAME as GENERATOR
from autodidact.generator.service import generator_component
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.v1 import critic_pb2, critic_pb2_grpc, generator_pb2, generator_pb2_grpc


class Handle:
    """DOUBLE: a resource that records whether and how often it was closed."""

    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


async def test_get_answers_unavailable_naming_what_is_loading_until_loaded():
    handle = Handle()

    async def opener() -> Handle:
        return handle

    resource = Resource("the model", opener)
    with pytest.raises(Unavailable, match=r"^the model is still loading; retry shortly$"):
        resource.get()
    assert not resource.loaded
    await resource.load()
    assert resource.get() is handle and resource.loaded


async def test_after_open_runs_once_the_resource_is_published():
    seen: list[Handle] = []
    resource: Resource[Handle]

    async def opener() -> Handle:
        return Handle()

    async def after_open(handle: Handle) -> None:
        seen.append(resource.get())  # calls are answered while this runs (the coordinator resumes jobs here)
        assert seen[0] is handle

    resource = Resource("the coordinator", opener, after_open)
    await resource.load()
    assert seen == [resource.get()]


async def test_close_releases_once_and_loading_is_answered_again():
    handle = Handle()

    async def opener() -> Handle:
        return handle

    resource = Resource("the embedder", opener)
    await resource.close()  # never loaded: nothing to release
    await resource.load()
    await resource.close()
    await resource.close()
    assert handle.closed == 1
    with pytest.raises(Unavailable):
        resource.get()


async def test_a_failed_open_leaves_the_resource_unloaded():
    async def opener() -> Handle:
        raise OSError("disk full")

    resource = Resource("the job store", opener)
    with pytest.raises(OSError):
        await resource.load()
    with pytest.raises(Unavailable):
        resource.get()


async def test_component_registers_its_own_servicer():
    registered: list[tuple[object, object]] = []
    servicer, server = object(), object()

    async def opener() -> Handle:
        return Handle()

    component = Component("x.v1.X", servicer, lambda s, srv: registered.append((s, srv)), Resource("x", opener))
    component.register(server)  # type: ignore[arg-type]
    assert registered == [(servicer, server)]


async def health(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_stub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def test_a_host_answers_still_loading_and_not_serving_until_the_resource_loads():
    """A generator whose model never loads (no model is needed to see the answer before one exists)."""
    never = asyncio.Event()

    async def never_loads() -> LLM:
        await never.wait()
        raise AssertionError("unreachable")

    host = ServiceHost([generator_component(never_loads)], ServerSettings(grace_seconds=0))
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            assert await health(channel, GENERATOR) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generator_pb2_grpc.GeneratorServiceStub(channel).GetModelInfo(generator_pb2.GetModelInfoRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert raised.value.details() == "the model is still loading; retry shortly"
    finally:
        await host.stop(grace=0)


async def test_a_host_serves_once_the_resource_is_loaded(tmp_path):
    """The critic's resource is its channels: it loads at once, with no model."""
    host = ServiceHost([critic_component(CriticSettings(generator_target="", scorer_target=""))], ServerSettings(grace_seconds=0))
    await host.start()
    try:
        await host.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            assert await health(channel, CRITIC) == health_pb2.HealthCheckResponse.SERVING
            assert await health(channel, "") == health_pb2.HealthCheckResponse.SERVING
            listed = await critic_pb2_grpc.CriticServiceStub(channel).ListConstitutions(critic_pb2.ListConstitutionsRequest(), timeout=5)
        assert listed.constitutions
    finally:
        await host.stop(grace=0)
