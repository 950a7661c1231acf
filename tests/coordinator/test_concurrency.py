"""Adaptive concurrency per stage (issue 13, part 5): the AIMD limit alone,
JobContext against a real gRPC server whose bound on calls in progress is
below the job's max_in_flight, and a remote backend's HTTP 429 reaching the
coordinator as an overload.

The server is the real one's interceptors (LimitInterceptor answers the call
over its bound RESOURCE_EXHAUSTED) around a DOUBLE of the generator: a
servicer that answers every Generate after a fixed latency, no model. The
429s come from a scripted loopback HTTP server (tests/backends' Replay).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from autodidact.backends.llm import GenerationRequest, Sampling
from autodidact.backends.llm.tgi import TgiLLM
from autodidact.backends.remote import post_json, with_backoff
from autodidact.coordinator.concurrency import AimdLimit
from autodidact.coordinator.recipes.base import OVERLOAD_CODES, Decision, JobContext, Services, StageResult
from autodidact.coordinator.store import SqliteJobStore
from autodidact.errors import ResourceExhausted, Unavailable
from autodidact.runtime.interceptors import STATUS_OF_ERROR, server_interceptors
from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.backends.test_remote import TGI_INFO, Replay, fast_retries

# --- the limit alone ---


def test_an_overload_lowers_the_limit_once_per_round_trip() -> None:
    limit = AimdLimit(20, decrease=0.5)
    started = limit.decreases  # a burst of calls, all started under the limit of 20
    assert limit.overloaded(started) is True and limit.limit == 10
    # The rest of the burst was sent under the old limit: the decrease answered them already.
    for _ in range(9):
        assert limit.overloaded(started) is True
    assert limit.limit == 10
    # A call started after the decrease, refused too: the lower limit is still too high.
    assert limit.overloaded(limit.decreases) is True and limit.limit == 5


async def test_successes_raise_the_limit_by_one_per_limits_worth_never_above_max() -> None:
    limit = AimdLimit(8, decrease=0.5)
    limit.overloaded(limit.decreases)
    assert limit.limit == 4
    for _ in range(4):
        await limit.acquire()  # the limit is full: what the answers test
    for _ in range(4):
        limit.succeeded()
    assert limit.limit == 5  # 4 successes at a limit of 4: one slot more
    for _ in range(1000):
        while limit.in_flight < limit.limit:  # each slot it adds is taken
            await limit.acquire()
        limit.succeeded()
    assert limit.limit == 8


async def test_answers_do_not_raise_a_limit_that_is_not_full() -> None:
    limit = AimdLimit(8, decrease=0.5)
    limit.overloaded(limit.decreases)
    for _ in range(3):
        await limit.acquire()
    for _ in range(100):
        limit.succeeded()  # 3 held of 4: the answers say nothing about a fifth
    assert limit.limit == 4


def test_the_limit_never_goes_below_its_floor_and_then_says_to_wait() -> None:
    limit = AimdLimit(32)
    while limit.overloaded(limit.decreases):
        pass
    assert limit.limit == 1
    assert limit.overloaded(limit.decreases) is False and limit.limit == 1


async def test_after_the_floor_it_regains_a_slot_per_success_until_the_next_overload() -> None:
    limit = AimdLimit(32, decrease=0.5)
    while limit.overloaded(limit.decreases):
        pass
    for _ in range(7):
        await limit.acquire()  # the slot the last increase added
        limit.succeeded()
    assert limit.limit == 8  # slow start: 1 + 7
    await limit.acquire()
    limit.overloaded(limit.decreases)
    assert limit.limit == 4 and limit.in_flight == 8
    for _ in range(4):
        limit.succeeded()
    assert limit.limit == 5  # additive again


def test_a_fixed_limit_never_moves_and_always_says_to_wait() -> None:
    limit = AimdLimit(4, floor=4)
    assert limit.overloaded(limit.decreases) is False
    limit.succeeded()
    assert limit.limit == 4 and limit.decreases == 0


async def test_shrinking_takes_no_slot_from_its_holder_and_loses_none() -> None:
    limit = AimdLimit(4, decrease=0.5)
    for _ in range(4):
        await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    limit.overloaded(limit.decreases)
    assert limit.limit == 2 and limit.in_flight == 4  # the four holders keep theirs

    limit.release()
    limit.release()
    await asyncio.sleep(0)
    assert not waiter.done() and limit.in_flight == 2  # not re-issued: 2 held, limit 2
    limit.release()
    await asyncio.wait_for(waiter, 1)
    assert limit.in_flight == 2

    # Growth wakes waiters without a release.
    late = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    assert not late.done()
    for _ in range(2):
        limit.succeeded()  # 2 held of 2: the limit is full
    await asyncio.wait_for(late, 1)
    assert limit.limit == 3 and limit.in_flight == 3

    for _ in range(3):
        limit.release()
    assert limit.in_flight == 0
    for _ in range(limit.limit):  # every slot is there to take again
        await asyncio.wait_for(limit.acquire(), 1)


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    limit = AimdLimit(1)
    await limit.acquire()
    cancelled = asyncio.create_task(limit.acquire())
    after = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    limit.release()
    await asyncio.wait_for(after, 1)
    assert cancelled.cancelled() and limit.in_flight == 1


async def test_a_slot_lent_back_is_taken_again_under_the_lowered_limit() -> None:
    limit = AimdLimit(2, decrease=0.5)
    other_done = asyncio.Event()

    async def other() -> None:
        async with limit.slot():
            await other_done.wait()

    async with limit.slot() as first:
        holder = asyncio.create_task(other())
        await asyncio.sleep(0)
        assert limit.in_flight == 2
        limit.overloaded(limit.decreases)  # limit 1, two held
        lent = asyncio.create_task(first.lend_for(0))
        await asyncio.sleep(0.01)
        assert not lent.done() and limit.in_flight == 1  # back in line: the other holds the one slot
        other_done.set()
        await asyncio.wait_for(lent, 1)  # the other gave its slot back
        assert limit.in_flight == 1
    await holder
    assert limit.in_flight == 0


# --- a job against a server bounded below its max_in_flight ---

LATENCY_SECONDS = 0.02
SERVER_CALLS = 4
ITEMS = 160


class GeneratorDouble(generator_pb2_grpc.GeneratorServiceServicer):
    """DOUBLE of the generator: every Generate answers after LATENCY_SECONDS,
    as a model busy for a fixed time per call; it notes the most calls it had."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    async def Generate(self, request: generator_pb2.GenerateRequest, context: Any) -> generator_pb2.GenerateResponse:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(LATENCY_SECONDS)
        finally:
            self.running -= 1
        return generator_pb2.GenerateResponse(samples=[common_pb2.Sample(text=request.prompt.text)])

    async def GetModelInfo(self, request: generator_pb2.GetModelInfoRequest, context: Any) -> generator_pb2.GetModelInfoResponse:
        return generator_pb2.GetModelInfoResponse()  # not called here: Generate is what is measured


