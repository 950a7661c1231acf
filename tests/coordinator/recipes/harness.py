"""Runs a recipe against deterministic DOUBLES of the services (unit tests
only: the real services are exercised by the integration and e2e tests), on a
real job store, and checks the lineage contract (docs/jobs.md, issue 10 item 6)
on what it stored."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from autodidact.coordinator.recipes.base import JobContext, ReviewGate, Services, StageResult
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.records import Record, job_records
from autodidact.coordinator.store import JobStore, SqliteJobStore

JOB = "job"
SEED = 7


def job_context(
    store: JobStore,
    services: dict[str, Any],
    max_in_flight: int = 2,
    max_error_fraction: float = 0.1,
    review: ReviewGate | None = None,
) -> JobContext:
    """The context of job JOB over `store`, calling the given service DOUBLES (None for the others), with `review` as its review gate."""

    def double(name: str) -> Any:
        # A DOUBLE duck-types its service's stub, so it is passed untyped; None where the recipe must not call that service.
        return services.get(name)

    stubs = Services(
        generator=double("generator"),
        dedup=double("dedup"),
        scorer=double("scorer"),
        tool_executor=double("tool_executor"),
        critic=double("critic"),
    )
    return JobContext(JOB, SEED, store, stubs, max_in_flight, lambda: None, max_error_fraction, review=review)


def run_recipe(
    tmp_path: Path,
    services: dict[str, Any],
    recipe: Recipe[Any],
    params: Any,
    max_in_flight: int = 2,
    max_error_fraction: float = 0.1,
    review: ReviewGate | None = None,
) -> tuple[dict[str, Any], JobStore]:
    """Runs `recipe` once on a fresh store (with `review` as its review gate); returns its summary and the store."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    asyncio.run(store.create_job(JOB, b"", "hash", 1))
    summary = asyncio.run(recipe.run(job_context(store, services, max_in_flight, max_error_fraction, review), params))
    return summary, store


def assert_lineage_agrees(store: JobStore, recipe: Recipe[Any], summary: dict[str, Any]) -> list[Record]:
    """Every item with a decision is one record with one final decision, and the stage counts are the records' counts."""
    records = asyncio.run(job_records(store, JOB, recipe.stages, recipe.final_stages, recipe.belongs(summary)))
    ids = [r.item_id for r in records]
    assert len(ids) == len(set(ids))
    decided = {item for item, _, value in asyncio.run(store.results(JOB)) if StageResult.from_json(value).decision is not None}
    assert decided == set(ids), f"decided but missing from lineage: {sorted(decided - set(ids))}"
    for record in records:
        drops = [i for i, (_, d) in enumerate(record.lineage) if not d.kept]
        if record.kept:
            assert not drops and record.lineage[-1][0] in recipe.final_stages, record
        else:
            assert drops == [len(record.lineage) - 1], record
    for counts in asyncio.run(store.stage_counts(JOB)):
        at_stage = [d for r in records for s, d in r.lineage if s == counts.stage]
        assert counts.done == len(at_stage), counts
        assert counts.kept == sum(d.kept for d in at_stage), counts
        assert counts.dropped_by_filter == dict(Counter(d.filter for d in at_stage if not d.kept)), counts
    return records
