"""Server interceptors: request ids, metrics, and the one place where domain
errors become status codes.

A grpc.aio interceptor sees only the method name before the call. To act
around the call itself, each interceptor supplies an async context manager
that `_wrap_handler` enters around the handler's behaviour, for all four kinds
of RPC; for streaming responses it spans the whole stream.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from autodidact import errors
from autodidact.runtime.metrics import RPC_LATENCY, RPC_REQUESTS

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
}

Around = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]


def _wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around) -> Any:
    """Returns a handler whose behaviour runs inside `around(context)`."""
    if handler is None:
        return None
    if handler.unary_unary or handler.stream_unary:
        unary = handler.unary_unary or handler.stream_unary

        async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await unary(request, context)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_behaviour, handler.request_deserializer, handler.response_serializer)

    streaming = handler.unary_stream or handler.stream_stream

    async def streaming_behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with around(context):
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
                log.info("rpc refused", code=code.name, reason=str(exc))
                await context.abort(code, str(exc))
            except grpc.aio.AbortError:
                raise  # the servicer already chose a status
            except Exception:
                log.exception("rpc failed")
                request_id = structlog.contextvars.get_contextvars().get("request_id", "?")
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

        return _wrap_handler(await continuation(details), around)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: the request id is bound before metrics and errors run."""
    return [RequestIdInterceptor(), MetricsInterceptor(), ErrorInterceptor()]
