"""JobContext: what every recipe stands on (stored stages, replay, refused
items, the error budget, bounded work). No model and no gRPC: the work is a
DOUBLE (a deterministic compute function), the store the real SQLite one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from autodidact.coordinator.recipes.base import (
    ERROR_FILTER,
    PLAN_KEY,
    Decision,
    ItemFailed,
    JobContext,
    ServiceRefused,
    Services,
    StageResult,
    TooManyErrors,
)
from autodidact.coordinator.store import JobStore, SqliteJobStore, StageCounts
from autodidact.errors import Unavailable

JOB = "job"


def context(store: JobStore, max_in_flight: int = 4, max_error_fraction: float = 0.1, changes: list[int] | None = None) -> JobContext:
    services = Services(None, None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]  # no service is called
    on_change = (lambda: changes.append(1)) if changes is not None else (lambda: None)
    return JobContext(JOB, 0, store, services, max_in_flight, on_change, max_error_fraction)


def counting_compute(calls: list[str], name: str, kept: bool = True) -> Callable[[], Awaitable[StageResult]]:
    """DOUBLE of a stage's computation: notes the call, answers a fixed result."""

    async def compute() -> StageResult:
        calls.append(name)
        return StageResult({"answer": name}, Decision(kept, "" if kept else "length"))

    return compute


