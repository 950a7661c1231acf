"""A job's candidates as records: their data and every decision about them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autodidact.coordinator.recipes.base import Decision, StageResult
from autodidact.coordinator.store import JobStore

if TYPE_CHECKING:  # the registry imports every recipe, and a recipe may use Record
    from autodidact.coordinator.recipes.recipe import Recipe

# Job-level values written when a job ends: the recipe's summary, and the error report.
SUMMARY_KEY, ERRORS_KEY = "summary", "errors"


@dataclass(frozen=True)
class Record:
    item_id: str
    kept: bool
    data: dict[str, Any]
    lineage: list[tuple[str, Decision]]


def _every_item(item_id: str) -> bool:
    return True


async def dataset_members(store: JobStore, job_id: str, recipe: Recipe[Any]) -> Callable[[str], bool]:
    """Which item ids belong to the dataset: the recipe says from its summary
    once the job has one (it ended); until then every item does."""
    summary = await store.get_value(job_id, SUMMARY_KEY)
    return _every_item if summary is None else recipe.belongs(summary)


async def job_records(
    store: JobStore, job_id: str, stages: tuple[str, ...], final_stages: tuple[str, ...], belongs: Callable[[str], bool] = _every_item
) -> list[Record]:
    """Every record of iter_records, as a list."""
    return [record async for record in iter_records(store, job_id, stages, final_stages, belongs)]


async def iter_records(
    store: JobStore, job_id: str, stages: tuple[str, ...], final_stages: tuple[str, ...], belongs: Callable[[str], bool] = _every_item
) -> AsyncIterator[Record]:
    """Every decided item that `belongs` to the dataset, in item order; kept
    means its final stage (the first of final_stages it has) kept it. Items still in flight are left out, and so
    are items the recipe says do not belong (rounds started past the target). One item's results are held at a time."""
    current: str | None = None
    results: dict[str, StageResult] = {}
    async for item_id, stage, value in store.iter_results(job_id):
        if item_id != current:
            if current is not None and (record := assemble(current, results, stages, final_stages, belongs)) is not None:
                yield record
            current, results = item_id, {}
        results[stage] = StageResult.from_json(value)
    if current is not None and (record := assemble(current, results, stages, final_stages, belongs)) is not None:
        yield record


def assemble(
    item_id: str, results: dict[str, StageResult], stages: tuple[str, ...], final_stages: tuple[str, ...], belongs: Callable[[str], bool]
) -> Record | None:
    """One item's record from its stored results; None when it is not (yet) a record."""
    if not belongs(item_id):
        return None
    lineage = [(stage, decision) for stage in stages if stage in results and (decision := results[stage].decision) is not None]
    if not lineage:
        return None  # results that decide nothing (a raw generation)
    final = next((results[s] for s in final_stages if s in results), None)
    if final is None and lineage[-1][1].kept:
        return None  # still in flight
    data: dict[str, Any] = {}
    for stage in stages:
        if stage in results:
            data.update({k: v for k, v in results[stage].data.items() if k not in ("raw",)})
    return Record(item_id, final is not None and bool(final.decision and final.decision.kept), data, lineage)
