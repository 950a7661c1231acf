"""`autodidact run RECIPE.yaml`: upload the recipe's input files, submit it as
a job, show its progress, download the dataset and print what was kept and
why the rest was dropped.

A recipe file is the JSON mapping of coordinator.proto's JobSpec, in YAML.
An input field holding a path names a file of this machine, relative to the
recipe file: it is uploaded (UploadDataset, idempotent by content) and the
job names it "dataset:<id>", so the coordinator never needs this machine's
files. A field holding another input reference ("dataset:", "inline:",
"s3://", ...) goes as written. Without --coordinator the services the recipe
calls and a coordinator run in this process over loopback gRPC, and the job
goes through the same upload, submit, watch and download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from autodidact.client import wait_until_serving
from autodidact.coordinator.inputs import CHUNK_BYTES, DATASET_PREFIX, INLINE_PREFIX, OBJECT_SCHEMES, file_sha256
from autodidact.coordinator.jobs import EXPORT_NAME, validate_spec
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.progress import JobProgress
from autodidact.runtime.channels import create_channel
from autodidact.runtime.neighbours import is_transient, rpc_error_text
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc


class RecipeError(Exception):
    """The recipe file cannot become a JobSpec."""


def load_recipe(path: Path) -> coordinator_pb2.JobSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of JobSpec fields, e.g. self_instruct: {{...}}")
    try:
        spec = json_format.ParseDict(raw, coordinator_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    recipe = RECIPES.get(spec.WhichOneof("recipe") or "")
    if recipe is not None:
        fields = getattr(spec, recipe.name)
        for name in recipe.inputs:
            value = getattr(fields, name)
            if value and not is_reference(value):
                setattr(fields, name, str((path.parent / value).resolve()))
    return spec


def is_reference(value: str) -> bool:
    """An input reference the coordinator resolves itself, not a file of this machine."""
    return value.startswith((DATASET_PREFIX, INLINE_PREFIX, *OBJECT_SCHEMES, "file://"))


@dataclass(frozen=True)
class Upload:
    """A local input file and the dataset it becomes."""

    path: Path
    sha256: str
    size_bytes: int

    @classmethod
    def of(cls, path: Path) -> Upload:
        size, sha256 = file_sha256(path)
        return cls(path, sha256, size)

    @property
    def dataset_id(self) -> str:
        return "ds-" + self.sha256[:32]

    @property
    def reference(self) -> str:
        """How a job names the uploaded dataset in an input field."""
        return DATASET_PREFIX + self.dataset_id

    @property
    def format(self) -> coordinator_pb2.DatasetFormat.ValueType:
        return coordinator_pb2.DATASET_FORMAT_JSON if self.path.suffix == ".json" else coordinator_pb2.DATASET_FORMAT_JSONL


@dataclass(frozen=True)
class Prepared:
    """A recipe ready to send, its input files hashed once: the spec as read
    (local paths, checked before anything starts), the spec as sent (each
    local file named as the dataset it uploads as) and the uploads to make."""

    local: coordinator_pb2.JobSpec
    sent: coordinator_pb2.JobSpec
    uploads: list[Upload]


def prepare(spec: coordinator_pb2.JobSpec) -> Prepared:
    """The spec with each local input file named as the dataset it uploads as
    ("dataset:ds-<sha256>", known before uploading: an id is its content's
    hash), and the uploads to make."""
    sent = coordinator_pb2.JobSpec()
    sent.CopyFrom(spec)
    uploads: dict[Path, Upload] = {}
    recipe = RECIPES.get(spec.WhichOneof("recipe") or "")
    if recipe is None:
        return Prepared(spec, sent, [])
    fields = getattr(sent, recipe.name)
    for name in recipe.inputs:
        value = getattr(fields, name)
        if not value or is_reference(value):
            continue
        path = Path(value)
        if path not in uploads:
            try:
                uploads[path] = Upload.of(path)
            except OSError as exc:
                raise RecipeError(f"spec.{recipe.name}.{name}: cannot read {path}: {exc.strerror or exc}") from None
        setattr(fields, name, uploads[path].reference)
    return Prepared(spec, sent, list(uploads.values()))


def default_job_id(path: Path, prepared: Prepared) -> str:
    """The same file and content (its inputs' content included) give the same id, so running it again resumes or returns the job."""
    return f"{path.stem}-{hashlib.sha256(prepared.sent.SerializeToString(deterministic=True)).hexdigest()[:10]}"


async def upload(stub: Any, item: Upload) -> None:
    """Uploads one input file in chunks; the coordinator checks its size and sha256."""
    call = stub.UploadDataset(timeout=600)
    header = coordinator_pb2.UploadDatasetHeader(name=item.path.name, format=item.format, sha256=item.sha256, size_bytes=item.size_bytes)
    try:
        await call.write(coordinator_pb2.UploadDatasetRequest(header=header))
        with item.path.open("rb") as stream:
            while chunk := await asyncio.to_thread(stream.read, CHUNK_BYTES):
                await call.write(coordinator_pb2.UploadDatasetRequest(chunk=chunk))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        # The coordinator ended the call before reading everything (a refused token, a quota):
        # writes then fail with a transport error; the call's own status below says why.
        pass
    response = await call
    if response.dataset.dataset_id != item.dataset_id:
        raise RecipeError(f"{item.path}: the coordinator named the upload {response.dataset.dataset_id}, not {item.dataset_id}")


async def download(stub: Any, job_id: str, file: coordinator_pb2.ExportedFile, directory: Path) -> Path:
    """Downloads one exported file into `directory` (a temporary file, renamed
    once its size and sha256 match what the coordinator sent)."""
    if not EXPORT_NAME.match(file.name) or Path(file.name).name != file.name:
        # The name comes from the server: a hostile one ("../x", "/home/u/.bashrc") must not choose where this writes.
        raise RecipeError(f"the coordinator named an exported file {file.name!r}, which is not a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / file.name
    partial = directory / f".{file.name}.partial"
    digest = hashlib.sha256()
    last = None
    try:
        with partial.open("wb") as sink:
            request = coordinator_pb2.DownloadExportRequest(job_id=job_id, name=file.name)
            async for chunk in stub.DownloadExport(request, timeout=600):
                digest.update(chunk.data)
                await asyncio.to_thread(sink.write, chunk.data)
                last = chunk
        if last is None or not last.last or last.sha256 != digest.hexdigest() or (file.sha256 and file.sha256 != last.sha256):
            raise RecipeError(f"{file.name}: the download did not arrive whole (its sha256 does not match); run again")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def summary_table(job: coordinator_pb2.Job) -> str:
    rows = [("stage", "decided", "kept", "dropped (by filter)")]
    for stage in job.stages:
        dropped = ", ".join(f"{name} {n}" for name, n in sorted(stage.dropped_by_filter.items(), key=lambda kv: -kv[1])) or "-"
        rows.append((stage.stage, str(stage.done), str(stage.kept), dropped))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)


WATCH_SECONDS = 600
CONNECT_SECONDS = 5
TERMINAL_STATES = (coordinator_pb2.JOB_STATE_SUCCEEDED, coordinator_pb2.JOB_STATE_FAILED, coordinator_pb2.JOB_STATE_CANCELLED)


def submission_outcome(submitted: coordinator_pb2.SubmitJobResponse) -> str:
    """What SubmitJob did, in words: a new job, a failed or cancelled one resumed, or one already known."""
    if submitted.created:
        return "new job, submitted"
    if submitted.resumed:
        return "resumed from what it stored"
    if submitted.job.state == coordinator_pb2.JOB_STATE_SUCCEEDED:
        return "already done; exporting it again"
    return "already running; following it"


async def follow(stub: Any, job: coordinator_pb2.Job, job_id: str, show_progress: bool) -> coordinator_pb2.Job:
    """Watches the job until it ends, showing its progress (bars on a terminal, plain lines elsewhere) unless told not to."""
    with JobProgress() if show_progress else contextlib.nullcontext() as progress:
        while job.state not in TERMINAL_STATES:
            # Every call has a deadline, a watch too: a job that outlives one is watched again.
            try:
                async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=WATCH_SECONDS):
                    job = event.job
                    if progress is not None:
                        progress.update(job)
            except grpc.aio.AioRpcError as exc:
                if not is_transient(exc):  # a deadline, a restart, too many watchers: watch again
                    raise
                await asyncio.sleep(1)
    return job


