"""Traces: OpenTelemetry spans for every RPC, served and made, and for every job.

Off by default. `configure_tracing` installs an SDK TracerProvider exporting
over OTLP only when the standard variables ask for it (OTEL_TRACES_EXPORTER=otlp,
or an OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); until then `enabled()` is false,
the interceptors skip tracing altogether and no span object is ever made.

Spans are made through the OpenTelemetry API, by our own interceptors
(runtime/interceptors.py serves, runtime/channels.py calls): a SERVER span
per call served, child of the caller's span carried in the W3C `traceparent`
metadata; a CLIENT span per call made, whose context travels out next to
x-request-id. A coordinator's job runs in a span that continues the trace of
its SubmitJob (`job_span`), even after a restart.

The provider lives in this module rather than in OpenTelemetry's global, which
can be set once per process: tests install their own with `set_tracer_provider`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
import structlog
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = structlog.get_logger("autodidact.tracing")

INSTRUMENTATION = "autodidact"
REQUEST_ID_ATTRIBUTE = "autodidact.request_id"

# Per the semantic conventions, a server span is an error only for codes that
# mean the server failed; a refusal (NOT_FOUND, INVALID_ARGUMENT) is the
# caller's mistake, and the caller's CLIENT span records it as an error.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_provider: trace.TracerProvider | None = None
_tracer: trace.Tracer | None = None
# The tasks that end the spans of finished streaming calls (asyncio keeps only weak references to tasks).
_closing: set[asyncio.Task[None]] = set()


def set_tracer_provider(provider: trace.TracerProvider | None) -> trace.TracerProvider | None:
    """Makes `provider` the one every span of this process comes from (None: tracing off);
    returns the one before. `configure_tracing` calls it; tests call it with their own."""
    global _provider, _tracer
    previous = _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None
    return previous


def enabled() -> bool:
    return _tracer is not None


def _exporting(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for OTLP trace export."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    if exporters - {"otlp", "none"}:
        log.warning("only the otlp trace exporter is available; ignoring the others", OTEL_TRACES_EXPORTER=sorted(exporters))
    if exporters:
        return "otlp" in exporters
    # An endpoint alone is a clear enough request: OTEL_TRACES_EXPORTER is left unset by most deployments.
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str) -> trace.TracerProvider | None:
    """Installs a TracerProvider that batches spans to an OTLP collector (over gRPC)
    when the OTEL_* variables ask for it, and returns it; otherwise installs nothing
    and returns None. The exporter, the batching and the sampler read their own
    OTEL_* variables; OTEL_SERVICE_NAME, when set, names the service instead of
    `service_name`."""
    environ = os.environ
    if not _exporting(environ):
        return None
    # The SDK and the exporter (a gRPC client of their own) are imported only when used.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol != "grpc":
        log.warning("traces are exported over OTLP/gRPC only; ignoring the protocol asked for", protocol=protocol)
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; attributes given here would override them.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))  # flushes its spans at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    set_tracer_provider(provider)
    log.info("exporting traces", exporter="otlp", service=provider.resource.attributes.get(SERVICE_NAME))
    return provider


def _rpc_attributes(method: str) -> dict[str, Any]:
    """The attributes of a span of a call of `method`, "/package.Service/Method"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _set_status(span: Span, code: grpc.StatusCode, is_error: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if is_error:
        span.set_status(Status(StatusCode.ERROR, code.name))


@contextlib.contextmanager
def server_span(method: str, metadata: Mapping[str, str], request_id: str | None) -> Iterator[Callable[[grpc.StatusCode], None]]:
    """The SERVER span of a served call, current inside, child of the caller's span
    (from `metadata`, when it carries one). Yields `finish(code)`, which records the
    status the call ends with; the trace id joins the request id in the logs."""
    assert _tracer is not None, "enabled() first"
    attributes = _rpc_attributes(method)
    if request_id is not None:
        attributes[REQUEST_ID_ATTRIBUTE] = request_id
    parent = propagate.extract(metadata)
    # The status comes from `finish`: what escapes the handler is grpc's AbortError whatever the code.
    with _tracer.start_as_current_span(
        method.lstrip("/"), parent, SpanKind.SERVER, attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        with structlog.contextvars.bound_contextvars(trace_id=trace_id):
            yield lambda code: _set_status(span, code, code in SERVER_ERROR_CODES)


async def client_call(details: grpc.aio.ClientCallDetails, start: Callable[[grpc.aio.ClientCallDetails], Awaitable[Any]]) -> Any:
    """Makes a call (`start` with its details) inside a CLIENT span, child of the
    current one, whose context the call's metadata carry. The span ends when the
    call does, whether its caller awaits it, reads its stream, or drops it."""
    if _tracer is None:
        return await start(details)
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    span = _tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, trace.set_span_in_context(span))
    for key, value in carrier.items():
        metadata[key] = value
    traced = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)
    try:
        call = await start(traced)
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()
        raise
    call.add_done_callback(lambda done: _end_when_known(done, span))
    return call


def _end_when_known(call: grpc.aio.Call, span: Span) -> None:
    """A done callback: ends `span` with the status `call` ended with. grpc.aio gives
    the status only to a coroutine; for a finished call it answers without waiting."""

    async def end() -> None:
        try:
            code = await call.code()
            _set_status(span, code, code is not grpc.StatusCode.OK)
        finally:
            span.end()

    task = asyncio.get_running_loop().create_task(end())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


# The job value that keeps the context every run of a job continues (JobStore.put_value).
TRACE_KEY = "trace"


@contextlib.asynccontextmanager
async def job_span(
    job_id: str,
    tenant: str,
    stored: Callable[[], Awaitable[dict[str, Any] | None]],
    store: Callable[[dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[None]:
    """A run of a job inside a "job" span, current inside. The job's task outlives the
    SubmitJob call that launched it, and a coordinator restart resumes it from the
    store; so its first run keeps the context it started in, the SubmitJob span's
    (`store`), and every later run starts from that one (`stored`): one trace per job."""
    if _tracer is None:
        yield
        return
    try:
        carrier = await stored()
    except Exception:  # tracing never fails a job: the job's own first read of the store will say what is wrong
        log.warning("the job's trace context could not be read; this run starts a new trace", exc_info=True)
        carrier = {}
    first_run = carrier is None
    if carrier is None:
        carrier = {}
        propagate.inject(carrier)  # the span of the call that launched the task, current in it
    span = _tracer.start_span(
        "job", propagate.extract(carrier), SpanKind.INTERNAL, {"autodidact.job_id": job_id, "autodidact.tenant": tenant}
    )
    if first_run:
        if not carrier:  # launched outside any trace (say, submitted while tracing was off): this run starts the job's
            propagate.inject(carrier, trace.set_span_in_context(span))
        try:
            await store(carrier)
        except Exception:
            log.warning("the job's trace context could not be stored; a resumed run will start a new trace", exc_info=True)
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    with trace.use_span(span, end_on_exit=True), structlog.contextvars.bound_contextvars(trace_id=trace_id):
        yield
