"""The coordinator servicer: validate, call the job manager, map the result.

Job ids are checked by the job manager, which looks every job up through one place (`_row`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from autodidact.coordinator.export import ObjectStorePublisher
from autodidact.coordinator.jobs import JobManager
from autodidact.coordinator.protos import record_message
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import JobStore, SqliteJobStore
from autodidact.coordinator.tenants import Tenants
from autodidact.dedup.routing import ShardedDedup
from autodidact.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, StartupError
from autodidact.runtime.auth import audit_object
from autodidact.runtime.channels import create_channel
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.principal import current_principal
from autodidact.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    critic_pb2_grpc,
    dedup_pb2_grpc,
    generator_pb2_grpc,
    scorer_pb2_grpc,
    tool_executor_pb2_grpc,
)
from autodidact.validation import check_range

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass(frozen=True)
class CoordinatorSettings:
    # Where the job store (jobs.sqlite) and default dataset folders live.
    data_dir: Path = Path(".autodidact/coordinator")
    # A PostgreSQL DSN (postgresql://user:password@host/db): the job store is there instead of
    # data_dir/jobs.sqlite. "" (the default): the embedded SQLite store.
    store_dsn: str = ""
    # How long this coordinator's hold on a running job lasts unless renewed (every third of it):
    # how soon another replica on the same store takes over the jobs of one that died.
    lease_seconds: float = 30.0
    generator_target: str = "localhost:50051"
    # One address, or the dedup shards' addresses in shard order, comma-separated
    # ("dns:///dedup-0.dedup:50055,dns:///dedup-1.dedup:50055"): dedup/routing.py picks each namespace's.
    dedup_target: str = "localhost:50055"
    scorer_target: str = "localhost:50052"
    tool_executor_target: str = "localhost:50054"
    critic_target: str = "localhost:50053"
    # How long a job waits out a service that is down before it fails.
    patience_seconds: float = 600.0
    # Quotas and input roots per tenant (tenants.py); None: the defaults for every tenant.
    tenants_file: Path | None = None
    # Server folders and object-store prefixes every tenant's jobs may read (--input-root). None by default:
    # jobs read only what callers send (uploads, inline inputs).
    input_roots: tuple[str, ...] = ()
    # An object-store prefix (s3://bucket/exports) exports are also put under, with presigned URLs; "" for none.
    export_url: str = ""
    export_url_ttl_seconds: float = 3600.0


# An upload that sends nothing for this long is abandoned: it holds one of the server's call slots.
UPLOAD_IDLE_SECONDS = 60.0
# Uploads in progress at once per tenant: one tenant's slow uploads cannot take every call slot.
UPLOADS_PER_TENANT = 4


async def _next_message(messages: AsyncIterator[coordinator_pb2.UploadDatasetRequest]) -> coordinator_pb2.UploadDatasetRequest | None:
    """The upload's next message (None at its end), within UPLOAD_IDLE_SECONDS."""
    try:
        return await asyncio.wait_for(anext(messages, None), UPLOAD_IDLE_SECONDS)
    except TimeoutError:
        raise DeadlineExceeded(f"the upload sent nothing for {UPLOAD_IDLE_SECONDS:g} s and was abandoned; upload again") from None


