"""Jobs: submission, the task that runs each one, progress, records and export.

A job's task is plain recipe code over a JobContext. Whatever the task stored
survives the process: on start the manager relaunches every job that was
PENDING or RUNNING, and the recipe replays what is stored. A FAILED or
CANCELLED job resumes the same way when retried (RetryJob, or the same id and
spec submitted again); items that errored are tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from autodidact.coordinator import export
from autodidact.coordinator.records import Record, job_records
from autodidact.coordinator.recipes.base import (
    DEFAULT_MAX_ERROR_FRACTION, ERROR_FILTER, MAX_ERROR_MESSAGES, PLAN_KEY, JobContext, Services,
)
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.coordinator.store import JobRow, JobStore
from autodidact.errors import AlreadyExists, AutodidactError, FailedPrecondition, InvalidArgument, NotFound
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2
from autodidact.validation import check_id, check_range

log = structlog.get_logger("autodidact.jobs")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    coordinator_pb2.JOB_STATE_PENDING,
    coordinator_pb2.JOB_STATE_RUNNING,
    coordinator_pb2.JOB_STATE_SUCCEEDED,
    coordinator_pb2.JOB_STATE_FAILED,
    coordinator_pb2.JOB_STATE_CANCELLED,
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PAGE_TOKEN_PATTERN = re.compile(r"[0-9]{1,18}\Z")
# Job-level values written when a job ends: the recipe's summary, and the error count.
SUMMARY_KEY, ERRORS_KEY = "summary", "errors"
RESUMABLE = (FAILED, CANCELLED)
# A prompt's tokens, estimated at submit without the model's tokenizer: a
# generous characters-per-token figure (English BPE averages about 4), so
# only a prompt that certainly cannot fit is refused.
CHARS_PER_TOKEN = 6
MODEL_INFO_SECONDS = 5.0
MODEL_INFO_RETRY_SECONDS = 60.0


def check_job_id(field: str, job_id: str) -> None:
    check_id(field, job_id)  # a job id names folders: "." and ".." are refused


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A spec as a dict (MessageToDict) flattened to dotted field paths."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: value}


def _other_spec_message(job_id: str, existing: JobRow, spec: coordinator_pb2.JobSpec) -> str:
    """ALREADY_EXISTS naming the spec fields that differ, so the caller sees what changed."""
    old = _flat(json_format.MessageToDict(coordinator_pb2.JobSpec.FromString(existing.spec), preserving_proto_field_name=True))
    new = _flat(json_format.MessageToDict(spec, preserving_proto_field_name=True))
    differing = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    shown = ", ".join(differing[:10]) + (f" and {len(differing) - 10} more" if len(differing) > 10 else "")
    return f"job {job_id!r} exists with another spec (fields that differ: {shown}); choose another job_id"


def validate_spec(spec: coordinator_pb2.JobSpec, job_id: str) -> Any:
    """Checks a spec at submission; returns the recipe's resolved parameters."""
    recipe = spec.WhichOneof("recipe")
    if recipe is None:
        raise InvalidArgument("spec.recipe", f"is required: set one of {', '.join(RECIPES)}")
    check_range("spec.max_in_flight", spec.max_in_flight or 4, 1, 256)
    check_range("spec.max_error_fraction", max_error_fraction(spec), 0.0, 1.0)
    return RECIPES[recipe].resolve(getattr(spec, recipe), job_id)


def max_error_fraction(spec: coordinator_pb2.JobSpec) -> float:
    return spec.max_error_fraction if spec.HasField("max_error_fraction") else DEFAULT_MAX_ERROR_FRACTION


def check_against_model(spec: coordinator_pb2.JobSpec, params: Any, context_length: int) -> None:
    """What the generator's model decides, checked at submit: every sampling's
    max_tokens within the context, and every prompt known now with room for
    its max_tokens. Raises InvalidArgument naming the field."""
    recipe = spec.WhichOneof("recipe")
    for name, value in vars(params).items():
        if isinstance(value, common_pb2.SamplingParams) and value.max_tokens > context_length:
            raise InvalidArgument(
                f"spec.{recipe}.{name}.max_tokens",
                f"must be at most the generator's context length, {context_length:,} tokens, got {value.max_tokens:,}",
            )
    for field, prompt, max_tokens in recipe_of(spec).prompts(params):
        estimate = len(prompt) // CHARS_PER_TOKEN
        if estimate + max_tokens > context_length:
            raise InvalidArgument(
                field,
                f"a prompt of {len(prompt):,} characters (at least ~{estimate:,} tokens) plus max_tokens {max_tokens:,} "
                f"does not fit the generator's context of {context_length:,} tokens",
            )


