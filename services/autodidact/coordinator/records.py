"""A job's candidates as records: their data and every decision about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autodidact.coordinator.recipes.base import Decision, StageResult
from autodidact.coordinator.store import JobStore


@dataclass(frozen=True)
class Record:
    item_id: str
    kept: bool
    data: dict[str, Any]
    lineage: list[tuple[str, Decision]]


def job_records(
    store: JobStore, job_id: str, stages: tuple[str, ...], final_stages: tuple[str, ...], belongs: Callable[[str], bool] = lambda _: True
) -> list[Record]:
    """Every decided item that `belongs` to the dataset, in item order; kept
    means its final stage (the first of final_stages it has) kept it. Items still in flight are left out, and so
    are items the recipe says do not belong (rounds started past the target)."""
    by_item: dict[str, dict[str, StageResult]] = {}
    for item_id, stage, value in store.results(job_id):
        by_item.setdefault(item_id, {})[stage] = StageResult.from_json(value)
    records = []
    for item_id, results in by_item.items():
        if not belongs(item_id):
            continue
        lineage = [(stage, results[stage].decision) for stage in stages if stage in results and results[stage].decision]
        if not lineage:
            continue  # results that decide nothing (a raw generation)
        final = next((results[s] for s in final_stages if s in results), None)
        last_kept = lineage[-1][1].kept  # type: ignore[union-attr]
        if final is None and last_kept:
            continue  # still in flight
        data: dict[str, Any] = {}
        for stage in stages:
            if stage in results:
                data.update({k: v for k, v in results[stage].data.items() if k not in ("raw",)})
        records.append(Record(item_id, final is not None and bool(final.decision and final.decision.kept), data, lineage))  # type: ignore[misc]
    return records
