"""StreamSamples: a job's records as they are decided, read from the store's cursor.

A follower remembers the cursor of the last result it read and the results
of the items not yet decided. Each read asks the store only for the results
written since (`results_since`) and assembles only the items those touch, so
a job of N results costs O(N) reads in all, however often it changes (not a
re-read of every record per change).

Each item is sent once, when it is decided (kept at a final stage, or
dropped), in the order of the results that decided them: the store's write
order. An item decided before the stream began comes first, in the same
order. While the job runs every item belongs to the dataset; once it ended,
the recipe's summary says which do (`records.dataset_members`), and an item
sent before that is not taken back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from autodidact.coordinator.protos import TERMINAL
from autodidact.coordinator.recipes.base import StageResult
from autodidact.coordinator.records import Record, assemble, dataset_members
from autodidact.coordinator.store import JobStore

if TYPE_CHECKING:
    from autodidact.coordinator.jobs import JobChanges
    from autodidact.coordinator.recipes.recipe import Recipe

# Results per store read.
BATCH = 2048
# Records assembled between two yields to the event loop: a follower catching up on a
# large job must not hold the loop (Watch, GetJob, the job itself) for a whole batch.
RECORDS_PER_TURN = 64


class SampleFollower:
    """Reads a job's results from a cursor on and assembles the items they decide, each once."""

    def __init__(self, store: JobStore, job_id: str, stages: tuple[str, ...], final_stages: tuple[str, ...]) -> None:
        self._store = store
        self._job_id = job_id
        self._stages = stages
        self._final_stages = final_stages
        self.cursor = 0  # the last result read
        self._undecided: dict[str, dict[str, StageResult]] = {}  # results of items read but not decided yet
        self._finished: set[str] = set()  # items sent, or left out; a later result of theirs is ignored

    async def read_new(self, belongs: Callable[[str], bool]) -> AsyncIterator[Record]:
        """The records decided by the results written since the last read, until the store has no newer one."""
        while True:
            rows = await self._store.results_since(self._job_id, self.cursor, BATCH)
            touched: dict[str, None] = {}  # ordered by each item's last result in this batch
            for cursor, item_id, stage, value in rows:
                self.cursor = cursor
                if item_id in self._finished:
                    continue
                self._undecided.setdefault(item_id, {})[stage] = StageResult.from_json(value)
                touched.pop(item_id, None)
                touched[item_id] = None
            for turn, item_id in enumerate(touched, 1):
                if turn % RECORDS_PER_TURN == 0:
                    await asyncio.sleep(0)
                if not belongs(item_id):  # (only once the job ended) never a record
                    del self._undecided[item_id]
                    self._finished.add(item_id)
                    continue
                record = assemble(item_id, self._undecided[item_id], self._stages, self._final_stages, belongs)
                if record is not None:
                    del self._undecided[item_id]
                    self._finished.add(item_id)
                    yield record
            if len(rows) < BATCH:
                return


async def stream_records(
    store: JobStore, job_id: str, recipe: Recipe[Any], *, include_dropped: bool, changes: JobChanges | None
) -> AsyncIterator[Record]:
    """The job's decided records (kept only, unless include_dropped); with
    `changes` (follow), then every record decided later, until the job ends."""
    follower = SampleFollower(store, job_id, recipe.stages, recipe.final_stages)
    loop = asyncio.get_running_loop()
    while True:
        seen = 0 if changes is None else changes.version(job_id)
        read_at = loop.time()
        # The state before the results: what a job stored before it ended is read below.
        row = await store.get_job(job_id)
        ended = row is None or row.state in TERMINAL
        belongs = await dataset_members(store, job_id, recipe)
        async for record in follower.read_new(belongs):
            if record.kept or include_dropped:
                yield record
        if changes is None or ended:
            return
        await changes.wait(job_id, seen, read_at)