def recipe_of(spec: coordinator_pb2.JobSpec) -> Recipe[Any]:
    return RECIPES[spec.WhichOneof("recipe") or "self_instruct"]


def spec_hash(spec: coordinator_pb2.JobSpec) -> str:
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


class JobManager:
    def __init__(self, store: JobStore, services: Services, data_dir: Path) -> None:
        self._store = store
        self._services = services
        self._data_dir = data_dir
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._context_length: int | None = None  # the generator's, asked once
        self._ask_generator_after = 0.0  # loop time; set after the generator did not answer

    # --- lifecycle ---

    async def resume_unfinished(self) -> None:
        for row in await self._store.jobs_in_states((PENDING, RUNNING)):
            log.info("resuming job", job_id=row.id)
            self._launch(row.id)

    async def close(self) -> None:
        """Stops every job task; their state stays RUNNING and they resume at the next start."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # --- API ---

    async def submit(self, job_id: str, spec: coordinator_pb2.JobSpec) -> tuple[coordinator_pb2.Job, bool, bool]:
        """(job, created, resumed): the same id and spec again resumes a FAILED or CANCELLED job."""
        check_job_id("job_id", job_id)
        existing = await self._store.get_job(job_id)
        digest = spec_hash(spec)
        if existing is not None:
            if existing.spec_hash != digest:
                raise AlreadyExists(_other_spec_message(job_id, existing, spec))
            if existing.state in RESUMABLE:
                return await self.retry(job_id), False, True
            return await self.get(job_id), False, False
        # Reading and checking the input files can take a while (up to the item bounds): off the loop.
        params = await asyncio.to_thread(validate_spec, spec, job_id)
        context_length = await self._generator_context()
        if context_length is not None:
            check_against_model(spec, params, context_length)
        row, created = await self._store.create_job(job_id, spec.SerializeToString(deterministic=True), digest, PENDING)
        if not created and row.spec_hash != digest:  # a concurrent submission won the id
            raise AlreadyExists(_other_spec_message(job_id, row, spec))
        if created:
            log.info("job submitted", job_id=job_id, recipe=spec.WhichOneof("recipe"))
            self._launch(job_id)
        return await self.get(job_id), created, False

    async def retry(self, job_id: str) -> coordinator_pb2.Job:
        """Resumes a FAILED or CANCELLED job from what it stored. Errored
        items and the end-of-job records are forgotten, so they are done again."""
        row = await self._row(job_id)
        if row.state not in RESUMABLE:
            raise FailedPrecondition(
                f"job {job_id!r} is {coordinator_pb2.JobState.Name(row.state)}; only a FAILED or CANCELLED job can be retried"
            )
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            raise FailedPrecondition(f"job {job_id!r} is still stopping; retry shortly")
        self._cancel_requested.discard(job_id)
        await self._store.delete_results(job_id, filter_=ERROR_FILTER)
        await self._store.delete_value(job_id, SUMMARY_KEY)
        await self._store.delete_value(job_id, ERRORS_KEY)
        await self._store.set_state(job_id, PENDING)
        log.info("job retried", job_id=job_id, was=coordinator_pb2.JobState.Name(row.state))
        self._launch(job_id)
        self._notify(job_id)
        return await self.get(job_id)

    async def _generator_context(self) -> int | None:
        """The generator model's context length, asked once; None when the
        generator does not answer now (the run then meets any limit per item)."""
        loop = asyncio.get_running_loop()
        if self._context_length is None and loop.time() >= self._ask_generator_after:
            try:
                info = await self._services.generator.GetModelInfo(generator_pb2.GetModelInfoRequest(), timeout=MODEL_INFO_SECONDS)
            except grpc.aio.AioRpcError as exc:
                # Not asked again for a while: submissions meanwhile do not each wait out the timeout.
                self._ask_generator_after = loop.time() + MODEL_INFO_RETRY_SECONDS
                log.warning("generator model unknown at submit; its limits are checked when the job runs", code=exc.code().name)
                return None
            self._context_length = info.model.context_length or None
        return self._context_length

    async def get(self, job_id: str) -> coordinator_pb2.Job:
        return await self._job_proto(await self._row(job_id))

    async def list(self, page_size: int, page_token: str) -> tuple[list[coordinator_pb2.Job], str]:
        size = page_size or 50
        check_range("page_size", size, 1, 1000)
        # A token is a job's sequence number; anything else (a huge number would overflow
        # SQLite's integers) was not written by ListJobs.
        if page_token and not PAGE_TOKEN_PATTERN.match(page_token):
            raise InvalidArgument("page_token", "is not a token from a previous ListJobs response")
        rows = await self._store.list_jobs(size + 1, int(page_token) if page_token else None)
        next_token = str(rows[size - 1].seq) if len(rows) > size else ""
        return [await self._job_proto(row) for row in rows[:size]], next_token

    async def cancel(self, job_id: str) -> coordinator_pb2.Job:
        row = await self._row(job_id)
        if row.state not in TERMINAL:
            self._cancel_requested.add(job_id)
            task = self._tasks.get(job_id)
            if task is not None:
                task.cancel()
            await self._store.set_state(job_id, CANCELLED)
            self._notify(job_id)
        return await self.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[coordinator_pb2.Job]:
        """The job now, then after every change (at most every 0.2 s), until it ends."""
        await self._row(job_id)
        last = None
        while True:
            event = self._changed.setdefault(job_id, asyncio.Event())
            event.clear()
            job = await self.get(job_id)
            snapshot = job.SerializeToString(deterministic=True)
            if snapshot != last:
                last = snapshot
                yield job
            if job.state in TERMINAL:
                return
            try:
                await asyncio.wait_for(event.wait(), timeout=5.0)
            except TimeoutError:
                pass
            await asyncio.sleep(0.2)

    async def records(self, job_id: str) -> list[Record]:
        recipe = recipe_of(coordinator_pb2.JobSpec.FromString((await self._row(job_id)).spec))
        summary = await self._store.get_value(job_id, SUMMARY_KEY)
        belongs = recipe.belongs(summary) if summary is not None else (lambda _: True)
        return await job_records(self._store, job_id, recipe.stages, recipe.final_stages, belongs)

    async def export(self, job_id: str) -> list[coordinator_pb2.ExportedFile]:
        row = await self._row(job_id)
        if row.state not in (SUCCEEDED, CANCELLED):
            raise FailedPrecondition(
                f"job {job_id!r} is {coordinator_pb2.JobState.Name(row.state)}; only a succeeded or cancelled job can be exported"
                + (" (RetryJob resumes a failed one)" if row.state == FAILED else "")
            )
        return await self._write_dataset(row)

    async def _write_dataset(self, row: JobRow) -> list[coordinator_pb2.ExportedFile]:
        job_id = row.id
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        partial = row.state == CANCELLED  # what a cancelled job finished, no more
        directory = Path(spec.output_dir) if spec.output_dir else self._data_dir / "jobs" / job_id / "dataset"
        directory.mkdir(parents=True, exist_ok=True)
        export.remove_temporary_files(directory)
        records = await self.records(job_id)
        files = []
        tables = recipe_of(spec).dataset_tables(records)
        for name, (rows, schema) in tables.items():
            rows = export.conform(rows, schema)
            export.write_jsonl(directory / f"{name}.jsonl", rows)
            export.write_parquet(directory / f"{name}.parquet", rows, schema)
            files += [
                coordinator_pb2.ExportedFile(path=str(directory / f"{name}.jsonl"), kind=f"{name}_jsonl", rows=len(rows)),
                coordinator_pb2.ExportedFile(path=str(directory / f"{name}.parquet"), kind=f"{name}_parquet", rows=len(rows)),
            ]
        lineage = export.lineage_rows(records)
        export.write_jsonl(directory / "lineage.jsonl", lineage)
        files.append(coordinator_pb2.ExportedFile(path=str(directory / "lineage.jsonl"), kind="lineage_jsonl", rows=len(lineage)))
        job = await self.get(job_id)
        summary = await self._store.get_value(job_id, SUMMARY_KEY) or {}
        models = sorted({d.model for r in records for _, d in r.lineage if d.model})
        card = export.write_dataset_card(
            directory, job_id, spec.WhichOneof("recipe") or "", {n: (schema, len(rows)) for n, (rows, schema) in tables.items()}, partial
        )
        files.append(coordinator_pb2.ExportedFile(path=str(card), kind="dataset_card"))
        manifest = export.write_manifest(
            directory,
            {
                "job_id": job_id,
                "recipe": spec.WhichOneof("recipe"),
                "state": coordinator_pb2.JobState.Name(row.state).removeprefix("JOB_STATE_"),
                "partial": partial,
                "spec": export.message_json(spec),
                "models": models,
                "template_versions": sorted({d.template_version for r in records for _, d in r.lineage if d.template_version}),
                "summary": summary,
                "errors": await self._errors(job_id, spec, records),
                "stages": [export.message_json(stage, zeros=True) for stage in job.stages],
                "files": [export.message_json(f, zeros=True) for f in files],
            },
        )
        files.append(coordinator_pb2.ExportedFile(path=str(manifest), kind="manifest"))
        return files

    async def _errors(self, job_id: str, spec: coordinator_pb2.JobSpec, records: list[Record]) -> dict[str, Any]:
        """The manifest's error report: how many items a service refused, of how many, and a few messages."""
        stored = await self._store.get_value(job_id, ERRORS_KEY)
        if stored is not None:
            counted = stored
        else:  # a cancelled job: count what its lineage shows
            errored = [d.reason for r in records for _, d in r.lineage if d.filter == ERROR_FILTER]
            counted = {"count": len(errored), "items": len(records), "messages": errored[:MAX_ERROR_MESSAGES]}
        items = counted["items"]
        return {
            **counted,
            "fraction": counted["count"] / items if items else 0.0,
            "max_error_fraction": max_error_fraction(spec),
        }

    # --- internals ---

    async def _row(self, job_id: str) -> JobRow:
        row = await self._store.get_job(job_id)
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return row

    def _notify(self, job_id: str) -> None:
        event = self._changed.get(job_id)
        if event is not None:
            event.set()

    def _launch(self, job_id: str) -> None:
        self._tasks[job_id] = asyncio.create_task(self._run(job_id), name=f"job {job_id}")

    async def _run(self, job_id: str) -> None:
        row = await self._row(job_id)
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                params = await asyncio.to_thread(validate_spec, spec, job_id)
                await self._store.set_state(job_id, RUNNING)
                self._notify(job_id)
                in_flight = spec.max_in_flight or 4
                ctx = JobContext(
                    job_id, spec.seed, self._store, self._services, in_flight, lambda: self._notify(job_id), max_error_fraction(spec)
                )
                summary = await recipe_of(spec).run(ctx, params)
                ctx.check_error_budget()  # each_item checked its own; this covers items run through ctx.item
                errors = {"count": len(ctx.errors), "items": ctx.items, "messages": ctx.errors[:MAX_ERROR_MESSAGES]}
                await self._store.put_value(job_id, ERRORS_KEY, errors)
                await self._store.put_value(job_id, SUMMARY_KEY, summary)
                # The dataset is written before the job says SUCCEEDED: a failed write fails the job
                # visibly, and a crash in between resumes the job, which replays and writes again.
                await self._write_dataset(await self._row(job_id))
                await self._store.set_state(job_id, SUCCEEDED)
                self._notify(job_id)
                log.info("job succeeded", **summary)
            except asyncio.CancelledError:
                if job_id in self._cancel_requested:
                    log.info("job cancelled")
                raise  # otherwise the coordinator is stopping: the job stays RUNNING and resumes
            except AutodidactError as exc:
                await self._fail(job_id, str(exc))
            except grpc.aio.AioRpcError as exc:
                await self._fail(job_id, f"a service answered {exc.code().name}: {exc.details()}")
            except Exception as exc:  # a bug: fail the job, keep the coordinator
                log.exception("job crashed")
                await self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}")

    async def _fail(self, job_id: str, message: str) -> None:
        log.warning("job failed", error=message)
        await self._store.set_state(job_id, FAILED, message)
        self._notify(job_id)

    async def _job_proto(self, row: JobRow) -> coordinator_pb2.Job:
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        job = coordinator_pb2.Job(id=row.id, spec=spec, state=row.state, error=row.error)  # type: ignore[arg-type]
        job.created_at.FromNanoseconds(int(row.created_at * 1e9))
        job.updated_at.FromNanoseconds(int(row.updated_at * 1e9))
        counts = {c.stage: c for c in await self._store.stage_counts(row.id)}
        recipe = recipe_of(spec)
        for stage in recipe.stages:
            if stage not in counts:
                continue
            c = counts[stage]
            progress = coordinator_pb2.StageProgress(stage=stage, done=c.done, kept=c.kept, dropped_by_filter=c.dropped_by_filter)
            if stage == "dataset":
                plan = await self._store.get_value(row.id, PLAN_KEY)
                total = recipe.target(getattr(spec, recipe.name)) if plan is None else plan["dataset_items"]
                if total is not None:
                    # A target (Self-Instruct's target_instructions) bounds what is kept, not what
                    # is decided: the round that reaches it can bring more candidates, which end
                    # as over_target. Total then counts them too, so done never passes it.
                    progress.total = max(total, c.done)
            job.stages.append(progress)
        return job