async def run_job(target: str, job_id: str, prepared: Prepared, out: Path, show_progress: bool = True) -> int:
    """Uploads the recipe's local input files, submits the job, follows it, and downloads its dataset into `out`."""
    async with create_channel(target, timeout_seconds=60) as channel:
        # Nothing listening is told apart from a coordinator still starting, and said at once.
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=CONNECT_SECONDS)
            await wait_until_serving(channel, timeout=120)
        except TimeoutError as exc:
            reason = str(exc) or f"nothing accepted a connection within {CONNECT_SECONDS:g} s"
            print(f"error: no coordinator at {target}: {reason}", file=sys.stderr)
            return 2
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        try:
            for item in prepared.uploads:
                await upload(stub, item)
                print(f"uploaded {item.path.name} as {item.dataset_id} ({item.size_bytes:,} bytes)", file=sys.stderr)
            submitted = await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=job_id, spec=prepared.sent))
        except grpc.aio.AioRpcError as exc:
            print(f"error: job refused: {rpc_error_text(exc)}", file=sys.stderr)
            return 2
        print(f"job {job_id}: {submission_outcome(submitted)}", file=sys.stderr)
        job = await follow(stub, submitted.job, job_id, show_progress)
        state = coordinator_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        print(f"\njob {job_id}: {state}")
        print(summary_table(job))
        if job.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
            if job.error:
                print(f"error: {job.error}", file=sys.stderr)
            return 1
        exported = await stub.ExportJob(coordinator_pb2.ExportJobRequest(job_id=job_id), timeout=600)
        print(f"\nfiles (in {out}):")
        for file in exported.files:
            path = await download(stub, job_id, file, out)
            print(f"  {path}" + (f"  ({file.rows} rows)" if file.kind not in ("manifest", "dataset_card", "report_html") else ""))
        return 0


