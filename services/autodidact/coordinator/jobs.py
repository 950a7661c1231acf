"""Jobs: submission, the task that runs each one, and watching them.

A job's task is plain recipe code over a JobContext. Whatever the task stored
survives the process: on start the manager relaunches every job that was
PENDING or RUNNING, and the recipe replays what is stored. A FAILED or
CANCELLED job resumes the same way when retried (RetryJob, or the same id and
spec submitted again); items that errored are tried again.

Several coordinators may share one store (PostgreSQL). A PENDING or RUNNING
job is run by the one holding its lease (JobStore.claim_jobs), renewed every
third of lease_seconds; a coordinator that stops renewing (killed, cut off)
loses its jobs to the next that claims them, and that one replays them from
the store like a restart would. Any replica answers Get, List, Watch and
StreamSamples from the store; a cancel through one reaches the holder when it
next renews.

The API's messages are made in protos.py, the dataset is written by
export.py, and StreamSamples reads records in samples.py; this module knows
no recipe and no stage by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from autodidact.coordinator import export, samples
from autodidact.coordinator.inputs import DATASET_PREFIX, Snapshot, check_inline_inputs, locate, open_regular, snapshot
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
from autodidact.coordinator.recipes.base import (
    ERROR_FILTER,
    MAX_ERROR_MESSAGES,
    PLAN_KEY,
    REVIEW_DECISION_PREFIX,
    REVIEW_FILTER,
    REVIEW_KEY,
    REVIEW_STAGE,
    USAGE_KEY,
    Decision,
    JobContext,
    ReviewGate,
    Services,
    StageResult,
    decide_reviews,
    review_key,
)
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.coordinator.records import ERRORS_KEY, SUMMARY_KEY, Record
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import JobRow, JobStore
from autodidact.coordinator.tenants import TenantPolicy, Tenants
from autodidact.errors import AlreadyExists, AutodidactError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from autodidact.runtime import tracing
from autodidact.runtime.neighbours import rpc_error_text
from autodidact.runtime.principal import SUBMITTER, Principal, acting_as, current_principal
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2
from autodidact.validation import (
    MAX_REVIEW_ITEM_ID_CHARS,
    MAX_REVIEW_NOTE_CHARS,
    MAX_REVIEWER_CHARS,
    check_id,
    check_range,
)

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
# The job-level value that lists the job's input snapshots (inputs.Snapshot.to_json each).
INPUTS_KEY = "inputs"
# DownloadExport's chunks: well under the default 8 MiB message bound.
DOWNLOAD_CHUNK_BYTES = 1 << 20
# In a job's inputs folder beside the snapshots: the spec hash they were installed under.
SPEC_HASH_FILE = ".spec-hash"
EXPORT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
# How long a coordinator's hold on a job lasts unless renewed (every third of it): how soon
# another replica takes over the jobs of one that died.
DEFAULT_LEASE_SECONDS = 30.0
# Jobs one claim takes at most: a replica coming up does not take every free job in one go.
CLAIM_BATCH = 16
# JobSpec.review.deadline_seconds: the default (a day) and the most (30 days).
DEFAULT_REVIEW_DEADLINE_SECONDS = 86_400
MAX_REVIEW_DEADLINE_SECONDS = 2_592_000
# SubmitReviews: decisions per call (the bounds of one decision are in validation.py).
MAX_REVIEWS_PER_CALL = 10_000
# ListReviews reads the job's results from its page token on, this many at a time, and shows
# each field of an item cut to this many characters.
REVIEW_SCAN_BATCH = 2048
REVIEW_FIELD_CHARS = 2000


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


def job_key(tenant: str, job_id: str) -> str:
    """Where the store keeps a job: job ids are per tenant (neither half holds a "/")."""
    return f"{tenant}/{job_id}"


def split_key(key: str) -> tuple[str, str]:
    tenant, _, job_id = key.partition("/")
    return tenant, job_id


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
    if not differing:
        return f"job {job_id!r} exists with the same spec over inputs of other content; choose another job_id"
    shown = ", ".join(differing[:10]) + (f" and {len(differing) - 10} more" if len(differing) > 10 else "")
    return f"job {job_id!r} exists with another spec (fields that differ: {shown}); choose another job_id"


def check_recipe(spec: coordinator_pb2.JobSpec) -> Recipe[Any]:
    recipe = spec.WhichOneof("recipe")
    if recipe is None:
        raise InvalidArgument("spec.recipe", f"is required: set one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


def review_gate(spec: coordinator_pb2.JobSpec) -> ReviewGate | None:
    """spec.review resolved and checked (InvalidArgument naming the field); None without a gate."""
    review = spec.review
    check_range("spec.review.band", review.band, 0.0, 100.0)
    if review.deadline_seconds:
        check_range("spec.review.deadline_seconds", review.deadline_seconds, 1, MAX_REVIEW_DEADLINE_SECONDS)
    if not review.band:
        return None
    recipe = check_recipe(spec)
    if not recipe.deciding_scores(getattr(spec, recipe.name)):
        raise InvalidArgument(
            "spec.review.band", f"the {recipe.name} recipe decides by no score with this spec: nothing to hold for review"
        )
    return ReviewGate(
        band=review.band,
        deadline_seconds=float(review.deadline_seconds or DEFAULT_REVIEW_DEADLINE_SECONDS),
        keep_at_deadline=review.on_deadline == coordinator_pb2.REVIEW_POLICY_KEEP,
    )


def validate_spec(spec: coordinator_pb2.JobSpec, job_id: str, inputs_dir: Path | None) -> Any:
    """Checks a spec; returns the recipe's resolved parameters, its inputs read
    from their snapshots in `inputs_dir` (one file per input field), or, with
    None, from the local files the input fields name (the CLI checks a recipe
    file so before starting anything). Blocking."""
    recipe = check_recipe(spec)
    check_range("spec.max_in_flight", spec.max_in_flight or 4, 1, 256)
    check_range("spec.max_error_fraction", max_error_fraction(spec), 0.0, 1.0)
    review_gate(spec)
    own = coordinator_pb2.JobSpec()
    own.CopyFrom(spec)
    fields = getattr(own, recipe.name)
    for name in recipe.inputs:
        if inputs_dir is not None and getattr(fields, name):
            setattr(fields, name, str(inputs_dir / name))
    return recipe.resolve(fields, job_id)


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


def spec_hash(spec: coordinator_pb2.JobSpec, inputs: list[Snapshot]) -> str:
    """The job's identity: its spec and its inputs' content."""
    digest = hashlib.sha256(spec.SerializeToString(deterministic=True))
    for item in sorted(inputs, key=lambda item: item.field):
        digest.update(f"\0{item.field}\0{item.sha256}".encode())
    return digest.hexdigest()


def stored_spec(spec: coordinator_pb2.JobSpec) -> coordinator_pb2.JobSpec:
    """The spec as the job keeps it: inline inputs live in their snapshots (and in
    the identity through their hashes), not in every GetJob and WatchJob answer."""
    own = coordinator_pb2.JobSpec()
    own.CopyFrom(spec)
    own.ClearField("inline_inputs")
    return own


class JobManager:
    """Every job of every tenant. The API methods act for the caller's tenant
    (`current_principal()`): another tenant's job is NOT_FOUND, as if it did
    not exist. Internally a job is known by its key, "<tenant>/<job_id>"."""

    def __init__(
        self,
        store: JobStore,
        services: Services,
        storage: TenantStorage,
        tenants: Tenants | None = None,
        publish: export.Publisher | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self._store = store
        # Who holds this manager's leases: unique per process start, so a restarted replica
        # does not mistake its predecessor's leases for its own.
        self._owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._lease_seconds = lease_seconds
        self._keeping_leases: asyncio.Task[None] | None = None
        self._services = services
        self._storage = storage
        self._tenants = tenants or Tenants()
        self._publish = publish
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changes = JobChanges()
        self._planned_items: dict[str, int] = {}  # each job's stored plan, once read
        self._inputs: dict[str, list[coordinator_pb2.JobInput]] = {}  # each job's input snapshots, once read
        self._cancel_requested: set[str] = set()
        self._context_length: int | None = None  # the generator's, asked once
        self._ask_generator_after = 0.0  # loop time; set after the generator did not answer
        # Per tenant (submissions) and per job (exports); entries go when no call holds them.
        self._submitting: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._exporting: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # --- lifecycle ---

    async def resume_unfinished(self) -> None:
        """Takes up the unfinished jobs nobody holds (all of them, for a lone coordinator),
        then keeps this manager's leases and takes up jobs whose holder went away."""
        await self._claim_free_jobs()
        self._keeping_leases = asyncio.create_task(self._keep_leases(), name="job leases")

    async def close(self) -> None:
        """Stops every job task; their state stays RUNNING, their leases are released,
        and they resume at the next start or on another replica."""
        if self._keeping_leases is not None:
            self._keeping_leases.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *([self._keeping_leases] if self._keeping_leases else []), return_exceptions=True)

    async def _claim_free_jobs(self) -> None:
        while claimed := await self._store.claim_jobs(self._owner, (PENDING, RUNNING), self._lease_seconds, CLAIM_BATCH):
            for row in claimed:
                if not self._running(row.id):
                    log.info("taking up job", job_key=row.id)
                    self._launch(row.id)
            if len(claimed) < CLAIM_BATCH:
                return

    async def _keep_leases(self) -> None:
        """Every third of a lease: renews the leases of the jobs running here, stops a job
        whose lease was lost or that another replica cancelled, and claims free jobs."""
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            try:
                running = [key for key in self._tasks if self._running(key)]
                held = await self._store.renew_leases(self._owner, running, self._lease_seconds)
                for key in running:
                    state = held.get(key)
                    if state is None:
                        log.warning("lost the lease of a job; another coordinator runs it now", job_key=key)
                        self._tasks[key].cancel()
                    elif state == CANCELLED:
                        log.info("job cancelled through another coordinator", job_key=key)
                        self._cancel_requested.add(key)
                        self._tasks[key].cancel()
                await self._claim_free_jobs()
            except Exception:  # the store unreachable for a moment: try again at the next beat
                log.exception("could not renew the job leases")

    def _running(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    async def _take(self, key: str) -> None:
        """Launches a job this manager just made runnable (submitted, retried), if it gets the lease."""
        if await self._store.claim_jobs(self._owner, (PENDING,), self._lease_seconds, 1, job_id=key):
            self._launch(key)

    # --- API ---

    async def submit(self, job_id: str, spec: coordinator_pb2.JobSpec) -> tuple[coordinator_pb2.Job, bool, bool]:
        """(job, created, resumed): the same id, spec and input content again
        resumes a FAILED or CANCELLED job. The inputs are snapshotted first:
        the job's identity covers their content."""
        check_job_id("job_id", job_id)
        recipe = check_recipe(spec)
        check_inline_inputs(dict(spec.inline_inputs))
        tenant = current_principal().tenant
        key = job_key(tenant, job_id)
        policy = self._tenants.policy(tenant)
        # One submission per tenant at a time: its quotas are checked and its job launched
        # before the next is admitted, and its inputs are installed before its row exists.
        lock = self._submitting.setdefault(tenant, asyncio.Lock())
        async with lock:
            staging = self._storage.tenant_dir(tenant) / "staging" / uuid.uuid4().hex
            try:
                used = await asyncio.to_thread(self._storage.stored_bytes, tenant)
                inputs = await self._snapshot_inputs(tenant, recipe, spec, policy, staging, policy.quotas.stored_bytes - used)
                kept = stored_spec(spec)
                digest = spec_hash(kept, inputs)
                existing = await self._store.get_job(key)
                if existing is not None:
                    if existing.spec_hash != digest:
                        raise AlreadyExists(_other_spec_message(job_id, existing, kept))
                    if existing.state in RESUMABLE:
                        return await self.retry(job_id), False, True
                    return await self._job_message(existing), False, False
                await self._check_running_quota(tenant, policy)
                # Reading and checking the inputs can take a while (up to the item bounds): off the loop.
                params = await asyncio.to_thread(validate_spec, kept, job_id, staging)
                items = recipe.item_count(params)
                if items > policy.quotas.items_per_job:
                    raise policy.quotas.exceeded(tenant, "items_per_job", f"the job plans {items:,} items")
                context_length = await self._generator_context()
                if context_length is not None:
                    check_against_model(kept, params, context_length)
                # The snapshots move into the job's folder before its row exists: a job never runs without them.
                await asyncio.to_thread(_install, staging, self._storage.inputs_dir(tenant, job_id), digest)
                await self._store.delete_value(key, INPUTS_KEY)  # left by a submission that crashed before its row
                await self._store.put_value(key, INPUTS_KEY, {"inputs": [item.to_json() for item in inputs]})
                row, created = await self._store.create_job(key, kept.SerializeToString(deterministic=True), digest, PENDING)
                if created:
                    log.info("job submitted", job_key=key, recipe=recipe.name)
                    await self._take(key)
            finally:
                await asyncio.to_thread(shutil.rmtree, staging, True)
        return await self._job_message(row), created, False

    async def retry(self, job_id: str) -> coordinator_pb2.Job:
        """Resumes a FAILED or CANCELLED job from what it stored. Errored
        items and the end-of-job records are forgotten, so they are done again."""
        row = await self._row(job_id)
        key = row.id
        if row.state not in RESUMABLE:
            raise FailedPrecondition(f"job {job_id!r} is {state_name(row.state)}; only a FAILED or CANCELLED job can be retried")
        if self._running(key):
            raise FailedPrecondition(f"job {job_id!r} is still stopping; retry shortly")
        tenant = split_key(key)[0]
        await self._check_running_quota(tenant, self._tenants.policy(tenant))
        self._cancel_requested.discard(key)
        await self._store.delete_results(key, filter_=ERROR_FILTER)
        await self._store.delete_value(key, SUMMARY_KEY)
        await self._store.delete_value(key, ERRORS_KEY)
        await self._store.set_state(key, PENDING)
        log.info("job retried", job_key=key, was=state_name(row.state))
        await self._take(key)
        self._changes.notify(key)
        return await self.get(job_id)

    async def _check_running_quota(self, tenant: str, policy: TenantPolicy) -> None:
        # Counted in the store: the tenant's jobs may run on any replica.
        prefix = job_key(tenant, "")
        running = sum(1 for row in await self._store.jobs_in_states((PENDING, RUNNING)) if row.id.startswith(prefix))
        if running >= policy.quotas.running_jobs:
            raise policy.quotas.exceeded(tenant, "running_jobs", f"{running:,} of the tenant's jobs are pending or running")

    async def _snapshot_inputs(
        self, tenant: str, recipe: Recipe[Any], spec: coordinator_pb2.JobSpec, policy: TenantPolicy, folder: Path, room: int | None
    ) -> list[Snapshot]:
        """Copies each input the spec names into `folder` (one file per input field), within
        `room` bytes of the tenant's stored_bytes (None: unbounded; an uploaded dataset is
        linked, not copied, and takes no room)."""
        fields = getattr(spec, recipe.name)
        inline = dict(spec.inline_inputs)
        snapshots = []
        private = (self._storage.data_dir,)  # every tenant's uploads and snapshots, the job store: never an input

        def dataset_file(field: str, dataset_id: str) -> Path:
            return self._storage.dataset_file(tenant, field, dataset_id)

        for name in recipe.inputs:
            reference = getattr(fields, name)
            if not reference:
                continue  # required ones are refused by the recipe's resolve, naming the field
            field = f"spec.{recipe.name}.{name}"
            source = await asyncio.to_thread(locate, field, reference, inline, policy.input_roots, dataset_file, private)
            taken = await asyncio.to_thread(snapshot, field, reference, source, folder / name, policy.quotas, tenant, room)
            if room is not None and not reference.startswith(DATASET_PREFIX):
                room -= taken.size_bytes
            snapshots.append(taken)
        return snapshots

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
        prefix = job_key(current_principal().tenant, "")
        rows = await self._store.list_jobs(size + 1, int(page_token) if page_token else None, key_prefix=prefix)
        next_token = str(rows[size - 1].seq) if len(rows) > size else ""
        return [await self._job_message(row) for row in rows[:size]], next_token

    async def cancel(self, job_id: str) -> coordinator_pb2.Job:
        row = await self._row(job_id)
        key = row.id
        if row.state not in TERMINAL:
            self._cancel_requested.add(key)
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()
            await self._store.set_state(key, CANCELLED)
            self._changes.notify(key)
        return await self.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[coordinator_pb2.Job]:
        """The job now, then after every change until it ends: one read of
        the job and its stage counters per wake-up (JobChanges coalesces
        them), never of its results."""
        key = (await self._row(job_id)).id
        loop = asyncio.get_running_loop()
        last = None
        while True:
            seen = self._changes.version(key)
            read_at = loop.time()
            job = await self.get(job_id)
            snapshot = job.SerializeToString(deterministic=True)
            if snapshot != last:
                last = snapshot
                yield job
            if job.state in TERMINAL:
                return
            await self._changes.wait(key, seen, read_at)

    async def samples(self, job_id: str, follow: bool, include_dropped: bool) -> AsyncIterator[Record]:
        """The job's decided records (samples.py says in which order); with
        `follow`, then each record as it is decided, until the job ends."""
        row = await self._row(job_id)
        recipe = recipe_of(coordinator_pb2.JobSpec.FromString(row.spec))
        async for record in samples.stream_records(
            self._store, row.id, recipe, include_dropped=include_dropped, changes=self._changes if follow else None
        ):
            yield record

    async def export(self, job_id: str) -> list[coordinator_pb2.ExportedFile]:
        row = await self._row(job_id)
        if row.state not in (SUCCEEDED, CANCELLED):
            raise FailedPrecondition(
                f"job {job_id!r} is {state_name(row.state)}; only a succeeded or cancelled job can be exported"
                + (" (RetryJob resumes a failed one)" if row.state == FAILED else "")
            )
        if row.state == SUCCEEDED:
            tenant, _ = split_key(row.id)
            written = await asyncio.to_thread(export.written_export, self._storage.dataset_dir(tenant, job_id))
            if written is not None:
                await self._published(tenant, job_id, written)
                return written
        return await self._write_dataset(row)

    async def download(self, job_id: str, name: str) -> AsyncIterator[coordinator_pb2.DownloadExportResponse]:
        """One file of the job's export, in chunks; the last one carries its size and sha256."""
        if not EXPORT_NAME.match(name):
            raise InvalidArgument("name", "must be a file name ExportJob listed, e.g. manifest.json")
        row = await self._row(job_id)
        tenant, _ = split_key(row.id)
        path = self._storage.dataset_dir(tenant, job_id) / name
        try:
            stream = await asyncio.to_thread(open_regular, path)
        except OSError:
            raise NotFound(f"job {job_id!r} has no exported file {name!r}; ExportJob writes and lists its files") from None
        digest = hashlib.sha256()
        offset = 0
        with stream:
            while True:
                chunk = await asyncio.to_thread(stream.read, DOWNLOAD_CHUNK_BYTES)
                digest.update(chunk)
                last = len(chunk) < DOWNLOAD_CHUNK_BYTES
                message = coordinator_pb2.DownloadExportResponse(data=chunk, offset=offset)
                offset += len(chunk)
                if last:
                    message.size_bytes, message.sha256, message.last = offset, digest.hexdigest(), True
                yield message
                if last:
                    return

    async def list_reviews(self, job_id: str, page_size: int, page_token: str) -> coordinator_pb2.ListReviewsResponse:
        """The job's items awaiting review, in the order they were held, from the page token
        (a cursor in the job's results) on: O(results read), never the whole job per page."""
        size = page_size or 100
        check_range("page_size", size, 1, 1000)
        if page_token and not PAGE_TOKEN_PATTERN.match(page_token):
            raise InvalidArgument("page_token", "is not a token from a previous ListReviews response")
        row = await self._row(job_id)
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        recipe = recipe_of(spec)
        gated = {score.stage for score in recipe.deciding_scores(getattr(spec, recipe.name))}
        cursor = int(page_token) if page_token else 0
        response = coordinator_pb2.ListReviewsResponse()
        found: list[tuple[str, StageResult, int]] = []  # (item, its held result, the cursor just past it)
        while len(found) <= size:
            rows = await self._store.results_since(row.id, cursor, REVIEW_SCAN_BATCH)
            held = [(at, item_id, StageResult.from_json(value)) for at, item_id, stage, value in rows if stage in gated]
            held = [(at, item_id, result) for at, item_id, result in held if result.decision and result.decision.filter == REVIEW_FILTER]
            ids = [item_id for _, item_id, _ in held]
            decided = set(await self._store.get_results(row.id, ids, REVIEW_STAGE))
            decided |= {
                key.removeprefix(REVIEW_DECISION_PREFIX) for key in await self._store.get_values(row.id, [review_key(i) for i in ids])
            }
            found += [(item_id, result, at) for at, item_id, result in held if item_id not in decided]
            if len(rows) < REVIEW_SCAN_BATCH:
                break
            cursor = rows[-1][0]
        page = found[:size]
        if len(found) > size:
            response.next_page_token = str(page[-1][2])
        data = await self._item_data(row.id, recipe.stages, [item_id for item_id, _, _ in page])
        for item_id, result, _ in page:
            assert result.decision is not None and result.decision.score is not None
            hold = result.data.get("review_hold", {})
            item = response.items.add(
                item_id=item_id,
                stage=next(stage for stage in recipe.stages if stage in gated),
                score=result.decision.score,
                threshold=hold.get("threshold", 0.0),
                proposed_kept=hold.get("proposed_kept", True),
                reason=hold.get("reason", result.decision.reason),
            )
            item.data.update(data.get(item_id, {}))
        opened = await self._store.get_value(row.id, REVIEW_KEY)
        if opened is not None:
            gate = review_gate(spec)
            assert gate is not None, "only a job with a review gate waits for reviews"
            response.deadline.FromNanoseconds(int((opened["opened_at"] + gate.deadline_seconds) * 1e9))
        return response

    async def _item_data(self, key: str, stages: tuple[str, ...], item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each item's fields so far, merged over its stages as a record's are (one read per stage),
        each cut to REVIEW_FIELD_CHARS: a page of a thousand items stays well within a message."""
        data: dict[str, dict[str, Any]] = {item_id: {} for item_id in item_ids}
        for stage in stages:
            for item_id, value in (await self._store.get_results(key, item_ids, stage)).items():
                data[item_id].update({k: _cut(v) for k, v in value["data"].items() if k not in ("raw", "review_hold")})
        return data

    async def submit_reviews(self, job_id: str, reviews: list[coordinator_pb2.ItemReview]) -> coordinator_pb2.SubmitReviewsResponse:
        """Stores each person's decision as the item's decision value (decide_reviews), where the
        job, on whichever replica holds it, finds it and copies it into the item's lineage; the
        first decision about an item stands."""
        if not 1 <= len(reviews) <= MAX_REVIEWS_PER_CALL:
            raise InvalidArgument("reviews", f"must hold 1 to {MAX_REVIEWS_PER_CALL:,} decisions, got {len(reviews):,}")
        seen: set[str] = set()
        for i, review in enumerate(reviews):
            if not review.item_id or len(review.item_id) > MAX_REVIEW_ITEM_ID_CHARS:
                raise InvalidArgument(
                    f"reviews[{i}].item_id", f"must be 1 to {MAX_REVIEW_ITEM_ID_CHARS} characters, an id ListReviews gave"
                )
            if review.item_id in seen:
                raise InvalidArgument(f"reviews[{i}].item_id", f"{review.item_id!r} is decided twice in this call")
            seen.add(review.item_id)
            if len(review.reviewer) > MAX_REVIEWER_CHARS or not review.reviewer.isprintable():
                raise InvalidArgument(f"reviews[{i}].reviewer", f"must be at most {MAX_REVIEWER_CHARS} printable characters")
            if len(review.note) > MAX_REVIEW_NOTE_CHARS:
                raise InvalidArgument(
                    f"reviews[{i}].note", f"must be at most {MAX_REVIEW_NOTE_CHARS:,} characters, got {len(review.note):,}"
                )
        row = await self._row(job_id)
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        recipe = recipe_of(spec)
        if review_gate(spec) is None:
            raise FailedPrecondition(f"job {job_id!r} has no review gate (spec.review.band); nothing of it awaits review")
        key = row.id
        awaiting_before = (await self._job_message(row)).awaiting_review
        ids = [review.item_id for review in reviews]
        held: dict[str, dict[str, Any]] = {}
        for score in recipe.deciding_scores(getattr(spec, recipe.name)):
            held.update(await self._store.get_results(key, ids, score.stage))
        earlier = await self._store.get_values(key, [review_key(item_id) for item_id in ids])
        # Decisions are write-once job values, never the job's results: those only the replica
        # holding the job writes (it copies each decision into the item's lineage when it sees it).
        subject = current_principal().subject  # who decided, where the call does not say
        proposed: dict[str, Decision] = {}
        for review in reviews:
            hold = held.get(review.item_id)
            if hold is None or (hold.get("decision") or {}).get("filter") != REVIEW_FILTER or review_key(review.item_id) in earlier:
                continue
            reviewer = review.reviewer or subject
            proposed[review.item_id] = Decision(
                review.kept,
                "" if review.kept else "human_review",
                reason=f"{'kept' if review.kept else 'dropped'} by {reviewer}" + (f": {review.note}" if review.note else ""),
                decided_by="human",
                reviewer=reviewer,
                note=review.note,
            )
        stood = await decide_reviews(self._store, key, proposed)
        response = coordinator_pb2.SubmitReviewsResponse()
        recorded = 0
        for review in reviews:
            result = response.results.add(item_id=review.item_id)
            if review.item_id in stood:
                decision, ours = stood[review.item_id]
            elif review_key(review.item_id) in earlier:
                decision, ours = Decision(**earlier[review_key(review.item_id)]["decision"]), False
            else:
                result.outcome = coordinator_pb2.REVIEW_OUTCOME_NOT_AWAITING
                continue
            if ours:
                result.outcome = coordinator_pb2.REVIEW_OUTCOME_RECORDED
                recorded += 1
            else:
                result.outcome = coordinator_pb2.REVIEW_OUTCOME_ALREADY_DECIDED
                result.kept = decision.kept
        self._changes.notify(key)
        # Counted before this call's decisions were written, so none of them was copied yet.
        response.awaiting_review = max(0, awaiting_before - recorded)
        return response

    # --- internals ---

    async def _row(self, job_id: str) -> JobRow:
        """The caller's tenant's job `job_id`; another tenant's is NOT_FOUND, exactly as a missing one."""
        check_job_id("job_id", job_id)
        row = await self._store.get_job(job_key(current_principal().tenant, job_id))
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
        job = job_message(row, spec, recipe, counts, total)
        job.id = split_key(row.id)[1]
        held = sum(c.kept_by_filter.get(REVIEW_FILTER, 0) for c in counts)
        if held:
            reviewed = next((c.done for c in counts if c.stage == REVIEW_STAGE), 0)
            job.awaiting_review = max(0, held - reviewed)
        usage = await self._store.get_value(row.id, USAGE_KEY)
        if usage is not None:
            job.usage.prompt_tokens = usage["prompt_tokens"]
            job.usage.completion_tokens = usage["completion_tokens"]
            job.usage.run_seconds = usage["run_seconds"]
        if row.id not in self._inputs:
            stored = await self._store.get_value(row.id, INPUTS_KEY)
            if stored is None:
                return job
            self._inputs[row.id] = [coordinator_pb2.JobInput(**value) for value in stored["inputs"]]
        job.inputs.extend(self._inputs[row.id])
        return job

    async def _write_dataset(self, row: JobRow, ending: int | None = None) -> list[coordinator_pb2.ExportedFile]:
        """Exports the job; `ending` is the state the job takes once this export is written
        (SUCCEEDED at the end of a run), which its manifest and report then say."""
        spec = coordinator_pb2.JobSpec.FromString(row.spec)
        tenant, job_id = split_key(row.id)
        directory = self._storage.dataset_dir(tenant, job_id)
        job = await self._job_message(row)
        if ending is not None:
            job.state = ending  # type: ignore[assignment]
        # One export of a job at a time: two would remove each other's temporary files.
        async with self._exporting.setdefault(row.id, asyncio.Lock()):
            files = await export.write_dataset(self._store, row.id, job, recipe_of(spec), directory)
        await self._published(tenant, job_id, files)
        return files

    async def _published(self, tenant: str, job_id: str, files: list[coordinator_pb2.ExportedFile]) -> None:
        """Puts the export in the object store (when one is configured) and signs fresh URLs."""
        if self._publish is not None:
            await self._publish(tenant, job_id, self._storage.dataset_dir(tenant, job_id), files)

    def _launch(self, key: str) -> None:
        self._tasks[key] = asyncio.create_task(self._run_leased(key), name=f"job {key}")

    async def _run_leased(self, key: str) -> None:
        """Runs the job under this manager's lease, and gives the lease back when the task
        ends (finished, failed, or stopped with the coordinator: another replica may take it at once)."""
        try:
            await self._run_traced(key)
        finally:
            try:
                await self._store.release_lease(key, self._owner)
            except Exception:  # the store is going away: the lease expires on its own
                log.warning("could not release a job's lease", job_key=key)

    async def _run_traced(self, key: str) -> None:
        """Runs the job in its span: every run, a resumed one too, joins the trace of the job's submission."""
        tenant, job_id = split_key(key)
        stored = functools.partial(self._store.get_value, key, tracing.TRACE_KEY)
        store = functools.partial(self._store.put_value, key, tracing.TRACE_KEY)
        async with tracing.job_span(job_id, tenant, stored, store):
            await self._run(key)

    async def _run(self, key: str) -> None:
        tenant, job_id = split_key(key)
        # The job's calls to other services carry its tenant (principal.py): its namespaces and collections are the tenant's.
        with (
            acting_as(Principal(tenant, f"job:{job_id}", frozenset({SUBMITTER}))),
            structlog.contextvars.bound_contextvars(job_id=job_id, tenant=tenant),
        ):
            try:
                row = await self._row(job_id)
                spec = coordinator_pb2.JobSpec.FromString(row.spec)
                inputs_dir = self._storage.inputs_dir(tenant, job_id)
                if await self._store.get_value(key, INPUTS_KEY) is None:
                    # A job from before input snapshots: its inputs are taken now, under today's rules.
                    recipe = recipe_of(spec)
                    inputs = await self._snapshot_inputs(tenant, recipe, spec, self._tenants.policy(tenant), inputs_dir, None)
                    await self._store.put_value(key, INPUTS_KEY, {"inputs": [item.to_json() for item in inputs]})
                params = await asyncio.to_thread(validate_spec, spec, job_id, inputs_dir)
                await self._store.set_state(key, RUNNING)
                self._changes.notify(key)
                in_flight = spec.max_in_flight or 4
                ctx = JobContext(
                    job_id,
                    spec.seed,
                    self._store,
                    self._services,
                    in_flight,
                    lambda: self._changes.notify(key),
                    max_error_fraction(spec),
                    fresh=not await self._store.has_results(key),
                    key=key,
                    review=review_gate(spec),
                    usage=await self._store.get_value(key, USAGE_KEY),
                )
                try:
                    summary = await recipe_of(spec).run(ctx, params)
                finally:  # what this run spent, however it ended (a cancel included); no review poll outlives it
                    ctx.close()
                    with contextlib.suppress(Exception):
                        await asyncio.shield(ctx.flush_usage())
                ctx.check_error_budget()  # each_item checked its own; this covers items run through ctx.item
                errors = {"count": len(ctx.errors), "items": ctx.items, "messages": ctx.errors[:MAX_ERROR_MESSAGES]}
                await self._store.put_value(key, ERRORS_KEY, errors)
                await self._store.put_value(key, SUMMARY_KEY, summary)
                # The dataset is written before the job says SUCCEEDED: a failed write fails the job
                # visibly, and a crash in between resumes the job, which replays and writes again.
                try:
                    await self._write_dataset(await self._row(job_id), SUCCEEDED)
                except OSError as exc:  # a full disk, a file in the way: named by file, never by server path
                    name = Path(exc.filename).name if exc.filename else "its folder"
                    raise Unavailable(f"the dataset could not be written ({exc.strerror or type(exc).__name__}: {name})") from exc
                await self._store.set_state(key, SUCCEEDED)
                self._changes.notify(key)
                log.info("job succeeded", **summary)
            except asyncio.CancelledError:
                if key in self._cancel_requested:
                    log.info("job cancelled")
                raise  # otherwise the coordinator is stopping: the job stays RUNNING and resumes
            except AutodidactError as exc:
                await self._fail(key, str(exc))
            except grpc.aio.AioRpcError as exc:
                await self._fail(key, f"a service answered {rpc_error_text(exc)}")
            except Exception:  # a bug: fail the job, keep the coordinator; the details (paths, a cloud's answer) go to the log only
                log.exception("job crashed")
                await self._fail(key, f"internal error: the coordinator's log has the details (job {job_id!r} of tenant {tenant!r})")

    async def _fail(self, key: str, message: str) -> None:
        log.warning("job failed", error=message)
        await self._store.set_state(key, FAILED, message)
        self._changes.notify(key)


def _cut(value: Any) -> Any:
    """A field as ListReviews shows it: a long text, list or mapping cut to REVIEW_FIELD_CHARS characters (as JSON text)."""
    if isinstance(value, str):
        return value if len(value) <= REVIEW_FIELD_CHARS else value[: REVIEW_FIELD_CHARS - 1] + "…"
    if isinstance(value, list | dict):
        text = json.dumps(value, ensure_ascii=False)
        return value if len(text) <= REVIEW_FIELD_CHARS else text[: REVIEW_FIELD_CHARS - 1] + "…"
    return value


def _install(staging: Path, inputs_dir: Path, digest: str) -> None:
    """Moves a submission's snapshots into the job's folder, replacing what a crashed
    submission left. Snapshots installed under the same spec hash (which covers their
    content) stay: the same submission sent to two replicas at once must not pull the
    inputs from under the job the first one started. The hash travels inside the
    folder (SPEC_HASH_FILE), so it arrives with the snapshots in one rename."""
    if _installed_hash(inputs_dir) == digest:
        return
    staging.mkdir(parents=True, exist_ok=True)  # a job without inputs still gets its folder
    (staging / SPEC_HASH_FILE).write_text(digest)
    shutil.rmtree(inputs_dir, ignore_errors=True)
    inputs_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, inputs_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Another submission of this job installed its snapshots meanwhile.
        if _installed_hash(inputs_dir) != digest:
            job = inputs_dir.parent.name
            raise FailedPrecondition(f"job {job!r} is being submitted with another spec at the same time; retry") from None


def _installed_hash(inputs_dir: Path) -> str | None:
    try:
        return (inputs_dir / SPEC_HASH_FILE).read_text()
    except FileNotFoundError:
        return None
