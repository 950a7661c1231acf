"""replay_batched on a real job store: a job resumed after a crash computes
only what was not stored, never an item twice; a whole-batch stage repeats
its batch but records only what is missing; a refused batch ends its items
with filter `error`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from autodidact.coordinator.recipes.base import ERROR_FILTER, Decision, ItemFailed, ServiceRefused, StageResult
from autodidact.coordinator.recipes.replay import replay_batched
from autodidact.coordinator.store import SqliteJobStore
from tests.coordinator.recipes.harness import JOB, job_context

ITEMS = [f"i{n:02d}" for n in range(10)]


class Crash(Exception):
    """Stands in for the process dying part way through a job."""


class CountingCompute:
    """A DOUBLE of a batched service: decides each item (kept when its number is even), remembers
    every item it was asked about, and crashes or refuses on the batch numbered `crash_on`/`refuse_on`."""

    def __init__(self, crash_on: int | None = None, refuse_on: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.crash_on, self.refuse_on = crash_on, refuse_on

    async def __call__(self, batch: list[str]) -> list[StageResult]:
        self.batches.append(batch)
        if len(self.batches) - 1 == self.crash_on:
            raise Crash
        if len(self.batches) - 1 == self.refuse_on:
            raise ServiceRefused("double: INVALID_ARGUMENT: refused")
        return [StageResult({"n": int(item[1:])}, Decision(int(item[1:]) % 2 == 0)) for item in batch]

    @property
    def asked(self) -> list[str]:
        return [item for batch in self.batches for item in batch]


def replay(store: SqliteJobStore, compute: CountingCompute, **options: object) -> list[tuple[str, StageResult]]:
    return asyncio.run(replay_batched(job_context(store, {}), "score", ITEMS, lambda item: item, compute, **options))  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    asyncio.run(store.create_job(JOB, b"", "hash", 1))
    return store


def test_a_resumed_stage_computes_only_what_the_crash_left_and_nothing_twice(store: SqliteJobStore) -> None:
    first = CountingCompute(crash_on=1)
    with pytest.raises(Crash):
        replay(store, first, batch_size=4)
    assert first.batches[0] == ITEMS[:4]  # stored before the crash
    second = CountingCompute()
    results = replay(store, second, batch_size=4)
    assert second.asked == ITEMS[4:]
    assert [item for item, _ in results] == ITEMS
    assert [result.data["n"] for _, result in results] == list(range(10))
    assert [result.decision.kept for _, result in results if result.decision] == [n % 2 == 0 for n in range(10)]
    third = CountingCompute()
    assert replay(store, third, batch_size=4) == results and third.batches == []  # a finished stage computes nothing


def test_a_whole_batch_stage_resends_every_item_but_records_only_the_missing_ones(store: SqliteJobStore) -> None:
    asyncio.run(job_context(store, {}).record("i03", "score", StageResult({"n": -1}, Decision(False, "stored_first"))))
    compute = CountingCompute()
    results = dict(replay(store, compute, whole_batch=True))
    assert compute.batches == [ITEMS]  # the same batch as an uninterrupted run sent
    assert results["i03"].data == {"n": -1}  # the stored result stands
    assert asyncio.run(store.get_result(JOB, "i03", "score"))["data"] == {"n": -1}  # type: ignore[index]
    again = CountingCompute()
    replay(store, again, whole_batch=True)
    assert again.batches == []


def test_a_refused_batch_ends_its_items_and_the_rest_with_filter_error(store: SqliteJobStore) -> None:
    with pytest.raises(ItemFailed, match="refused"):
        replay(store, CountingCompute(refuse_on=1), batch_size=4)
    stored = asyncio.run(store.get_results(JOB, ITEMS, "score"))
    errored = sorted(item for item, value in stored.items() if value["decision"]["filter"] == ERROR_FILTER)
    assert errored == ITEMS[4:]
    assert all(stored[item]["decision"]["filter"] != ERROR_FILTER for item in ITEMS[:4])


def test_a_refusal_propagates_when_the_caller_handles_it(store: SqliteJobStore) -> None:
    with pytest.raises(ServiceRefused):
        replay(store, CountingCompute(refuse_on=0), drop_refused=False)
    assert asyncio.run(store.get_results(JOB, ITEMS, "score")) == {}
