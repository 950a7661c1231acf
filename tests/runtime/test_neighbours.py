"""runtime/neighbours.py: a neighbour's gRPC error, in words and as our own error, against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from autodidact.errors import FailedPrecondition, Unavailable
from autodidact.runtime.neighbours import TRANSIENT_CODES, is_transient, neighbour_error, rpc_error_text

# Sorted outside the decorator: inside it, parametrize's argument type makes mypy read the codes as plain objects.
# In a fixed order, so the test ids are the same on every run.
TRANSIENT_IN_ORDER = sorted(TRANSIENT_CODES, key=lambda code: code.name)


class Refusing:
    """DOUBLE: a neighbour that answers every call with the status it was given."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(self.code, f"said {self.code.name.lower()}")
        return b""


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[Refusing, grpc.aio.Channel]]:
    neighbour = Refusing()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Neighbour", {"Call": grpc.unary_unary_rpc_method_handler(neighbour.call)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield neighbour, channel
    await server.stop(0)


async def error_from(refusing: tuple[Refusing, grpc.aio.Channel], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    neighbour, channel = refusing
    neighbour.code = code
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Neighbour/Call")  # no serializers: raw bytes
        await call(b"", timeout=5)
    return raised.value


@pytest.mark.parametrize("code", TRANSIENT_IN_ORDER)
async def test_not_now_becomes_unavailable_naming_the_neighbour(refusing, code):
    error = await error_from(refusing, code)
    assert is_transient(error)
    mapped = neighbour_error(error, "generator")
    assert isinstance(mapped, Unavailable)
    assert str(mapped) == f"generator: {code.name}: said {code.name.lower()}"


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL])
async def test_no_becomes_failed_precondition_naming_the_neighbour(refusing, code):
    error = await error_from(refusing, code)
    assert not is_transient(error)
    mapped = neighbour_error(error, "scorer")
    assert isinstance(mapped, FailedPrecondition)
    assert str(mapped) == f"scorer: {rpc_error_text(error)}"
    assert rpc_error_text(error) == f"{code.name}: said {code.name.lower()}"