class UploadSlots:
    """Counts each tenant's uploads in progress; one over UPLOADS_PER_TENANT is RESOURCE_EXHAUSTED."""

    def __init__(self, per_tenant: int = UPLOADS_PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._in_progress: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        if self._in_progress.get(tenant, 0) >= self.per_tenant:
            raise ResourceExhausted(f"tenant {tenant!r} already has {self.per_tenant} uploads in progress; finish one first")
        self._in_progress[tenant] = self._in_progress.get(tenant, 0) + 1
        try:
            yield
        finally:
            self._in_progress[tenant] -= 1


@dataclass
class Coordinator:
    """What the coordinator servicer needs once loaded: the job store, the channels to the
    services recipes call, the tenants' files and policies, and the job manager over them."""

    store: JobStore
    channels: list[grpc.aio.Channel]
    manager: JobManager
    storage: TenantStorage
    tenants: Tenants
    uploads: UploadSlots = field(default_factory=UploadSlots)

    async def close(self) -> None:
        await self.manager.close()
        for channel in self.channels:
            await channel.close()
        await self.store.close()


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Resource[Coordinator]) -> None:
        self._coordinator = coordinator

    def _manager(self) -> JobManager:
        return self._coordinator.get().manager

    async def SubmitJob(
        self, request: coordinator_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.SubmitJobResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        job, created, resumed = await self._manager().submit(request.job_id, request.spec)
        return coordinator_pb2.SubmitJobResponse(job=job, created=created, resumed=resumed)

    async def GetJob(self, request: coordinator_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> coordinator_pb2.GetJobResponse:
        return coordinator_pb2.GetJobResponse(job=await self._manager().get(request.job_id))

    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListJobsResponse:
        jobs, token = await self._manager().list_jobs(request.page_size, request.page_token)
        return coordinator_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(
        self, request: coordinator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CancelJobResponse:
        return coordinator_pb2.CancelJobResponse(job=await self._manager().cancel(request.job_id))

    async def WatchJob(
        self, request: coordinator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        async for job in self._manager().watch(request.job_id):
            yield coordinator_pb2.WatchJobResponse(job=job)

    async def StreamSamples(
        self, request: coordinator_pb2.StreamSamplesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.StreamSamplesResponse]:
        async for record in self._manager().samples(request.job_id, follow=request.follow, include_dropped=request.include_dropped):
            yield coordinator_pb2.StreamSamplesResponse(record=record_message(record))

    async def ExportJob(
        self, request: coordinator_pb2.ExportJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ExportJobResponse:
        return coordinator_pb2.ExportJobResponse(files=await self._manager().export(request.job_id))

    async def DownloadExport(
        self, request: coordinator_pb2.DownloadExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.DownloadExportResponse]:
        async for chunk in self._manager().download(request.job_id, request.name):
            yield chunk

    async def UploadDataset(
        self, request_iterator: AsyncIterator[coordinator_pb2.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.UploadDatasetResponse:
        coordinator = self._coordinator.get()
        tenant = current_principal().tenant
        messages = aiter(request_iterator)
        with coordinator.uploads.slot(tenant):
            first = await _next_message(messages)
            if first is None or not first.HasField("header"):
                raise InvalidArgument("header", "must come first: the upload's name, format, sha256 and size_bytes")

            async def chunks() -> AsyncIterator[bytes]:
                while (message := await _next_message(messages)) is not None:
                    if not message.HasField("chunk"):
                        raise InvalidArgument("header", "comes once, first; every later message is a chunk")
                    yield message.chunk

            info, created = await coordinator.storage.upload(tenant, first.header, chunks(), coordinator.tenants.policy(tenant).quotas)
        audit_object(info.dataset_id)
        return coordinator_pb2.UploadDatasetResponse(dataset=info.message(), created=created)

    async def GetDataset(
        self, request: coordinator_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GetDatasetResponse:
        storage = self._coordinator.get().storage
        info = await asyncio.to_thread(storage.get, current_principal().tenant, request.dataset_id)
        return coordinator_pb2.GetDatasetResponse(dataset=info.message())

    async def ListDatasets(
        self, request: coordinator_pb2.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListDatasetsResponse:
        size = request.page_size or 50
        check_range("page_size", size, 1, 1000)
        storage = self._coordinator.get().storage
        infos, token = await asyncio.to_thread(storage.list, current_principal().tenant, size, request.page_token)
        return coordinator_pb2.ListDatasetsResponse(datasets=[info.message() for info in infos], next_page_token=token)

    async def DeleteDataset(
        self, request: coordinator_pb2.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.DeleteDatasetResponse:
        storage = self._coordinator.get().storage
        await asyncio.to_thread(storage.delete, current_principal().tenant, request.dataset_id)
        return coordinator_pb2.DeleteDatasetResponse()

    async def ListReviews(
        self, request: coordinator_pb2.ListReviewsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListReviewsResponse:
        return await self._manager().list_reviews(request.job_id, request.page_size, request.page_token)

    async def SubmitReviews(
        self, request: coordinator_pb2.SubmitReviewsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.SubmitReviewsResponse:
        return await self._manager().submit_reviews(request.job_id, list(request.reviews))

    async def RetryJob(
        self, request: coordinator_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RetryJobResponse:
        return coordinator_pb2.RetryJobResponse(job=await self._manager().retry(request.job_id))


def open_job_store(settings: CoordinatorSettings) -> JobStore:
    """The store the settings name: PostgreSQL (the postgres extra, imported only then) or the embedded SQLite file."""
    if settings.store_dsn:
        from autodidact.coordinator.postgres_store import PostgresJobStore

        return PostgresJobStore(settings.store_dsn)
    return SqliteJobStore(settings.data_dir / "jobs.sqlite")


def dedup_targets(settings: CoordinatorSettings) -> list[str]:
    """The dedup shards' addresses, in shard order (one for an unsharded dedup service)."""
    targets = [target.strip() for target in settings.dedup_target.split(",")]
    if not all(targets):
        raise StartupError(f"--dedup-target {settings.dedup_target!r}: give one address, or the shards' addresses separated by commas")
    return targets


def coordinator_component(settings: CoordinatorSettings) -> Component:
    async def open_coordinator() -> Coordinator:
        tenants = Tenants.load(settings.tenants_file, settings.input_roots)
        storage = TenantStorage(settings.data_dir)
        await asyncio.to_thread(storage.prepare, settings.data_dir / "jobs")
        publish = ObjectStorePublisher(settings.export_url, settings.export_url_ttl_seconds) if settings.export_url else None
        store = await asyncio.to_thread(open_job_store, settings)
        dedup_shards = [create_channel(target, timeout_seconds=300) for target in dedup_targets(settings)]
        # Channels connect lazily: a recipe that never calls a service never needs it up.
        channels = {
            "generator": create_channel(settings.generator_target, timeout_seconds=900),
            "scorer": create_channel(settings.scorer_target, timeout_seconds=900),
            "tool-executor": create_channel(settings.tool_executor_target, timeout_seconds=300),
            "critic": create_channel(settings.critic_target, timeout_seconds=1800),
        }
        services = Services(
            generator=generator_pb2_grpc.GeneratorServiceStub(channels["generator"]),
            dedup=ShardedDedup([dedup_pb2_grpc.DedupServiceStub(channel) for channel in dedup_shards]),  # type: ignore[arg-type]
            scorer=scorer_pb2_grpc.ScorerServiceStub(channels["scorer"]),
            tool_executor=tool_executor_pb2_grpc.ToolExecutorServiceStub(channels["tool-executor"]),
            critic=critic_pb2_grpc.CriticServiceStub(channels["critic"]),
            patience_seconds=settings.patience_seconds,
        )
        manager = JobManager(store, services, storage, tenants, publish, lease_seconds=settings.lease_seconds)
        return Coordinator(store, [*channels.values(), *dedup_shards], manager, storage, tenants)

    async def resume(coordinator: Coordinator) -> None:
        # Calls are answered while jobs resume; health turns SERVING once they have.
        await coordinator.manager.resume_unfinished()

    coordinator = Resource("the coordinator", open_coordinator, after_open=resume)
    servicer = CoordinatorServicer(coordinator)
    return Component(SERVICE_NAME, servicer, coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, coordinator)
