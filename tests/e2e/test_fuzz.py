"""Hostile bytes get typed errors: a property-based fuzz of every RPC of all six services.

Real servers on loopback (the embedded model, the embedded embedder). For each
method, hypothesis sends messages built from the method's own descriptor with
awkward values (empty, ".", "..", 100,000 characters, NaN, huge numbers, unknown
enum values) and raw random bytes through a channel with no serializer. Every
answer must be OK or a typed refusal (never UNKNOWN or INTERNAL), no call may
outlive its deadline, and each server must still be SERVING and answer a good
call afterwards. Methods are read from the descriptors, so an RPC added later is
fuzzed too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodidact.client import health_stub
from autodidact.v1 import (
    coordinator_pb2,
    critic_pb2,
    dedup_pb2,
    generator_pb2,
    scorer_pb2,
    tool_executor_pb2,
)
from tests.stack import Stack, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SERVICE_DESCRIPTORS = {
    "coordinator": coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"],
    "generator": generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"],
    "scorer": scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"],
    "critic": critic_pb2.DESCRIPTOR.services_by_name["CriticService"],
    "tool-executor": tool_executor_pb2.DESCRIPTOR.services_by_name["ToolExecutorService"],
    "dedup": dedup_pb2.DESCRIPTOR.services_by_name["DedupService"],
}
METHODS = [(name, method) for name, service in SERVICE_DESCRIPTORS.items() for method in service.methods]
# Codes a bug produces; every other code is a deliberate answer.
UNTYPED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
CALL_SECONDS = 10.0
# A call may end this much after its deadline (the client's own timer, scheduling on two cores).
LATE_SECONDS = 2.0

FD = pb_descriptor.FieldDescriptor
TEXTS = st.one_of(
    st.sampled_from(["", ".", "..", "../..", "a", "x" * 100_000, "\x00", "9" * 40, "ab\n", "autodidact-default", "Calculator", "2+2"]),
    st.text(max_size=24),
)
INT_EDGES = [0, 1, -1, 2, 7, 64, 65, 2048, 2049, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1]
FLOATS = st.one_of(st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.5, math.nan, math.inf, -math.inf, 1e308, 5e-324]), st.floats(width=32))


def _int_strategy(field: Any) -> st.SearchStrategy[int]:
    bits = 64 if field.type in (FD.TYPE_INT64, FD.TYPE_UINT64, FD.TYPE_SINT64, FD.TYPE_FIXED64, FD.TYPE_SFIXED64) else 32
    signed = field.type not in (FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(st.sampled_from([v for v in INT_EDGES if low <= v <= high]), st.integers(low, high))


def _scalar(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    if field.type == FD.TYPE_STRING:
        return TEXTS
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=32)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return FLOATS
    if field.type == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers are legal on the wire
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    return _int_strategy(field)


def message_strategy(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of this type with a random subset of fields set to awkward values."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3 or (descriptor.full_name.startswith("google.protobuf.") and descriptor.name not in ("Timestamp", "Duration")):
        return st.just(cls())
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            parts[field.name] = st.none() | st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=3)
        elif field.is_repeated:
            parts[field.name] = st.none() | st.lists(_scalar(field, depth), max_size=4)
        else:
            parts[field.name] = st.none() | _scalar(field, depth)

    def build(values: dict[str, Any]) -> Any:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    if field.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                if field.type == FD.TYPE_MESSAGE:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif field.type == FD.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(parts).map(build)


def request_bytes(method: Any) -> st.SearchStrategy[bytes]:
    structured = message_strategy(method.input_type).map(lambda m: m.SerializeToString())
    return st.one_of(structured, st.binary(max_size=64))


# What each fuzzed service needs running beside it (the coordinator's jobs never
# get past validation here: no input file exists).
NEEDS = {
    "coordinator": ("coordinator",),
    "generator": ("generator",),
    "scorer": ("scorer",),
    "critic": ("generator", "scorer", "critic"),
    "tool-executor": ("generator", "tool-executor"),
    "dedup": ("dedup",),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stacks(tmp_path_factory) -> AsyncIterator[dict[str, Stack]]:
    """Per fuzzed service, a stack of just what it needs, started on first use."""
    started: dict[str, Stack] = {}
    yield started
    for stack in started.values():
        await stack.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def fuzz_stack(stacks, tmp_path_factory, service) -> Stack:
    if service not in stacks:
        stacks[service] = await start_stack(tmp_path_factory.mktemp(service), names=NEEDS[service])
    return stacks[service]


async def call_raw(channel: grpc.aio.Channel, method: Any, body: bytes) -> tuple[grpc.StatusCode, str, float]:
    """One call with raw bytes, no retries; returns (code, details, seconds)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    started = time.monotonic()
    try:
        # No serializers: the request goes as the raw bytes, and the response comes back as bytes.
        if method.server_streaming:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            async for _ in stream(body, timeout=CALL_SECONDS):
                pass
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(body, timeout=CALL_SECONDS)
        return grpc.StatusCode.OK, "", time.monotonic() - started
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", time.monotonic() - started


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
async def test_every_rpc_answers_hostile_bytes_with_a_typed_code_in_time(fuzz_stack, service, method):
    target = fuzz_stack.target(service)
    seen: list[tuple[grpc.StatusCode, str, bytes]] = []
    # A plain channel: no service-config retries, so each answer is the first one.
    async with grpc.aio.insecure_channel(target) as channel:
        loop = asyncio.get_running_loop()

        # hypothesis drives a synchronous test; each example runs its call on this loop's thread.
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=request_bytes(method))
        def one_call(body: bytes) -> None:
            code, details, seconds = asyncio.run_coroutine_threadsafe(call_raw(channel, method, body), loop).result()
            seen.append((code, details, body))
            assert code not in UNTYPED, f"{method.full_name} answered {code.name}: {details!r} to {body[:200]!r}"
            assert seconds <= CALL_SECONDS + LATE_SECONDS, f"{method.full_name} took {seconds:.1f}s for {body[:200]!r}"
            assert len(details) <= 2048, f"{method.full_name}: a {len(details):,}-character status message"

        await asyncio.to_thread(one_call)
        # Always tried, whatever hypothesis drew: bytes that are no message at all.
        code, details, _ = await call_raw(channel, method, b"\xff\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith("request: is not a valid message of")

        health = await health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A good call still works: the service's cheapest read-only method.
        assert (await call_raw(channel, *GOOD_CALLS[service]))[0] == grpc.StatusCode.OK
    assert seen, "hypothesis ran no example"


GOOD_CALLS = {
    "coordinator": (SERVICE_DESCRIPTORS["coordinator"].methods_by_name["ListJobs"], b""),
    "generator": (SERVICE_DESCRIPTORS["generator"].methods_by_name["GetModelInfo"], b""),
    "scorer": (
        SERVICE_DESCRIPTORS["scorer"].methods_by_name["ScoreText"],
        scorer_pb2.ScoreTextRequest(items=[scorer_pb2.ScoredText(text="The sky is blue.")]).SerializeToString(),
    ),
    "critic": (SERVICE_DESCRIPTORS["critic"].methods_by_name["ListConstitutions"], b""),
    "tool-executor": (SERVICE_DESCRIPTORS["tool-executor"].methods_by_name["ListTools"], b""),
    "dedup": (
        SERVICE_DESCRIPTORS["dedup"].methods_by_name["FilterBatch"],
        dedup_pb2.FilterBatchRequest(
            namespace="fuzz-good", items=[dedup_pb2.DedupItem(id="a", text="hello")], dry_run=True
        ).SerializeToString(),
    ),
}