async def test_a_stage_is_computed_once_and_replayed_from_the_store(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    calls: list[str] = []
    changes: list[int] = []
    first = await context(store, changes=changes).stage("i1", "generate", counting_compute(calls, "i1"))
    assert calls == ["i1"] and changes == [1] and first.data == {"answer": "i1"}

    restarted = context(store)  # a restarted job: a new context on the same store
    replayed = await restarted.stage("i1", "generate", counting_compute(calls, "again"))
    assert calls == ["i1"] and replayed == first
    assert await restarted.stored("i1", "generate") == first and await restarted.stored("i2", "generate") is None
    assert await store.stage_counts(JOB) == [StageCounts("generate", 1, 1, {})]
    await store.close()


class ReadCountingStore:
    """The real store, counting get_result calls (a wrapper, not a double)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def get_result(self, job_id: str, item_id: str, stage: str) -> dict[str, object] | None:
        self.reads += 1
        return await self._store.get_result(job_id, item_id, stage)


async def test_a_fresh_job_computes_without_reading_and_a_duplicate_key_keeps_the_stored_result(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    counting = ReadCountingStore(store)
    services = Services(None, None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]  # no service is called
    fresh = JobContext(JOB, 0, counting, services, 4, lambda: None, fresh=True)  # type: ignore[arg-type]
    calls: list[str] = []
    first = await fresh.stage("i1", "generate", counting_compute(calls, "first"))
    assert counting.reads == 0 and calls == ["first"]
    # The same key asked again in the same fresh run: computed, refused by the
    # store as a duplicate, and the stored (first) result is what the stage answers.
    again = await fresh.stage("i1", "generate", counting_compute(calls, "second"))
    assert calls == ["first", "second"] and again == first and counting.reads == 1
    assert await store.stage_counts(JOB) == [StageCounts("generate", 1, 1, {})]
    await store.close()


async def test_a_refused_stage_is_stored_as_an_error_drop_that_replays_without_calling_again(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    calls: list[str] = []

    async def refuse() -> StageResult:
        """DOUBLE of a stage whose service refuses the item."""
        calls.append("refused")
        raise ServiceRefused("generator: INVALID_ARGUMENT: prompt too long")

    with pytest.raises(ItemFailed, match="i1 at generate: generator: INVALID_ARGUMENT"):
        await context(store).stage("i1", "generate", refuse)
    with pytest.raises(ItemFailed, match="prompt too long"):
        await context(store).stage("i1", "generate", refuse)
    assert calls == ["refused"]
    assert await store.stage_counts(JOB) == [StageCounts("generate", 1, 0, {ERROR_FILTER: 1})]
    await store.close()


async def test_drop_refused_drops_each_item_without_a_result_once(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store)
    await ctx.stage("a", "score", counting_compute([], "a"))
    failed = await ctx.drop_refused(["a", "b", "c", "b", "d", "e"], "score", ServiceRefused("scorer: INVALID_ARGUMENT: batch refused"))
    assert isinstance(failed, ItemFailed) and str(failed) == "a, b, c … at score: scorer: INVALID_ARGUMENT: batch refused"
    assert (await ctx.stored("a", "score")).data == {"answer": "a"}  # type: ignore[union-attr]  # decided before: kept as it was
    dropped = await ctx.stored_many(["b", "c", "d", "e"], "score")
    assert set(dropped) == {"b", "c", "d", "e"}
    assert all(r.decision == Decision(False, ERROR_FILTER, reason="scorer: INVALID_ARGUMENT: batch refused") for r in dropped.values())
    assert await store.stage_counts(JOB) == [StageCounts("score", 5, 1, {ERROR_FILTER: 4})]
    await store.close()


async def test_the_error_budget_counts_failed_items_against_the_items_run(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, max_error_fraction=0.25)

    async def work(fails: bool) -> bool:
        """DOUBLE of an item's work: fails as a refused item does, or keeps it."""
        if fails:
            raise ItemFailed("refused")
        return True

    outcomes = [await ctx.item(work(n == 0)) for n in range(4)]
    assert outcomes == [False, True, True, True] and ctx.items == 4 and ctx.errors == ["refused"]
    ctx.check_error_budget()  # 1 of 4 is not more than 0.25
    assert not await ctx.item(work(True))
    with pytest.raises(TooManyErrors, match=r"2 of 5 items errored, more than max_error_fraction 0.25; first: refused"):
        ctx.check_error_budget()
    ctx.check_error_budget(items=8)  # 2 of 8 is within it
    await store.close()


async def test_each_item_runs_at_most_max_in_flight_items_in_index_order(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, max_in_flight=3)
    started: list[int] = []
    running = 0
    most = 0

    async def work(index: int) -> bool:
        """DOUBLE of an item's work: yields a few times, keeps even items."""
        nonlocal running, most
        started.append(index)
        running += 1
        most = max(most, running)
        for _ in range(index % 4 + 1):
            await asyncio.sleep(0)
        running -= 1
        return index % 2 == 0

    assert await ctx.each_item(50, work) == [i % 2 == 0 for i in range(50)]
    assert most == 3 and started == list(range(50)) and ctx.items == 50
    assert await store.get_value(JOB, PLAN_KEY) == {"dataset_items": 50}
    assert await context(store).each_item(0, work) == []
    await store.close()


async def test_each_item_stops_starting_items_once_the_error_budget_is_spent(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, max_in_flight=2, max_error_fraction=0.1)
    started: list[int] = []

    async def work(index: int) -> bool:
        """DOUBLE of an item's work: the first items are refused."""
        started.append(index)
        await asyncio.sleep(0)
        if index < 6:
            raise ItemFailed(f"item {index} refused")
        return True

    with pytest.raises(TooManyErrors, match="of 40 items errored"):
        await ctx.each_item(40, work)
    assert len(started) < 10
    await store.close()


async def test_each_item_stops_every_worker_when_one_item_fails_the_job(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, max_in_flight=4)
    started: list[int] = []

    async def work(index: int) -> bool:
        """DOUBLE of an item's work: item 5 finds a service gone for good."""
        started.append(index)
        await asyncio.sleep(0.01 if index != 5 else 0)
        if index == 5:
            raise Unavailable("generator: UNAVAILABLE (gave up after 1s)")
        return True

    with pytest.raises(Unavailable, match="gave up"):
        await ctx.each_item(100, work)
    seen = len(started)
    await asyncio.sleep(0.05)
    assert len(started) == seen < 100, "workers went on after the job failed"
    await store.close()


async def test_a_stage_name_bounds_its_own_concurrent_computations(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    ctx = context(store, max_in_flight=2)
    running = 0
    most = 0

    def compute(item: str) -> Callable[[], Awaitable[StageResult]]:
        async def slow() -> StageResult:
            """DOUBLE of a slow stage."""
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.005)
            running -= 1
            return StageResult({"item": item})

        return slow

    await asyncio.gather(*(ctx.stage(f"i{n}", "score", compute(f"i{n}")) for n in range(10)))
    assert most == 2 and len(await store.results(JOB)) == 10
    await store.close()


async def test_a_job_value_is_computed_once(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    calls: list[int] = []

    async def today() -> dict[str, str]:
        """DOUBLE of a job-level computation (a reference date)."""
        calls.append(1)
        return {"date": f"2026-01-0{len(calls)}"}

    assert await context(store).job_value("reference_date", today) == {"date": "2026-01-01"}
    assert await context(store).job_value("reference_date", today) == {"date": "2026-01-01"}
    assert calls == [1] and not await store.has_results(JOB)
    await store.close()