async def run_in_process(
    prepared: Prepared,
    job_id: str,
    data_dir: Path,
    options: Any,
    out: Path,
    show_progress: bool = True,
    server: Any = None,
) -> int:
    """Hosts the services the recipe calls and a coordinator here (loopback,
    free ports, `server`'s settings: its authentication), runs the job
    through them as a remote caller would, stops them."""
    from autodidact.errors import InvalidArgument
    from autodidact.runtime.server import settle_heap
    from autodidact.runtime.settings import ServerSettings
    from autodidact.stack import LocalStack, services_for

    try:  # refused here, before any model loads, as the coordinator would refuse it
        validate_spec(prepared.local, job_id, None)
    except InvalidArgument as exc:
        print(f"error: job refused: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    stack = LocalStack(options.under(data_dir))
    server = server or ServerSettings(grace_seconds=5)
    try:
        await stack.start(services_for(prepared.local.WhichOneof("recipe") or ""), server)
        # Models load before the job starts: llama.cpp silences the process's stderr while it
        # loads one, which would swallow progress lines printed meanwhile.
        await stack.wait_ready()
        await stack.start(["coordinator"], server)
        settle_heap()
        return await run_job(stack.target("coordinator"), job_id, prepared, out, show_progress)
    finally:
        await stack.stop(grace=5)
