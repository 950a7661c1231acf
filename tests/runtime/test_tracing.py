"""Traces: spans per call served and made, joined across services into one trace per job,
recorded with the SDK's in-memory exporter; and nothing at all unless the OTEL_* variables ask."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from autodidact import errors
from autodidact.client import health_stub
from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.runtime import tracing
from autodidact.runtime.channels import create_channel
from autodidact.runtime.health import HealthServicer
from autodidact.runtime.interceptors import REQUEST_ID_HEADER, server_interceptors
from autodidact.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import GSM8K, SEED_TASKS, free_port
from tests.stack import start_stack


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """Tracing on for this test only (the `spans` it records)."""
    provider = TracerProvider()
    previous = tracing.set_tracer_provider(provider)
    yield provider
    tracing.set_tracer_provider(previous)
    provider.shutdown()


@pytest.fixture
def spans(provider) -> InMemorySpanExporter:
    """Every span of the test, kept in memory as it ends."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def tracer(provider) -> trace.Tracer:
    """For the test's own spans: those of the callers."""
    return provider.get_tracer("tests")


# --- one call, served and made over a real socket ---

ECHO = "test.Echo"


def echo(channel: grpc.aio.Channel, method: str) -> Any:
    """A caller of one method of the Echo service, bytes in and out."""
    return channel.unary_unary(f"/{ECHO}/{method}")


class Echo:
    """A service of raw bytes: Say answers the x-request-id it received (or fails on b"missing"),
    Relay asks Say on the same server, Count streams two messages."""

    def __init__(self) -> None:
        self.target = ""

    async def say(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"missing":
            raise errors.NotFound("no such thing")
        return str(dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER, "")).encode()

    async def relay(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with create_channel(self.target, timeout_seconds=10) as channel:
            return await echo(channel, "Say")(request)

    async def count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"1"
        yield b"2"


@pytest.fixture
async def echo_target() -> AsyncIterator[str]:
    service = Echo()
    server = grpc.aio.server(interceptors=server_interceptors())
    handlers: dict[str, grpc.RpcMethodHandler] = {
        "Say": grpc.unary_unary_rpc_method_handler(service.say),
        "Relay": grpc.unary_unary_rpc_method_handler(service.relay),
        "Count": grpc.unary_stream_rpc_method_handler(service.count),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, handlers)])
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    service.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield service.target
    await server.stop(0)


