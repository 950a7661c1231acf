"""Jobs: submission, the task that runs each one, and watching them.

A job's task is plain recipe code over a JobContext. Whatever the task stored
survives the process: on start the manager relaunches every job that was
PENDING or RUNNING, and the recipe replays what is stored. A FAILED or
CANCELLED job resumes the same way when retried (RetryJob, or the same id and
spec submitted again); items that errored are tried again.

The API's messages are made in protos.py, the dataset is written by
export.py, and StreamSamples reads records in samples.py; this module knows
no recipe and no stage by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from autodidact.coordinator import export, samples
from autodidact.coordinator.protos import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    job_message,
    max_error_fraction,
    progress_stage,
    state_name,
)
from autodidact.coordinator.recipes.base import ERROR_FILTER, MAX_ERROR_MESSAGES, PLAN_KEY, JobContext, Services
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.coordinator.records import ERRORS_KEY, SUMMARY_KEY, Record
from autodidact.coordinator.store import JobRow, JobStore
from autodidact.errors import AlreadyExists, AutodidactError, FailedPrecondition, InvalidArgument, NotFound
from autodidact.runtime.neighbours import rpc_error_text
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2
from autodidact.validation import check_id, check_range

log = structlog.get_logger("autodidact.jobs")

PAGE_TOKEN_PATTERN = re.compile(r"[0-9]{1,18}\Z")
RESUMABLE = (FAILED, CANCELLED)
# A prompt's tokens, estimated at submit without the model's tokenizer: a
# generous characters-per-token figure (English BPE averages about 4), so
# only a prompt that certainly cannot fit is refused.
CHARS_PER_TOKEN = 6
MODEL_INFO_SECONDS = 5.0
MODEL_INFO_RETRY_SECONDS = 60.0
# A watcher (WatchJob, StreamSamples with follow) reads the store at most this often however fast
# the job changes, and at least this often while it runs even when it hears of no change.
WATCH_MIN_INTERVAL_SECONDS = 0.2
WATCH_MAX_INTERVAL_SECONDS = 1.0


class JobChanges:
    """Wakes the watchers of a job when it changes (a result stored, a new
    state). Every watcher sees every change: each remembers the version it
    read at, and waits only when nothing changed since. A notification costs
    a counter, so a job can send one per stored result."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, job_id: str) -> None:
        self._versions[job_id] = self._versions.get(job_id, 0) + 1
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    def version(self, job_id: str) -> int:
        return self._versions.get(job_id, 0)

    async def wait(self, job_id: str, seen: int, read_at: float) -> None:
        """Returns once the job changed after version `seen` (or
        WATCH_MAX_INTERVAL_SECONDS after `read_at`, the loop time of the last
        read), but not before WATCH_MIN_INTERVAL_SECONDS after it: changes coalesce."""
        loop = asyncio.get_running_loop()
        if self.version(job_id) == seen:
            event = self._events.setdefault(job_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(0.0, read_at + WATCH_MAX_INTERVAL_SECONDS - loop.time()))
        await asyncio.sleep(max(0.0, read_at + WATCH_MIN_INTERVAL_SECONDS - loop.time()))


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
        self._changes = JobChanges()
        self._planned_items: dict[str, int] = {}  # each job's stored plan, once read
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
            raise FailedPrecondition(f"job {job_id!r} is {state_name(row.state)}; only a FAILED or CANCELLED job can be retried")
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            raise FailedPrecondition(f"job {job_id!r} is still stopping; retry shortly")
        self._cancel_requested.discard(job_id)
        await self._store.delete_results(job_id, filter_=ERROR_FILTER)
        await self._store.delete_value(job_id, SUMMARY_KEY)
        await self._store.delete_value(job_id, ERRORS_KEY)
        await self._store.set_state(job_id, PENDING)
        log.info("job retried", job_id=job_id, was=state_name(row.state))
        self._launch(job_id)
        self._changes.notify(job_id)
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
        return await self._job_message(await self._row(job_id))

    async def list_jobs(self, page_size: int, page_token: str) -> tuple[list[coordinator_pb2.Job], str]:
        size = page_size or 50
        check_range("page_size", size, 1, 1000)
        # A token is a job's sequence number; anything else (a huge number would overflow
        # SQLite's integers) was not written by ListJobs.
        if page_token and not PAGE_TOKEN_PATTERN.match(page_token):
            raise InvalidArgument("page_token", "is not a token from a previous ListJobs response")
        rows = await self._store.list_jobs(size + 1, int(page_token) if page_token else None)
        next_token = str(rows[size - 1].seq) if len(rows) > size else ""
        return [await self._job_message(row) for row in rows[:size]], next_token

    async def cancel(self, job_id: str) -> coordinator_pb2.Job:
        row = await self._row(job_id)
        if row.state not in TERMINAL:
            self._cancel_requested.add(job_id)
            task = self._tasks.get(job_id)
            if task is not None:
                task.cancel()
            await self._store.set_state(job_id, CANCELLED)
            self._changes.notify(job_id)
        return await self.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[coordinator_pb2.Job]:
        """The job now, then after every change until it ends: one read of
        the job and its stage counters per wake-up (JobChanges coalesces
        them), never of its results."""
        await self._row(job_id)
        loop = asyncio.get_running_loop()
        last = None
        while True:
            seen = self._changes.version(job_id)
            read_at = loop.time()
            job = await self.get(job_id)
            snapshot = job.SerializeToString(deterministic=True)
            if snapshot != last:
                last = snapshot
                yield job
            if job.state in TERMINAL:
                return
            await self._changes.wait(job_id, seen, read_at)

    async def samples(self, job_id: str, follow: bool, include_dropped: bool) -> AsyncIterator[Record]:
        """The job's decided records (samples.py says in which order); with
        `follow`, then each record as it is decided, until the job ends."""
        recipe = recipe_of(coordinator_pb2.JobSpec.FromString((await self._row(job_id)).spec))
        async for record in samples.stream_records(
            self._store, job_id, recipe, include_dropped=include_dropped, changes=self._changes if follow else None
        ):
            yield record

    async def export(self, job_id: str) -> list[coordinator_pb2.ExportedFile]:
        row = await self._row(job_id)
        if row.state not in (SUCCEEDED, CANCELLED):
            raise FailedPrecondition(
                f"job {job_id!r} is {state_name(row.state)}; only a succeeded or cancelled job can be exported"
                + (" (RetryJob resumes a failed one)" if row.state == FAILED else "")
            )
        return await self._write_dataset(row)

    # --- internals ---

    async def _row(self, job_id: str) -> JobRow:
        row = await self._store.get_job(job_id)
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return row

    async def _job_message(self, row: JobRow) -> coordinator_pb2.Job:
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        recipe = recipe_of(spec)
        counts = await self._store.stage_counts(row.id)
        total = None
        if any(c.stage == progress_stage(recipe) for c in counts):
            # The plan the running recipe stored (write-once, so read until found) says
            # how many items its dataset has; a recipe without one has a target, or neither.
            if row.id not in self._planned_items:
                plan = await self._store.get_value(row.id, PLAN_KEY)
                if plan is not None:
                    self._planned_items[row.id] = plan["dataset_items"]
            total = self._planned_items.get(row.id, recipe.target(getattr(spec, recipe.name)))
        return job_message(row, spec, recipe, counts, total)

    async def _write_dataset(self, row: JobRow) -> list[coordinator_pb2.ExportedFile]:
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        directory = Path(spec.output_dir) if spec.output_dir else self._data_dir / "jobs" / row.id / "dataset"
        return await export.write_dataset(self._store, await self._job_message(row), recipe_of(spec), directory)

    def _launch(self, job_id: str) -> None:
        self._tasks[job_id] = asyncio.create_task(self._run(job_id), name=f"job {job_id}")

    async def _run(self, job_id: str) -> None:
        row = await self._row(job_id)
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                params = await asyncio.to_thread(validate_spec, spec, job_id)
                await self._store.set_state(job_id, RUNNING)
                self._changes.notify(job_id)
                in_flight = spec.max_in_flight or 4
                ctx = JobContext(
                    job_id,
                    spec.seed,
                    self._store,
                    self._services,
                    in_flight,
                    lambda: self._changes.notify(job_id),
                    max_error_fraction(spec),
                    fresh=not await self._store.has_results(job_id),
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
                self._changes.notify(job_id)
                log.info("job succeeded", **summary)
            except asyncio.CancelledError:
                if job_id in self._cancel_requested:
                    log.info("job cancelled")
                raise  # otherwise the coordinator is stopping: the job stays RUNNING and resumes
            except AutodidactError as exc:
                await self._fail(job_id, str(exc))
            except grpc.aio.AioRpcError as exc:
                await self._fail(job_id, f"a service answered {rpc_error_text(exc)}")
            except Exception as exc:  # a bug: fail the job, keep the coordinator
                log.exception("job crashed")
                await self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}")

    async def _fail(self, job_id: str, message: str) -> None:
        log.warning("job failed", error=message)
        await self._store.set_state(job_id, FAILED, message)
        self._changes.notify(job_id)
