"""What a neighbour service's gRPC error means to the caller.

A service that calls another (the critic calls the generator, the coordinator
calls them all) or a command that calls a service turns the neighbour's
`AioRpcError` into words and into its own domain error here, so every caller
names the neighbour and its status the same way and retries the same codes.
"""

from __future__ import annotations

import grpc

from autodidact.errors import AutodidactError, FailedPrecondition, Unavailable

# Codes that say "not now" rather than "no": retrying later may succeed.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def rpc_error_text(error: grpc.aio.AioRpcError) -> str:
    """The status and what the neighbour said, e.g. "UNAVAILABLE: the model is still loading; retry shortly"."""
    return f"{error.code().name}: {error.details()}"


def is_transient(error: grpc.aio.AioRpcError) -> bool:
    return error.code() in TRANSIENT_CODES


def neighbour_error(error: grpc.aio.AioRpcError, neighbour: str) -> AutodidactError:
    """The error to raise to our own client: UNAVAILABLE when the neighbour may answer later
    (the client retries), FAILED_PRECONDITION when it refused; the message names the neighbour."""
    kind = Unavailable if is_transient(error) else FailedPrecondition
    return kind(f"{neighbour}: {rpc_error_text(error)}")
