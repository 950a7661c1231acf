"""Server interceptors: request ids, traces (runtime/tracing.py makes the
spans), metrics, authentication (runtime/auth.py does the checking), and the
one place where domain errors become status codes.

A grpc.aio interceptor sees only the method name before the call. To act
around the call itself, each interceptor supplies an async context manager
that `_wrap_handler` enters around the handler's behaviour, for all four kinds
of RPC; for streaming responses it spans the whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from autodidact import errors
from autodidact.runtime import tracing
from autodidact.runtime.auth import AuditScope, Authenticator, AuthSettings, audit_request, audited, required_role, write_audit_line
from autodidact.runtime.metrics import RPC_LATENCY, RPC_REQUESTS
from autodidact.runtime.principal import NOBODY, Principal, acting_as
from autodidact.validation import shorten

REQUEST_ID_HEADER = "x-request-id"

log = structlog.get_logger("autodidact.rpc")

# Each kind of domain error maps to exactly one status code.
STATUS_OF_ERROR: dict[type[errors.AutodidactError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# Status messages are cut to this length: gRPC carries them in trailing
# metadata, whose limit (8 KiB by default) a longer one would break, turning a
# clear refusal into a transport error.
MAX_STATUS_CHARS = 1024

# Always answered, never counted against the RPC limits: a busy service must
# still say it is alive (Kubernetes restarts one whose probes fail).
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Around = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]


def _wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around, on_request: Callable[[Any], None] | None = None) -> Any:
    """Returns a handler whose behaviour runs inside `around(context)`;
    `on_request` sees a single (not streamed) request there, before the handler."""
    if handler is None:
        return None
    # grpc-stubs types a handler's behaviours for the sync server (a grpc.ServicerContext, iterators); under grpc.aio
    # they take an aio context and are coroutine or async-generator functions, so they are held as plain callables.
    unary: Callable[..., Any] | None = handler.unary_unary or handler.stream_unary
    if unary is not None:

        async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                if on_request is not None and handler.unary_unary:
                    on_request(request)
                return await unary(request, context)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_behaviour, handler.request_deserializer, handler.response_serializer)

    streaming: Callable[..., Any] | None = handler.unary_stream or handler.stream_stream
    assert streaming is not None, "a handler has one behaviour of the four kinds"

    async def streaming_behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with around(context):
            if on_request is not None and handler.unary_stream:
                on_request(request)
            responses = streaming(request, context)
            if inspect.isasyncgen(responses):
                async for response in responses:
                    yield response
            else:
                # A write-style handler (the health service's Watch): it sends
                # through context.write() and returns nothing.
                await responses

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(streaming_behaviour, handler.request_deserializer, handler.response_serializer)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id (the client's x-request-id, or a new one) and the
    method into structlog's context for the call, and returns the id in the
    trailing metadata so clients can quote it."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        incoming = dict(details.invocation_metadata or ())
        request_id = str(incoming.get(REQUEST_ID_HEADER) or uuid.uuid4().hex)[:128]

        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            with structlog.contextvars.bound_contextvars(request_id=request_id, method=details.method):
                yield

        return _wrap_handler(await continuation(details), around)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around each call, child of the caller's span, naming the
    request id and ending with the call's status code. Health checks and
    reflection are not traced (probes would fill the traces); nothing at all
    is done while tracing is off."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not tracing.enabled() or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        # Binary ("-bin") metadata carry bytes; the trace context is text.
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}

        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            request_id = structlog.contextvars.get_contextvars().get("request_id")
            with tracing.server_span(details.method, metadata, request_id) as finish:
                failure: BaseException | None = None
                try:
                    yield
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    finish(_code_of(failure, context))

        return _wrap_handler(handler, around)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            started = time.perf_counter()
            failed = False
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                RPC_REQUESTS.labels(details.method, code.name).inc()
                RPC_LATENCY.labels(details.method).observe(time.perf_counter() - started)

        return _wrap_handler(await continuation(details), around)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes; anything unexpected becomes INTERNAL
    naming the request id, and its traceback goes to the log, not the client."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            except errors.AutodidactError as exc:
                code = STATUS_OF_ERROR.get(type(exc), grpc.StatusCode.INTERNAL)
                message = shorten(str(exc), MAX_STATUS_CHARS)
                log.info("rpc refused", code=code.name, reason=message)
                await context.abort(code, message)
            except grpc.aio.AbortError:
                raise  # the servicer already chose a status
            except Exception:
                log.exception("rpc failed")
                request_id = structlog.contextvars.get_contextvars().get("request_id", "?")
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

        return _wrap_handler(await continuation(details), around)


def _code_of(failure: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call ends with, from what escaped its handler: inside the ErrorInterceptor a domain
    error not yet mapped, outside it (the tracing interceptor) the AbortError that mapping raised."""
    if isinstance(failure, errors.AutodidactError):
        return STATUS_OF_ERROR.get(type(failure), grpc.StatusCode.INTERNAL)
    if isinstance(failure, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if failure is not None and not isinstance(failure, grpc.aio.AbortError):
        return grpc.StatusCode.INTERNAL
    return context.code() or (grpc.StatusCode.UNKNOWN if failure is not None else grpc.StatusCode.OK)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but the open methods (health, reflection),
    checks the role its method needs, binds its principal for the whole call
    (response streams included), and writes the audit line of each call that
    may change something, whatever its outcome. Runs inside the
    ErrorInterceptor, which turns its refusals into status codes."""

    def __init__(self, settings: AuthSettings) -> None:
        self._authenticator = Authenticator(settings)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        # Binary ("-bin") metadata carry bytes; no credential is among them.
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}
        if self._authenticator.is_open(details.method):
            if self._authenticator.settings.insecure:
                return handler

            # An open method needs no token. With one it acts as its caller; without, for nobody:
            # not as the ANONYMOUS admin that no binding at all would mean.
            @contextlib.asynccontextmanager
            async def as_caller_or_nobody(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
                principal = await self._authenticator.authenticate(metadata) if "authorization" in metadata else NOBODY
                with acting_as(principal):
                    yield

            return _wrap_handler(handler, as_caller_or_nobody)
        method = details.method
        role = required_role(method)

        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            principal: Principal | None = None
            failure: BaseException | None = None
            with AuditScope() as audit:
                try:
                    principal = await self._authenticator.authenticate(metadata)
                    principal.require(role, method.rsplit("/", 1)[-1])
                    with acting_as(principal), structlog.contextvars.bound_contextvars(tenant=principal.tenant, subject=principal.subject):
                        yield
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if audited(role):
                        write_audit_line(principal, method, audit.named, _code_of(failure, context).name)

        return _wrap_handler(handler, around, audit_request)


class LimitInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the calls in progress, by class: unary calls (`max_calls`) and
    response streams (`max_streams`: WatchJob, StreamSamples, health Watch),
    each with its own count, so idle streams cannot take the slots of calls.
    Health checks and reflection are never counted. One call over a bound is
    answered RESOURCE_EXHAUSTED at once instead of queueing.

    grpc's own maximum_concurrent_rpcs counts every method together, health
    included, which is what let forty idle watchers fail the health probes."""

    def __init__(self, max_calls: int, max_streams: int) -> None:
        self._bounds = {"calls": max_calls, "streams": max_streams}
        self._in_progress = {"calls": 0, "streams": 0}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or (details.method.startswith(EXEMPT_PREFIXES) and not handler.unary_stream):
            return handler
        kind = "streams" if handler.unary_stream or handler.stream_stream else "calls"

        @contextlib.asynccontextmanager
        async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            if self._in_progress[kind] >= self._bounds[kind]:
                noun = "response streams" if kind == "streams" else "calls"
                raise errors.ResourceExhausted(f"this server already has {self._bounds[kind]} {noun} in progress; retry later")
            self._in_progress[kind] += 1
            try:
                yield
            finally:
                self._in_progress[kind] -= 1

        return _wrap_handler(handler, around)


class _Undecodable:
    """What the request deserializer returns for bytes that are not the message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes become INVALID_ARGUMENT on every method.

    grpc runs the request deserializer outside the handler, where an exception
    becomes UNKNOWN. The wrapped deserializer returns a marker instead, and the
    handler refuses it with InvalidArgument (streamed requests: at the message)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer

        def tolerant(raw: bytes) -> Any:
            try:
                return deserialize(raw)
            except Exception as exc:  # DecodeError, and anything a decoder raises
                return _Undecodable(exc)

        def check(request: Any) -> Any:
            if isinstance(request, _Undecodable):
                raise errors.InvalidArgument("request", f"is not a valid message of {details.method}: {shorten(str(request.error))}")
            return request

        async def checked_stream(requests: Any) -> AsyncIterator[Any]:
            async for request in requests:
                yield check(request)

        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        streamed_requests = bool(handler.stream_unary or handler.stream_stream)

        if handler.unary_unary or handler.stream_unary:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                request = checked_stream(request) if streamed_requests else check(request)
                return await behaviour(request, context)

            factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return factory(unary, tolerant, handler.response_serializer)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = checked_stream(request) if streamed_requests else check(request)
            responses = behaviour(request, context)
            if inspect.isasyncgen(responses):
                async for response in responses:
                    yield response
            else:
                await responses  # a write-style handler (health Watch)

        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(streaming, tolerant, handler.response_serializer)


def server_interceptors(max_calls: int = 32, max_streams: int = 64, auth: AuthSettings | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: the request id is bound before the others run, and the
    span opened before metrics and errors, so it sees the final status code;
    errors maps what authentication, the limits and the decoder raise.
    Authentication comes before the limits, so calls it refuses take no slot.
    `auth` None: no authentication interceptor at all (every call ANONYMOUS, no audit lines)."""
    authentication: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(auth)] if auth is not None else []
    return [
        RequestIdInterceptor(),
        TracingInterceptor(),
        MetricsInterceptor(),
        ErrorInterceptor(),
        *authentication,
        LimitInterceptor(max_calls, max_streams),
        DecodeInterceptor(),
    ]
