"""`autodidact serve` as a real process: SIGTERM handling and the CLI client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autodidact.client import wait_until_serving
from autodidact.v1 import common_pb2, generator_pb2_grpc
from tests.conftest import free_port, text_request

pytestmark = pytest.mark.slow

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")


def start_server(port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [AUTODIDACT, "serve", "generator", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
         "--threads", "2", "--log-format", "json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    process = start_server(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_sigterm_lets_the_call_in_flight_finish_flips_health_and_exits_within_grace():
    port = free_port()
    grace = 20.0
    process = start_server(port, "--grace", str(grace))
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            await wait_until_serving(channel, timeout=60)
            statuses: list[int] = []

            async def watch_health() -> None:
                stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                try:
                    async for reply in stream:
                        statuses.append(reply.status)
                except grpc.aio.AioRpcError:
                    pass  # the server closes the stream when it stops

            watcher = asyncio.create_task(watch_health())
            # Greedy counting never emits end-of-turn: ~5 s of generation on two cores.
            long_call = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(
                text_request("1, 2, 3, 4, 5, 6, 7, 8,", seed=1, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=600)),
                timeout=120,
            )
            generation = asyncio.ensure_future(long_call)
            await asyncio.sleep(1.5)
            assert not generation.done(), "the call ended before SIGTERM; the test proves nothing"
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            await asyncio.sleep(0.5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("new call", seed=1), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            response = await generation
            finished = time.monotonic()
            assert response.samples[0].completion_tokens == 600
            assert finished > signalled + 0.5
            await asyncio.wait_for(watcher, timeout=5)  # Watch streams end on shutdown

        exit_code = await asyncio.to_thread(process.wait, grace)
        exited = time.monotonic()
        assert exit_code == 0, process.stdout.read() if process.stdout else ""
        assert exited - signalled < grace
        assert exited - finished < 5, "the process waited for something other than the call in flight"
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses[1:], statuses
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTODIDACT, *args], capture_output=True, text=True, timeout=180, env={**os.environ, "AUTODIDACT_LOG_FORMAT": "json"})


def test_cli_generate_prints_samples_from_a_running_generator(server):
    result = cli("generate", "--target", server, "--wait", "60", "-n", "2", "--seed", "3", "--max-tokens", "12", "Tell me about the sea.")
    assert result.returncode == 0, result.stderr
    assert "--- sample seed=3" in result.stdout and "--- sample seed=4" in result.stdout
    assert "SmolLM2-135M-Instruct" in result.stdout


def test_cli_generate_reports_refusals_clearly(server):
    result = cli("generate", "--target", server, "--wait", "60", "--temperature", "-1", "hello")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: sampling.temperature: must be between 0 and 2, got -1" in result.stderr


@pytest.mark.parametrize(
    ("constitution", "message"),
    [
        ("name: empty\nversion: '1'\npreference_question: Which?\n", "principles: must have at least 1 item"),
        ("name: half\nversion: '1'\npreference_question: Which?\nprinciples:\n  - name: harm\n    critique_request: Say what is harmful.\n",
         "principles[0].revision_request: must not be empty"),
    ],
)
def test_the_critic_refuses_to_start_with_a_bad_constitution(tmp_path, constitution, message):
    (tmp_path / "bad.yaml").write_text(constitution)
    result = cli("serve", "critic", "--port", str(free_port()), "--metrics-port", "0", "--constitutions-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}: {message}" in result.stderr


def test_logs_are_json_off_a_terminal_and_carry_the_request_id():
    import json

    port = free_port()
    # No --log-format: "auto" must choose JSON because stdout/stderr are pipes here.
    process = subprocess.Popen(
        [AUTODIDACT, "serve", "generator", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={k: v for k, v in os.environ.items() if not k.startswith("AUTODIDACT_")},
    )
    try:
        refused = cli("generate", "--target", f"127.0.0.1:{port}", "--wait", "60", "--top-p", "0", "hello")
        assert refused.returncode == 1
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert {"listening", "serving", "stopped"} <= {line["event"] for line in lines}
    refusal = next(line for line in lines if line["event"] == "rpc refused")
    assert refusal["code"] == "INVALID_ARGUMENT" and refusal["reason"].startswith("sampling.top_p")
    assert len(refusal["request_id"]) == 32 and refusal["method"] == "/autodidact.v1.GeneratorService/Generate"
