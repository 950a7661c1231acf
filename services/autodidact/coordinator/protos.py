"""The coordinator's API messages made from what the store holds: a job with
its progress (Job, StageProgress), a record (JobRecord), and the job states.
Pure functions: whoever calls them has read the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import struct_pb2

from autodidact.coordinator.recipes.base import DEFAULT_MAX_ERROR_FRACTION
from autodidact.coordinator.records import Record
from autodidact.coordinator.store import JobRow, StageCounts
from autodidact.v1 import coordinator_pb2

if TYPE_CHECKING:  # the registry imports every recipe
    from autodidact.coordinator.recipes.recipe import Recipe

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    coordinator_pb2.JOB_STATE_PENDING,
    coordinator_pb2.JOB_STATE_RUNNING,
    coordinator_pb2.JOB_STATE_SUCCEEDED,
    coordinator_pb2.JOB_STATE_FAILED,
    coordinator_pb2.JOB_STATE_CANCELLED,
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def state_name(state: int) -> str:
    """SUCCEEDED, not JOB_STATE_SUCCEEDED: how messages and the manifest name a state."""
    return coordinator_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def max_error_fraction(spec: coordinator_pb2.JobSpec) -> float:
    return spec.max_error_fraction if spec.HasField("max_error_fraction") else DEFAULT_MAX_ERROR_FRACTION


def progress_stage(recipe: Recipe[Any]) -> str:
    """The stage whose progress has a total: a recipe's last stage decides
    whether an item is in its dataset, and its target or plan counts those items."""
    return recipe.stages[-1]


def job_message(
    row: JobRow, spec: coordinator_pb2.JobSpec, recipe: Recipe[Any], counts: list[StageCounts], total: int | None
) -> coordinator_pb2.Job:
    """The job as GetJob and WatchJob send it: one StageProgress per stage
    that decided something, in the recipe's order. `total` is the number of
    dataset items the job aims at (its target or stored plan), None when unknown."""
    job = coordinator_pb2.Job(id=row.id, spec=spec, state=row.state, error=row.error)  # type: ignore[arg-type]
    job.created_at.FromNanoseconds(int(row.created_at * 1e9))
    job.updated_at.FromNanoseconds(int(row.updated_at * 1e9))
    by_stage = {c.stage: c for c in counts}
    counted = progress_stage(recipe)
    for stage in recipe.stages:
        if stage not in by_stage:
            continue
        c = by_stage[stage]
        progress = coordinator_pb2.StageProgress(stage=stage, done=c.done, kept=c.kept, dropped_by_filter=c.dropped_by_filter)
        if stage == counted and total is not None:
            # A target (Self-Instruct's target_instructions) bounds what is kept, not what
            # is decided: the round that reaches it can bring more candidates, which end
            # as over_target. Total then counts them too, so done never passes it.
            progress.total = max(total, c.done)
        job.stages.append(progress)
    return job


def record_message(record: Record) -> coordinator_pb2.JobRecord:
    """A record as StreamSamples sends it: its data and every decision, in stage order."""
    data = struct_pb2.Struct()
    data.update(record.data)
    message = coordinator_pb2.JobRecord(item_id=record.item_id, kept=record.kept, data=data)
    for stage, decision in record.lineage:
        entry = message.lineage.add(
            stage=stage,
            kept=decision.kept,
            filter=decision.filter,
            reason=decision.reason,
            template_version=decision.template_version,
            decided_by=decision.decided_by,
            reviewer=decision.reviewer,
            note=decision.note,
        )
        if decision.score is not None:
            entry.score = decision.score
        if decision.seed is not None:
            entry.seed = decision.seed
        if decision.model:
            entry.model.model = decision.model
    return message
