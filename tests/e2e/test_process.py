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
from grpc_health.v1 import health_pb2

from autodidact.client import health_stub, wait_until_serving
from autodidact.v1 import common_pb2, generator_pb2_grpc
from tests.conftest import free_port, text_request

pytestmark = pytest.mark.slow

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")


def start_server(port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            AUTODIDACT,
            "serve",
            "generator",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--threads",
            "2",
            "--log-format",
            "json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
                stream = health_stub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
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
    return subprocess.run(
        [AUTODIDACT, *args], capture_output=True, text=True, timeout=180, env={**os.environ, "AUTODIDACT_LOG_FORMAT": "json"}
    )


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
        (
            "name: half\nversion: '1'\npreference_question: Which?\n"
            "principles:\n  - name: harm\n    critique_request: Say what is harmful.\n",
            "principles[0].revision_request: must not be empty",
        ),
    ],
)
def test_the_critic_refuses_to_start_with_a_bad_constitution(tmp_path, constitution, message):
    (tmp_path / "bad.yaml").write_text(constitution)
    result = cli("serve", "critic", "--insecure", "--port", str(free_port()), "--metrics-port", "0", "--constitutions-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}: {message}" in result.stderr


def test_logs_are_json_off_a_terminal_and_carry_the_request_id():
    import json

    port = free_port()
    # No --log-format: "auto" must choose JSON because stdout/stderr are pipes here.
    process = subprocess.Popen(
        [
            AUTODIDACT,
            "serve",
            "generator",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--threads",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AUTODIDACT_")},
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


# --- local ergonomics: ports, dead addresses, damaged stores ---


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AUTODIDACT_")} | {"AUTODIDACT_LOG_FORMAT": "json"}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_port_in_use_is_one_line_and_exit_2():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port = cli("serve", "critic", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0")
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(grpc_port)
        metrics = cli("serve", "critic", "--insecure", "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", str(port))
        assert f"cannot serve metrics on 127.0.0.1:{port}" in one_line_error(metrics)


def test_two_services_on_one_host_each_serve_metrics_on_their_own_default_port():
    import urllib.request

    from autodidact.stack import DEFAULT_METRICS_PORTS

    names = ("critic", "tool-executor")
    ports = {name: free_port() for name in names}
    processes = [
        subprocess.Popen(
            [AUTODIDACT, "serve", name, "--insecure", "--host", "127.0.0.1", "--port", str(ports[name])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for name in names
    ]
    try:
        for name in names:

            async def serving(target: str = f"127.0.0.1:{ports[name]}") -> None:
                async with grpc.aio.insecure_channel(target) as channel:
                    await wait_until_serving(channel, timeout=60)

            asyncio.run(serving())
            url = f"http://127.0.0.1:{DEFAULT_METRICS_PORTS[name]}/metrics"
            assert "autodidact_rpc_requests_total" in urllib.request.urlopen(url, timeout=5).read().decode()
        assert [p.poll() for p in processes] == [None, None]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def test_up_takes_a_base_port():
    base = free_port()
    while base > 65_000:
        base = free_port()
    process = subprocess.Popen(
        [AUTODIDACT, "up", "--base-port", str(base), "--metrics-port", "0", "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )

    async def every_port_answers_health() -> None:
        for offset in range(6):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{base + offset}") as channel:
                await health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)

    try:
        asyncio.run(every_port_answers_health())
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_run_against_a_dead_coordinator_says_so_within_10_seconds(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("self_instruct:\n  seed_tasks_path: seeds.jsonl\n  target_instructions: 2\n", encoding="utf-8")
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}\n')
    started = time.monotonic()
    dead = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [AUTODIDACT, "run", str(recipe), "--coordinator", dead], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert time.monotonic() - started < 10  # was 120 s of silence, then a traceback
    assert f"no coordinator at {dead}" in one_line_error(result)


def test_a_damaged_job_store_stops_the_coordinator_with_one_line(tmp_path):
    store = tmp_path / "coordinator" / "jobs.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"not a database" * 500)
    result = cli(
        "serve",
        "coordinator",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--data-dir",
        str(tmp_path),
    )
    assert f"the job store {store} is damaged" in one_line_error(result)