@dataclass
class Served:
    stub: generator_pb2_grpc.GeneratorServiceStub
    double: GeneratorDouble


@pytest.fixture
async def bounded_generator() -> AsyncIterator[Served]:
    """The double behind the real interceptors, at most SERVER_CALLS calls in progress."""
    server = grpc.aio.server(interceptors=server_interceptors(max_calls=SERVER_CALLS))
    double = GeneratorDouble()
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(double, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(generator_pb2_grpc.GeneratorServiceStub(channel), double)
    await server.stop(0)


@dataclass
class Run:
    kept: list[bool]
    errors: list[str]
    seconds: float
    attempts: int
    limit: int

    @property
    def throughput(self) -> float:
        return len(self.kept) / self.seconds


async def run_job(tmp_path: Path, stub: Any, max_in_flight: int, adaptive: bool) -> Run:
    """ITEMS items, each one `generate` stage of one Generate call, through JobContext."""
    store = SqliteJobStore(tmp_path / f"jobs-{max_in_flight}-{adaptive}.sqlite")
    services = Services(stub, None, None, None, None, patience_seconds=30)  # type: ignore[arg-type]  # only the generator is called
    ctx = JobContext("job", 0, store, services, max_in_flight, lambda: None, max_error_fraction=0.0, fresh=True, adaptive=adaptive)
    attempts = 0

    async def work(index: int) -> bool:
        request = generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=f"item {index}"))

        async def generate() -> generator_pb2.GenerateResponse:
            nonlocal attempts
            attempts += 1
            response: generator_pb2.GenerateResponse = await stub.Generate(request, timeout=10)
            return response

        async def compute() -> StageResult:
            response = await ctx.call(generate, "generator (double)")
            return StageResult({"text": response.samples[0].text}, Decision(True))

        result = await ctx.stage(f"i{index}", "generate", compute)
        return bool(result.decision and result.decision.kept)

    started = time.perf_counter()
    kept = await ctx.each_item(ITEMS, work)
    seconds = time.perf_counter() - started
    await store.close()
    return Run(kept, ctx.errors, seconds, attempts, ctx.limits["generate"].limit)


