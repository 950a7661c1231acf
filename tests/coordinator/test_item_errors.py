"""A service refusing one item drops that item, not the job (issue 10, item 7).

The refusing service is a deterministic double (a function that raises the
AioRpcError a real stub raises); the store is the real SQLite job store.
"""

from __future__ import annotations

import grpc
import pytest

from autodidact.coordinator.recipes.base import ERROR_FILTER, Decision, JobContext, Services, StageResult, TooManyErrors
from autodidact.coordinator.store import JobStore, SqliteJobStore


def refused(item: int) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), f"prompt.text: item {item} is too long"
    )


def context(store: JobStore, fraction: float) -> JobContext:
    services = Services(None, None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]
    return JobContext("job", 0, store, services, 2, lambda: None, fraction)


def work_refusing(ctx: JobContext, bad: set[int], calls: list[int]):
    async def work(index: int) -> bool:
        async def rpc() -> str:
            calls.append(index)
            if index in bad:
                raise refused(index)
            return "ok"

        async def compute() -> StageResult:
            return StageResult({"answer": await ctx.call(rpc, "double (generate)")}, Decision(True))

        result = await ctx.stage(f"q{index:02d}", "generate", compute)
        return bool(result.decision and result.decision.kept)

    return work


async def test_a_refused_item_is_dropped_with_filter_error_and_the_job_goes_on(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, 0.1)
    calls: list[int] = []
    kept = await ctx.each_item(20, work_refusing(ctx, {7}, calls))
    assert kept == [i != 7 for i in range(20)]
    stored = await store.get_result("job", "q07", "generate")
    assert stored is not None and stored["decision"]["kept"] is False and stored["decision"]["filter"] == ERROR_FILTER
    assert "INVALID_ARGUMENT" in stored["decision"]["reason"] and "item 7 is too long" in stored["decision"]["reason"]
    assert len(ctx.errors) == 1 and ctx.items == 20
    counts = {c.stage: c for c in await store.stage_counts("job")}
    assert counts["generate"].dropped_by_filter == {ERROR_FILTER: 1}

    # Replayed (a restart): the stored error stops the item again without calling the service.
    again = context(store, 0.1)
    calls.clear()
    assert await again.each_item(20, work_refusing(again, {7}, calls)) == kept
    assert calls == [] and len(again.errors) == 1


async def test_more_errors_than_max_error_fraction_fail_the_job_naming_the_field(tmp_path):
    ctx = context(SqliteJobStore(tmp_path / "jobs.sqlite"), 0.1)
    calls: list[int] = []
    with pytest.raises(TooManyErrors, match=r"of 20 items errored, more than max_error_fraction 0.1; first: q0\d at generate"):
        await ctx.each_item(20, work_refusing(ctx, {0, 1, 2, 3, 4, 5}, calls))
    assert len(calls) < 20, "items kept starting after the error budget was spent"


async def test_transient_failures_are_still_waited_out_not_dropped(tmp_path):
    ctx = context(SqliteJobStore(tmp_path / "jobs.sqlite"), 0.0)
    attempts = []

    async def rpc() -> str:
        attempts.append(1)
        if len(attempts) < 2:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "restarting")
        return "ok"

    assert await ctx.call(rpc, "double") == "ok" and len(attempts) == 2
