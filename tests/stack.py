"""The whole stack in this process, over real gRPC on loopback, for integration tests.

Wired by autodidact.stack.LocalStack, exactly as `autodidact up` and `autodidact run` wire theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.coordinator.service import CoordinatorSettings
from autodidact.runner import Upload, download, upload
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import LocalStack, StackOptions
from autodidact.v1 import coordinator_pb2
from tests.conftest import MODEL

Stack = LocalStack


async def start_stack(
    data_dir: Path, names: tuple[str, ...] = ("generator", "dedup", "coordinator"), input_roots: tuple[str, ...] = ()
) -> LocalStack:
    """Starts `names` (in start order, each loaded before the next) with the test model; a job
    waits out a service that is down for 30 s, not 10 minutes. `input_roots`: the server
    folders jobs may read (none: callers upload their inputs)."""
    coordinator = CoordinatorSettings(patience_seconds=30, input_roots=input_roots)
    options = StackOptions(llamacpp=MODEL, embedder=LocalEmbedderSettings(threads=2), coordinator=coordinator).under(data_dir)
    stack = LocalStack(options)
    await stack.start(names, ServerSettings(grace_seconds=0), wait_each=True)
    return stack


async def upload_file(stub: Any, path: Path) -> str:
    """Uploads a local file as a dataset (as `autodidact run` does); returns the reference a job names it by."""
    item = Upload.of(path)
    await upload(stub, item)
    return item.reference


async def download_export(stub: Any, job_id: str, directory: Path) -> dict[str, Path]:
    """Exports the job and downloads every file into `directory` (sha256 checked); kind -> local path."""
    exported = await stub.ExportJob(coordinator_pb2.ExportJobRequest(job_id=job_id), timeout=600)
    return {file.kind: await download(stub, job_id, file, directory) for file in exported.files}