async def ended(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The spans ended so far, once there are `count`: a call's CLIENT span ends just after the call."""
    for _ in range(100):
        if len(exporter.get_finished_spans()) >= count:
            break
        await asyncio.sleep(0.01)
    return list(exporter.get_finished_spans())


def by_kind(spans: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


async def test_a_call_is_a_client_span_and_a_server_span_of_one_trace(spans, echo_target):
    async with create_channel(echo_target, timeout_seconds=10) as channel:
        answer = await echo(channel, "Say")(b"hi", metadata=((REQUEST_ID_HEADER, "req-1"),))
    assert answer == b"req-1"  # the request id still arrives, next to the trace context
    finished = await ended(spans, 2)
    (client_span,), (server_span,) = by_kind(finished, SpanKind.CLIENT), by_kind(finished, SpanKind.SERVER)
    assert client_span.name == server_span.name == "test.Echo/Say"
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None and server_span.parent.span_id == client_span.context.span_id
    assert server_span.parent.is_remote
    assert server_span.attributes is not None
    assert dict(server_span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "test.Echo",
        "rpc.method": "Say",
        "rpc.grpc.status_code": 0,
        "autodidact.request_id": "req-1",
    }
    assert client_span.attributes is not None and client_span.attributes["rpc.grpc.status_code"] == 0
    assert client_span.status.status_code == server_span.status.status_code == StatusCode.UNSET


async def test_a_call_made_while_serving_one_is_a_child_of_its_server_span(spans, tracer, echo_target):
    async with create_channel(echo_target, timeout_seconds=10) as channel:
        with trace.use_span(tracer.start_span("caller")) as caller:
            answer = await echo(channel, "Relay")(b"hi", metadata=((REQUEST_ID_HEADER, "req-2"),))
        caller.end()
    assert answer == b"req-2"  # the request id rides along through the relay
    finished = await ended(spans, 5)
    parent_of = {span.context.span_id: span.parent.span_id if span.parent else None for span in finished}
    named = {(span.name, span.kind): span for span in finished}
    chain = [
        ("test.Echo/Say", SpanKind.SERVER),
        ("test.Echo/Say", SpanKind.CLIENT),
        ("test.Echo/Relay", SpanKind.SERVER),
        ("test.Echo/Relay", SpanKind.CLIENT),
        ("caller", SpanKind.INTERNAL),
    ]
    assert set(named) == set(chain) and len(finished) == 5
    for child, parent in itertools.pairwise(chain):
        assert parent_of[named[child].context.span_id] == named[parent].context.span_id, f"{child} is not a child of {parent}"
    assert {span.context.trace_id for span in finished} == {caller.get_span_context().trace_id}


async def test_a_refusal_is_an_error_of_the_caller_not_of_the_server(spans, echo_target):
    async with create_channel(echo_target, timeout_seconds=10) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo(channel, "Say")(b"missing")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finished = await ended(spans, 2)
    (client,), (server,) = by_kind(finished, SpanKind.CLIENT), by_kind(finished, SpanKind.SERVER)
    for span in (client, server):
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert client.status.status_code == StatusCode.ERROR
    assert server.status.status_code == StatusCode.UNSET  # NOT_FOUND is the caller's mistake (semantic conventions)


async def test_a_response_stream_is_one_span_each_side_ending_with_the_stream(spans, echo_target):
    async with create_channel(echo_target, timeout_seconds=10) as channel:
        count: Any = channel.unary_stream(f"/{ECHO}/Count")
        assert [message async for message in count(b"")] == [b"1", b"2"]
    finished = await ended(spans, 2)
    (client,), (server,) = by_kind(finished, SpanKind.CLIENT), by_kind(finished, SpanKind.SERVER)
    assert client.name == server.name == "test.Echo/Count"
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert client.end_time is not None and server.end_time is not None


async def test_health_checks_are_not_traced(spans, echo_target):
    async with create_channel(echo_target, timeout_seconds=10) as channel:
        await health_stub(channel).Check(health_pb2.HealthCheckRequest())
        await echo(channel, "Say")(b"hi")  # a traced call after it, so the check had time to end
    assert {span.name for span in await ended(spans, 2)} == {"test.Echo/Say"}


async def test_without_a_provider_calls_make_no_spans_and_carry_no_trace_context(echo_target):
    assert not tracing.enabled()
    metadata_seen: list[dict[str, str]] = []

    class Spy(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            metadata_seen.append(dict(details.invocation_metadata or ()))
            return await continuation(details)

    server = grpc.aio.server(interceptors=[Spy(), *server_interceptors()])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, {"Say": grpc.unary_unary_rpc_method_handler(Echo().say)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with create_channel(f"127.0.0.1:{port}", timeout_seconds=10) as channel:
            await echo(channel, "Say")(b"hi")
    finally:
        await server.stop(0)
    assert metadata_seen and "traceparent" not in metadata_seen[0]


# --- a job's runs ---


async def test_every_run_of_a_job_continues_the_trace_of_its_submission(spans, tracer):
    values: dict[str, dict[str, str]] = {}

    async def stored() -> dict[str, str] | None:
        return values.get("trace")

    async def store(carrier: dict[str, str]) -> None:
        values.setdefault("trace", carrier)

    with tracer.start_as_current_span("SubmitJob") as submit:
        async with tracing.job_span("j1", "t1", stored, store):
            pass
    async with tracing.job_span("j1", "t1", stored, store):  # resumed after a restart: no span is current
        pass
    first, resumed = (span for span in spans.get_finished_spans() if span.name == "job")
    for run in (first, resumed):
        assert run.context.trace_id == submit.get_span_context().trace_id
        assert run.parent is not None and run.parent.span_id == submit.get_span_context().span_id
        assert run.attributes is not None and run.attributes["autodidact.job_id"] == "j1"
    assert len(values) == 1 and "traceparent" in values["trace"]


async def test_a_job_submitted_outside_any_trace_starts_its_own_and_keeps_it(spans):
    values: dict[str, dict[str, str]] = {}

    async def stored() -> dict[str, str] | None:
        return values.get("trace")

    async def store(carrier: dict[str, str]) -> None:
        values.setdefault("trace", carrier)

    for _ in range(2):
        async with tracing.job_span("j1", "t1", stored, store):
            pass
    first, resumed = (span for span in spans.get_finished_spans() if span.name == "job")
    assert first.parent is None
    assert resumed.context.trace_id == first.context.trace_id
    assert resumed.parent is not None and resumed.parent.span_id == first.context.span_id


# --- off by default ---

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture
def environment(monkeypatch) -> Iterator[pytest.MonkeyPatch]:
    """No OTEL_* variable set; whatever configure_tracing installs is removed after the test."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    previous = tracing.set_tracer_provider(None)
    yield monkeypatch
    installed = tracing.set_tracer_provider(previous)
    if isinstance(installed, TracerProvider):
        installed.shutdown()


def test_nothing_is_installed_unless_the_variables_ask(environment):
    assert tracing.configure_tracing("autodidact-generator") is None
    assert not tracing.enabled()
    environment.setenv("OTEL_TRACES_EXPORTER", "none")
    environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert tracing.configure_tracing("autodidact-generator") is None
    environment.setenv("OTEL_TRACES_EXPORTER", "otlp")
    environment.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure_tracing("autodidact-generator") is None
    assert not tracing.enabled()


@pytest.mark.parametrize("variable", ["OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_otlp_export_is_installed_when_asked_with_no_collector_listening(environment, variable):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nobody listens: export happens later, in the background
    environment.setenv(variable, "otlp" if variable == "OTEL_TRACES_EXPORTER" else endpoint)
    provider = tracing.configure_tracing("autodidact-scorer")
    assert isinstance(provider, TracerProvider) and tracing.enabled()
    assert provider.resource.attributes["service.name"] == "autodidact-scorer"


def test_otel_service_name_names_the_service(environment):
    environment.setenv("OTEL_TRACES_EXPORTER", "otlp")
    environment.setenv("OTEL_SERVICE_NAME", "scorer-eu-1")
    provider = tracing.configure_tracing("autodidact-scorer")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "scorer-eu-1"


# --- one job through the whole stack ---


def tiny_jobs() -> dict[str, coordinator_pb2.JobSpec]:
    """The smallest jobs that call every service but the critic: toolformer asks the
    tool-executor, the scorer and the generator; self-instruct the generator and dedup."""
    line = json.loads(GSM8K.read_text().splitlines()[0])
    text = gsm8k_document(line["question"], line["answer"])[0]
    return {
        "tf": coordinator_pb2.JobSpec(
            toolformer=coordinator_pb2.ToolformerSpec(
                documents_path="inline:docs", tools=["Calculator"], positions_per_document=1, calls_per_position=1
            ),
            inline_inputs={"docs": json.dumps({"id": "d0", "text": text}) + "\n"},
            seed=3,
        ),
        "si": coordinator_pb2.JobSpec(
            self_instruct=coordinator_pb2.SelfInstructSpec(
                seed_tasks_path=str(SEED_TASKS),
                target_instructions=1,
                max_rounds=2,
                instruction_sampling=common_pb2.SamplingParams(max_tokens=64),
                instance_sampling=common_pb2.SamplingParams(max_tokens=32),
            ),
            seed=3,
            max_in_flight=1,
        ),
    }


SERVICES_OF_JOB = {
    "tf": {"autodidact.v1.GeneratorService", "autodidact.v1.ScorerService", "autodidact.v1.ToolExecutorService"},
    "si": {"autodidact.v1.GeneratorService", "autodidact.v1.DedupService"},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_each_jobs_spans_form_one_trace_from_the_coordinator_to_every_service_it_calls(spans, tmp_path):
    stack = await start_stack(tmp_path, ("generator", "scorer", "tool-executor", "dedup", "coordinator"), (str(SEED_TASKS.parent),))
    try:
        async with create_channel(stack.target("coordinator"), timeout_seconds=600) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            for job_id, spec in tiny_jobs().items():
                request = coordinator_pb2.SubmitJobRequest(job_id=job_id, spec=spec)
                await stub.SubmitJob(request, metadata=((REQUEST_ID_HEADER, f"submit-{job_id}"),))
            for job_id in SERVICES_OF_JOB:
                async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=600):
                    last = event.job
                assert last.state == coordinator_pb2.JOB_STATE_SUCCEEDED, last.error
    finally:
        await stack.stop()
    finished = list(spans.get_finished_spans())
    by_id = {span.context.span_id: span for span in finished}

    def ancestors(span: ReadableSpan) -> Iterator[ReadableSpan]:
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            yield span

    for job_id, services in SERVICES_OF_JOB.items():
        (job,) = [s for s in finished if s.name == "job" and s.attributes and s.attributes["autodidact.job_id"] == job_id]
        in_trace = [s for s in finished if s.context.trace_id == job.context.trace_id]
        # The test's SubmitJob call is the trace's root; the coordinator's SubmitJob span the job's parent.
        lineage = [(s.name, s.kind) for s in ancestors(job)]
        assert lineage == [
            ("autodidact.v1.CoordinatorService/SubmitJob", SpanKind.SERVER),
            ("autodidact.v1.CoordinatorService/SubmitJob", SpanKind.CLIENT),
        ]
        served = [s for s in in_trace if s.kind == SpanKind.SERVER and job in ancestors(s)]
        assert {s.attributes["rpc.service"] for s in served if s.attributes} == services, job_id
        # The job's calls carry the request id of the call that submitted it.
        assert {s.attributes.get("autodidact.request_id") for s in served if s.attributes} == {f"submit-{job_id}"}
        assert all(s.context.trace_id == job.context.trace_id for s in served)
    assert len({s.context.trace_id for s in finished if s.name == "job"}) == 2  # one trace per job
