"""`autodidact run RECIPE.yaml`: submit a recipe as a job, show its progress,
export the dataset and print what was kept and why the rest was dropped.

A recipe file is the JSON mapping of coordinator.proto's JobSpec, in YAML.
Paths in it are relative to the file. Without --coordinator the whole stack
(generator, dedup, coordinator) runs in this process over loopback gRPC.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from autodidact.client import wait_until_serving
from autodidact.coordinator.jobs import spec_hash
from autodidact.runtime.channels import create_channel
from autodidact.runtime.neighbours import is_transient, rpc_error_text
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc


class RecipeError(Exception):
    """The recipe file cannot become a JobSpec."""


def load_recipe(path: Path, output_dir: Path | None) -> coordinator_pb2.JobSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of JobSpec fields, e.g. self_instruct: {{...}}")
    for recipe in raw.values():
        if isinstance(recipe, dict):
            for key, value in recipe.items():
                # JSON mapping allows both spellings of a field: seed_tasks_path, seedTasksPath.
                if key.endswith(("_path", "Path")) and isinstance(value, str) and not Path(value).is_absolute():
                    recipe[key] = str((path.parent / value).resolve())
    if output_dir is not None:
        raw["output_dir"] = str(output_dir.resolve())
    try:
        return json_format.ParseDict(raw, coordinator_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise RecipeError(f"{path}: {exc}") from exc


def default_job_id(path: Path, spec: coordinator_pb2.JobSpec) -> str:
    """The same file and content give the same id, so running it again resumes or returns the job."""
    return f"{path.stem}-{spec_hash(spec)[:10]}"


def _progress_line(job: coordinator_pb2.Job) -> str:
    parts: list[str] = []
    for stage in job.stages:
        if stage.stage == "dataset" and stage.HasField("total"):
            done = min(stage.kept, stage.total)
            filled = int(20 * done / max(stage.total, 1))
            parts.insert(0, f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{stage.total} kept")
        else:
            parts.append(f"{stage.stage} {stage.kept}/{stage.done}")
    return "  ".join(parts) or "starting"


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


async def run_job(target: str, job_id: str, spec: coordinator_pb2.JobSpec, show_progress: bool = True) -> int:
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
            submitted = await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=job_id, spec=spec))
        except grpc.aio.AioRpcError as exc:
            print(f"error: job refused: {rpc_error_text(exc)}", file=sys.stderr)
            return 2
        print(f"job {job_id}: {submission_outcome(submitted)}", file=sys.stderr)
        job = submitted.job
        tty = sys.stderr.isatty()
        while job.state not in TERMINAL_STATES:
            # Every call has a deadline, a watch too: a job that outlives one is watched again.
            try:
                async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=WATCH_SECONDS):
                    job = event.job
                    if show_progress:
                        print(("\r" if tty else "") + _progress_line(job) + ("" if tty else "\n"), end="", file=sys.stderr, flush=True)
            except grpc.aio.AioRpcError as exc:
                if not is_transient(exc):  # a deadline, a restart, too many watchers: watch again
                    raise
                await asyncio.sleep(1)
        if tty and show_progress:
            print(file=sys.stderr)
        state = coordinator_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        print(f"\njob {job_id}: {state}")
        print(summary_table(job))
        if job.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
            if job.error:
                print(f"error: {job.error}", file=sys.stderr)
            return 1
        exported = await stub.ExportJob(coordinator_pb2.ExportJobRequest(job_id=job_id), timeout=600)
        print("\nfiles:")
        for file in exported.files:
            print(f"  {file.path}" + (f"  ({file.rows} rows)" if file.kind not in ("manifest", "dataset_card") else ""))
        return 0


async def run_in_process(spec: coordinator_pb2.JobSpec, job_id: str, data_dir: Path, options: Any, show_progress: bool = True) -> int:
    """Hosts the services the recipe calls and a coordinator here (loopback,
    free ports), runs the job, stops them."""
    from autodidact.coordinator.jobs import validate_spec
    from autodidact.errors import InvalidArgument
    from autodidact.runtime.server import settle_heap
    from autodidact.runtime.settings import ServerSettings
    from autodidact.stack import LocalStack, services_for

    try:  # refused here, before any model loads, exactly as the coordinator would refuse it
        validate_spec(spec, job_id)
    except InvalidArgument as exc:
        print(f"error: job refused: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    stack = LocalStack(options.under(data_dir))
    server = ServerSettings(grace_seconds=5)
    try:
        await stack.start(services_for(spec.WhichOneof("recipe") or ""), server)
        # Models load before the job starts: llama.cpp silences the process's stderr while it
        # loads one, which would swallow progress lines printed meanwhile.
        await stack.wait_ready()
        await stack.start(["coordinator"], server)
        settle_heap()
        return await run_job(stack.target("coordinator"), job_id, spec, show_progress)
    finally:
        await stack.stop(grace=5)
