"""StreamSamples as samples.py reads it: from the store's cursor, each item
once when decided, in the order decided, and O(N) store reads for a job of N
items however often it changes. On the real job store; the recipe is a
DOUBLE (two stages, no model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from autodidact.coordinator import protos, samples
from autodidact.coordinator.jobs import JobChanges
from autodidact.coordinator.recipes.base import Decision, JobContext, StageResult
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.records import Record
from autodidact.coordinator.store import JobStore, SqliteJobStore

JOB = "job"
STAGES = ("work", "dataset")


class SamplesRecipe(Recipe[None]):
    """A DOUBLE recipe: only what samples.py reads of one (stages, final stages, belongs)."""

    name = "self_consistency"
    stages = STAGES
    services = ()
    tables: ClassVar[dict[str, pa.Schema]] = {}

    def resolve(self, spec: Any, job_id: str) -> None:
        return None

    async def run(self, ctx: JobContext, params: None) -> dict[str, Any]:
        raise NotImplementedError("samples.py never runs a recipe")

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        return lambda item_id: not item_id.startswith("x")

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return {}


RECIPE = SamplesRecipe()


class CountingStore:
    """The real store, counting the results every read returns (a store wrapper for the O(N) check)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.results_read = 0
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def results_since(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str, dict[str, Any]]]:
        rows = await self._store.results_since(job_id, after, limit)
        self.reads += 1
        self.results_read += len(rows)
        return rows

    async def results(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        raise AssertionError("a follower re-read every result")

    def iter_results(self, job_id: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
        raise AssertionError("a follower re-read every result")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    real = SqliteJobStore(tmp_path / "jobs.sqlite")
    asyncio.run(real.create_job(JOB, b"", "hash", protos.RUNNING))
    yield CountingStore(real)
    asyncio.run(real.close())


async def put(store: JobStore, item_id: str, stage: str, kept: bool | None, filter_: str = "") -> None:
    decision = None if kept is None else Decision(kept, filter_)
    await store.put_result(JOB, item_id, stage, StageResult({"item": item_id}, decision).to_json(), kept=kept, filter_=filter_)


async def collect(stream: AsyncIterator[Record]) -> list[Record]:
    return [record async for record in stream]


async def test_a_follower_gets_each_item_once_when_decided_in_decision_order_with_o_n_reads(store):
    changes = JobChanges()
    items = 600
    follower = asyncio.create_task(collect(samples.stream_records(store, JOB, RECIPE, include_dropped=True, changes=changes)))
    for number in range(items):
        item = f"i{number:04d}"
        if number % 3 == 0:
            await put(store, item, "work", False, "too_short")  # decided: dropped
        else:
            await put(store, item, "work", True)  # in flight: not a record yet
            changes.notify(JOB)
            await put(store, item, "dataset", True)
        changes.notify(JOB)
        if number % 50 == 0:
            await asyncio.sleep(0.05)  # let the follower catch up now and then: it reads many times
    await store.set_state(JOB, protos.SUCCEEDED)
    changes.notify(JOB)
    records = await asyncio.wait_for(follower, timeout=10)
    assert [r.item_id for r in records] == [f"i{n:04d}" for n in range(items)]
    assert [r.kept for r in records] == [n % 3 != 0 for n in range(items)]
    assert store.reads > 5, "the follower never followed: it read once at the end"
    # Every result read once, whatever the number of wake-ups.
    assert store.results_read == sum(1 if n % 3 == 0 else 2 for n in range(items))


async def test_items_decided_before_the_stream_come_first_and_drops_only_when_asked(store):
    await put(store, "b", "dataset", True)
    await put(store, "a", "work", False, "similarity")  # dropped at work: decided
    await put(store, "c", "work", True)  # still in flight
    kept_only = await collect(samples.stream_records(store, JOB, RECIPE, include_dropped=False, changes=None))
    assert [r.item_id for r in kept_only] == ["b"]
    every = await collect(samples.stream_records(store, JOB, RECIPE, include_dropped=True, changes=None))
    assert [(r.item_id, r.kept) for r in every] == [("b", True), ("a", False)]
    assert every[1].lineage == [("work", Decision(False, "similarity"))]


async def test_once_the_job_ended_its_summary_says_which_items_belong(store):
    await put(store, "x1", "dataset", True)  # the DOUBLE recipe's summary leaves x… out
    await put(store, "i1", "dataset", True)
    running = await collect(samples.stream_records(store, JOB, RECIPE, include_dropped=True, changes=None))
    assert [r.item_id for r in running] == ["x1", "i1"]
    await store.put_value(JOB, "summary", {"kept": 1})
    ended = await collect(samples.stream_records(store, JOB, RECIPE, include_dropped=True, changes=None))
    assert [r.item_id for r in ended] == ["i1"]


async def test_every_watcher_of_a_job_wakes_on_a_change_and_changes_coalesce():
    changes = JobChanges()
    loop = asyncio.get_running_loop()
    read_at = loop.time()
    waiters = [asyncio.create_task(changes.wait(JOB, changes.version(JOB), read_at)) for _ in range(3)]
    await asyncio.sleep(0)
    for _ in range(100):
        changes.notify(JOB)
    await asyncio.wait_for(asyncio.gather(*waiters), timeout=0.5)
    # Not before the minimum interval after the last read, however many changes.
    assert loop.time() - read_at >= 0.19
    # Nothing changed: the heartbeat returns within the maximum interval.
    started = loop.time()
    await changes.wait(JOB, changes.version(JOB), started)
    assert 0.9 <= loop.time() - started < 1.5
