"""The coordinator's files, per tenant: uploaded datasets, and each job's
folder (its input snapshots and its exported dataset).

    <data_dir>/tenants/<tenant>/datasets/<dataset_id>.data   the bytes
    <data_dir>/tenants/<tenant>/datasets/<dataset_id>.json   name, format, size, sha256, created_at
    <data_dir>/tenants/<tenant>/jobs/<job_id>/inputs/<field> snapshots (inputs.py)
    <data_dir>/tenants/<tenant>/jobs/<job_id>/dataset/       the export

Every name in a path is checked (check_id) before it is joined, so no caller
input climbs out of its tenant's folder; callers never name a path.

An upload streams into a temporary file in the tenant's folder, hashed as it
comes, and becomes the dataset only once its size and sha256 match what the
header declared (then renamed into place: a crash leaves no half dataset, and
the next start removes the temporary files). A dataset's id is its content's
hash, so uploading the same bytes again returns the dataset already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2

from autodidact.coordinator.store import LEGACY_TENANT
from autodidact.coordinator.tenants import Quotas
from autodidact.errors import InvalidArgument, NotFound, StartupError
from autodidact.v1 import coordinator_pb2
from autodidact.validation import check_id, check_length, quoted

DATASET_ID = re.compile(r"ds-[0-9a-f]{32}\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
FORMATS = (coordinator_pb2.DATASET_FORMAT_JSONL, coordinator_pb2.DATASET_FORMAT_JSON)
UPLOAD_PREFIX = ".upload-"
# A partial upload or submission snapshot untouched this long is a crash's leftover: an upload
# sends something every UPLOAD_IDLE_SECONDS (60) or is abandoned, and a snapshot writes as it copies.
LEFTOVER_SECONDS = 3600.0
PAGE_TOKEN = re.compile(r"ds-[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    name: str
    format: int
    size_bytes: int
    sha256: str
    created_at: float

    def message(self) -> coordinator_pb2.Dataset:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(self.created_at * 1e9))
        return coordinator_pb2.Dataset(
            dataset_id=self.dataset_id,
            name=self.name,
            format=self.format,  # type: ignore[arg-type]
            size_bytes=self.size_bytes,
            sha256=self.sha256,
            created_at=created,
        )


def check_dataset_id(field: str, dataset_id: str) -> None:
    if not DATASET_ID.match(dataset_id):
        raise InvalidArgument(field, f'must be "ds-" and 32 hex digits (UploadDataset returns it), got {quoted(dataset_id)}')


def check_header(header: coordinator_pb2.UploadDatasetHeader, quotas: Quotas, tenant: str) -> None:
    check_length("header.name", header.name, 1, 256)
    if any(ord(c) < 32 or ord(c) == 127 for c in header.name):
        raise InvalidArgument("header.name", "must not hold control characters")
    if header.format not in FORMATS:
        raise InvalidArgument("header.format", "must be DATASET_FORMAT_JSONL or DATASET_FORMAT_JSON")
    if not SHA256.match(header.sha256):
        raise InvalidArgument("header.sha256", f"must be the content's sha256 as 64 lowercase hex digits, got {quoted(header.sha256)}")
    if header.size_bytes == 0:
        raise InvalidArgument("header.size_bytes", "must be the number of bytes that follow, at least 1")
    if header.size_bytes > quotas.upload_bytes:
        raise quotas.exceeded(tenant, "upload_bytes", f"the upload declares {header.size_bytes:,} bytes")


class TenantStorage:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "tenants"

    def tenant_dir(self, tenant: str) -> Path:
        check_id("tenant", tenant)
        return self.root / tenant

    def job_dir(self, tenant: str, job_id: str) -> Path:
        check_id("job_id", job_id)
        return self.tenant_dir(tenant) / "jobs" / job_id

    def inputs_dir(self, tenant: str, job_id: str) -> Path:
        return self.job_dir(tenant, job_id) / "inputs"

    def dataset_dir(self, tenant: str, job_id: str) -> Path:
        return self.job_dir(tenant, job_id) / "dataset"

    def _datasets(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "datasets"

    # --- start ---

    def prepare(self, legacy_jobs: Path) -> None:
        """At start: removes the temporary files of uploads and submissions a crash
        interrupted, and moves the job folders of a coordinator from before tenants
        (<data_dir>/jobs) to tenant "default". Replicas may share this folder: only
        leftovers untouched for LEFTOVER_SECONDS go, not another replica's work in progress."""
        self.root.mkdir(parents=True, exist_ok=True)
        stale_before = time.time() - LEFTOVER_SECONDS
        for tenant in self.root.iterdir():
            leftovers = [*(tenant / "datasets").glob(UPLOAD_PREFIX + "*"), *(tenant / "staging").glob("*")]
            for leftover in leftovers:
                with contextlib.suppress(FileNotFoundError):
                    if leftover.lstat().st_mtime < stale_before:
                        if leftover.is_dir() and not leftover.is_symlink():
                            shutil.rmtree(leftover, ignore_errors=True)
                        else:
                            leftover.unlink()
        if legacy_jobs.is_dir():
            target = self.tenant_dir(LEGACY_TENANT) / "jobs"
            target.mkdir(parents=True, exist_ok=True)
            for job in sorted(legacy_jobs.iterdir()):  # one rename each: a crash midway moves the rest next start
                if (target / job.name).exists():
                    raise StartupError(f"job folder {job} is also at {target / job.name}: keep one of them, then start again")
                os.replace(job, target / job.name)
            legacy_jobs.rmdir()

    # --- usage (quotas) ---

    def stored_bytes(self, tenant: str) -> int:
        """What the tenant stores that counts against stored_bytes: its datasets and its jobs' input snapshots."""
        folder = self.tenant_dir(tenant)
        # A job's snapshot of an uploaded dataset is a hard link to it: each file counts once.
        seen: dict[tuple[int, int], int] = {}
        # Input snapshots only: not the spec hash kept beside them (a dotfile, jobs.SPEC_HASH_FILE).
        for path in (*(folder / "datasets").glob("*.data"), *folder.glob("jobs/*/inputs/[!.]*")):
            try:
                info = path.lstat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                seen[(info.st_dev, info.st_ino)] = info.st_size
        return sum(seen.values())

    # --- datasets ---

    def dataset_file(self, tenant: str, field: str, dataset_id: str) -> Path:
        """The data file of one of the tenant's datasets; NotFound naming only the id (and `field`)."""
        check_dataset_id(field, dataset_id)
        path = self._datasets(tenant) / f"{dataset_id}.data"
        if not path.with_suffix(".json").is_file():
            raise NotFound(f"dataset {dataset_id!r} does not exist")
        return path

    def get(self, tenant: str, dataset_id: str) -> DatasetInfo:
        check_dataset_id("dataset_id", dataset_id)
        try:
            raw = json.loads((self._datasets(tenant) / f"{dataset_id}.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"dataset {dataset_id!r} does not exist") from None
        return DatasetInfo(**raw)

    def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[DatasetInfo], str]:
        """Newest first; the token is the last dataset id of the previous page."""
        if page_token and not PAGE_TOKEN.match(page_token):
            raise InvalidArgument("page_token", "is not a token from a previous ListDatasets response")
        infos = []
        for path in self._datasets(tenant).glob("ds-*.json"):
            try:
                infos.append(DatasetInfo(**json.loads(path.read_text())))
            except FileNotFoundError:  # deleted meanwhile
                continue
        infos.sort(key=lambda info: (-info.created_at, info.dataset_id))
        if page_token:
            after = next((i for i, info in enumerate(infos) if info.dataset_id == page_token), None)
            if after is None:
                raise InvalidArgument("page_token", "names a dataset that no longer exists; list again from the first page")
            infos = infos[after + 1 :]
        page = infos[:page_size]
        return page, page[-1].dataset_id if len(infos) > page_size else ""

    def delete(self, tenant: str, dataset_id: str) -> None:
        """Deletes the dataset; jobs that used it keep their own snapshot (a hard link to the same bytes)."""
        self.get(tenant, dataset_id)
        folder = self._datasets(tenant)
        (folder / f"{dataset_id}.json").unlink(missing_ok=True)  # first: without it the dataset does not exist
        (folder / f"{dataset_id}.data").unlink(missing_ok=True)

    async def upload(
        self, tenant: str, header: coordinator_pb2.UploadDatasetHeader, chunks: AsyncIterator[bytes], quotas: Quotas
    ) -> tuple[DatasetInfo, bool]:
        """Streams the chunks into the tenant's datasets; (dataset, created)."""
        check_header(header, quotas, tenant)
        folder = self._datasets(tenant)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        known = await asyncio.to_thread(self._existing, tenant, header)
        if known is not None:
            # The tenant has this content: nothing to store, whatever the quota says, and no need to
            # read the bytes (the caller gets the dataset whose content it declared).
            return known, False
        used = await asyncio.to_thread(self.stored_bytes, tenant)
        if used + header.size_bytes > quotas.stored_bytes:
            raise quotas.exceeded(tenant, "stored_bytes", f"{used:,} bytes are stored and the upload declares {header.size_bytes:,} more")
        partial = folder / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with partial.open("wb") as sink:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > header.size_bytes:
                        raise InvalidArgument(
                            "chunk", f"the chunks hold more than the {header.size_bytes:,} bytes header.size_bytes declares"
                        )
                    digest.update(chunk)
                    await asyncio.to_thread(sink.write, chunk)
                await asyncio.to_thread(_sync, sink)
            if size != header.size_bytes:
                raise InvalidArgument("header.size_bytes", f"declares {header.size_bytes:,} bytes, but the chunks held {size:,}")
            if digest.hexdigest() != header.sha256:
                raise InvalidArgument("header.sha256", f"does not match the bytes sent (their sha256 is {digest.hexdigest()})")
            return await asyncio.to_thread(self._keep, tenant, partial, header)
        finally:
            partial.unlink(missing_ok=True)

    def _existing(self, tenant: str, header: coordinator_pb2.UploadDatasetHeader) -> DatasetInfo | None:
        """The tenant's dataset with the header's content, if it has one."""
        try:
            info = self.get(tenant, "ds-" + header.sha256[:32])
        except NotFound:
            return None
        if info.sha256 != header.sha256:
            return None
        if info.size_bytes != header.size_bytes:
            raise InvalidArgument(
                "header.size_bytes", f"declares {header.size_bytes:,} bytes; content with this sha256 has {info.size_bytes:,}"
            )
        return info

    def _keep(self, tenant: str, partial: Path, header: coordinator_pb2.UploadDatasetHeader) -> tuple[DatasetInfo, bool]:
        dataset_id = "ds-" + header.sha256[:32]
        folder = self._datasets(tenant)
        try:
            return self.get(tenant, dataset_id), False
        except NotFound:
            pass
        info = DatasetInfo(dataset_id, header.name, header.format, header.size_bytes, header.sha256, time.time())
        os.replace(partial, folder / f"{dataset_id}.data")
        _write_json(folder / f"{dataset_id}.json", vars(info))  # last: the dataset exists once this file does
        return info, True

    def remove_job_inputs(self, tenant: str, job_id: str) -> None:
        shutil.rmtree(self.inputs_dir(tenant, job_id), ignore_errors=True)


def _sync(sink: Any) -> None:
    sink.flush()
    os.fsync(sink.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(f"{UPLOAD_PREFIX}{uuid.uuid4().hex}")
    with partial.open("w") as sink:
        json.dump(value, sink)
        _sync(sink)
    os.replace(partial, path)
