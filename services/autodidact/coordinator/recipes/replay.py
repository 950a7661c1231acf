"""Batched replay: the results of many items at one stage, computing only
what is not stored yet, in batches, and storing each result as it comes.

Recipes decide many items with one service call (a dedup batch, a batch of
tool calls, a scorer filter). A job resumed after a crash must not pay for
the items already decided, and must not decide one twice. `replay_batched`
is that loop, written once: read the stage's stored results in one query,
compute the missing ones in batches, record each, and return every item's
result in the items' order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from autodidact.coordinator.recipes.base import JobContext, ServiceRefused, StageResult

T = TypeVar("T")


async def replay_batched(
    ctx: JobContext,
    stage: str,
    items: Sequence[T],
    item_id: Callable[[T], str],
    compute: Callable[[list[T]], Awaitable[list[StageResult]]],
    *,
    batch_size: int = 0,
    whole_batch: bool = False,
    drop_refused: bool = True,
) -> list[tuple[T, StageResult]]:
    """(item, result at `stage`) for every item, in order.

    `compute(batch)` returns one result per item of the batch, in its order;
    `batch_size` bounds a batch (0: all pending items in one). With
    `whole_batch`, a call always carries every item when any is missing: for
    a service whose batch is idempotent as a whole (dedup's batch id), so a
    resumed call repeats the first one exactly; only the missing results are
    recorded. A batch a service refuses ends, with `drop_refused`, every
    pending item from it on with filter `error` (ItemFailed is raised);
    without it the refusal propagates for the caller to handle."""
    if not items:
        return []
    ids = [item_id(item) for item in items]
    results = await ctx.stored_many(ids, stage)
    pending = [item for item, key in zip(items, ids, strict=True) if key not in results]
    if pending and whole_batch:
        pending = list(items)
    size = batch_size or max(len(pending), 1)
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        try:
            async with ctx.limited(stage):  # the batch's calls adapt the stage's concurrency, as single items' do
                computed = await compute(batch)
        except ServiceRefused as exc:
            if not drop_refused:
                raise
            raise await ctx.drop_refused([item_id(item) for item in pending[start:]], stage, exc) from exc
        if len(computed) != len(batch):
            raise ValueError(f"{stage}: {len(computed)} results for a batch of {len(batch)} items")
        new = {key: result for key, result in zip(map(item_id, batch), computed, strict=True) if key not in results}
        # Recorded together: the store commits writes that arrive together in one transaction.
        await asyncio.gather(*(ctx.record(key, stage, result) for key, result in new.items()))
        results |= new
    return [(item, results[key]) for item, key in zip(items, ids, strict=True)]