async def test_adaptive_limits_keep_a_bounded_server_full_without_failing_an_item(tmp_path: Path, bounded_generator: Served) -> None:
    stub = bounded_generator.stub
    fixed = {n: await run_job(tmp_path, stub, n, adaptive=False) for n in (2, SERVER_CALLS, 2 * SERVER_CALLS)}
    adaptive = await run_job(tmp_path, stub, 32, adaptive=True)

    assert adaptive.kept == [True] * ITEMS and not adaptive.errors
    assert bounded_generator.double.most == SERVER_CALLS  # the bound was reached: the limit had something to find
    best = max(run.throughput for run in fixed.values())
    ratio = adaptive.throughput / best
    assert ratio >= 0.9, f"adaptive {adaptive.throughput:.0f}/s is {ratio:.2f} of the best fixed {best:.0f}/s"
    # It found the server's bound: one over it at most (the probe the additive increase makes).
    assert SERVER_CALLS - 1 <= adaptive.limit <= SERVER_CALLS + 1, adaptive.limit
    gauge = REGISTRY.get_sample_value("autodidact_stage_concurrency_limit", {"stage": "generate"})
    assert gauge == adaptive.limit


# --- a backend's 429 ---

OVERLOADED = (429, {"error": "Model is overloaded", "error_type": "overloaded"})


async def test_a_backends_429_reaches_the_coordinator_as_an_overload() -> None:
    """The generator's remote backends retry a 429 themselves; one they could not
    get past is RESOURCE_EXHAUSTED (an overload to the stage's limit), while a
    server that is down stays UNAVAILABLE."""
    async with Replay({"/info": lambda _: (200, TGI_INFO), "/": lambda _: OVERLOADED, "/v1/completions": lambda _: OVERLOADED}) as server:
        tgi = await TgiLLM.load(fast_retries(server.url))
        try:
            with pytest.raises(ResourceExhausted, match=r"tgi at .*OverloadedError.*after 3 attempts") as from_tgi:
                await tgi.generate(GenerationRequest("x", Sampling(max_tokens=4), seeds=(1,)))
        finally:
            await tgi.close()
        # The OpenAI-compatible and TEI backends share the plain-HTTP path.
        async with aiohttp.ClientSession() as session:
            completions = f"{server.url}/v1/completions"
            with pytest.raises(ResourceExhausted, match=r"HTTP 429.*after 3 attempts") as from_http:
                await with_backoff("openai", fast_retries(server.url), lambda: post_json(session, completions, {}, 5))
            server.routes["/v1/completions"] = lambda _: (503, {"error": "unhealthy"})
            with pytest.raises(Unavailable, match=r"HTTP 503"):
                await with_backoff("openai", fast_retries(server.url), lambda: post_json(session, completions, {}, 5))
    for raised in (from_tgi.value, from_http.value):
        assert STATUS_OF_ERROR[type(raised)] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in OVERLOAD_CODES
