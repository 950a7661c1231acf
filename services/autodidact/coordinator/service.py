"""The coordinator servicer: validate, call the job manager, map the result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from autodidact.coordinator.jobs import JobManager, check_job_id
from autodidact.coordinator.protos import record_message
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.store import JobStore, SqliteJobStore
from autodidact.errors import InvalidArgument
from autodidact.runtime.channels import create_channel
from autodidact.runtime.component import Component, Resource
from autodidact.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    critic_pb2_grpc,
    dedup_pb2_grpc,
    generator_pb2_grpc,
    scorer_pb2_grpc,
    tool_executor_pb2_grpc,
)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass(frozen=True)
class CoordinatorSettings:
    # Where the job store (jobs.sqlite) and default dataset folders live.
    data_dir: Path = Path(".autodidact/coordinator")
    generator_target: str = "localhost:50051"
    dedup_target: str = "localhost:50055"
    scorer_target: str = "localhost:50052"
    tool_executor_target: str = "localhost:50054"
    critic_target: str = "localhost:50053"
    # How long a job waits out a service that is down before it fails.
    patience_seconds: float = 600.0


@dataclass
class Coordinator:
    """What the coordinator servicer needs once loaded: the job store, the channels to the
    services recipes call, and the job manager over both."""

    store: JobStore
    channels: list[grpc.aio.Channel]
    manager: JobManager

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
        check_job_id("job_id", request.job_id)
        return coordinator_pb2.GetJobResponse(job=await self._manager().get(request.job_id))

    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListJobsResponse:
        jobs, token = await self._manager().list_jobs(request.page_size, request.page_token)
        return coordinator_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(
        self, request: coordinator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CancelJobResponse:
        check_job_id("job_id", request.job_id)
        return coordinator_pb2.CancelJobResponse(job=await self._manager().cancel(request.job_id))

    async def WatchJob(
        self, request: coordinator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        check_job_id("job_id", request.job_id)
        async for job in self._manager().watch(request.job_id):
            yield coordinator_pb2.WatchJobResponse(job=job)

    async def StreamSamples(
        self, request: coordinator_pb2.StreamSamplesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.StreamSamplesResponse]:
        check_job_id("job_id", request.job_id)
        async for record in self._manager().samples(request.job_id, follow=request.follow, include_dropped=request.include_dropped):
            yield coordinator_pb2.StreamSamplesResponse(record=record_message(record))

    async def ExportJob(
        self, request: coordinator_pb2.ExportJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ExportJobResponse:
        check_job_id("job_id", request.job_id)
        return coordinator_pb2.ExportJobResponse(files=await self._manager().export(request.job_id))

    async def RetryJob(
        self, request: coordinator_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RetryJobResponse:
        check_job_id("job_id", request.job_id)
        return coordinator_pb2.RetryJobResponse(job=await self._manager().retry(request.job_id))


def coordinator_component(settings: CoordinatorSettings) -> Component:
    async def open_coordinator() -> Coordinator:
        store: JobStore = SqliteJobStore(settings.data_dir / "jobs.sqlite")
        # Channels connect lazily: a recipe that never calls a service never needs it up.
        channels = {
            "generator": create_channel(settings.generator_target, timeout_seconds=900),
            "dedup": create_channel(settings.dedup_target, timeout_seconds=300),
            "scorer": create_channel(settings.scorer_target, timeout_seconds=900),
            "tool-executor": create_channel(settings.tool_executor_target, timeout_seconds=300),
            "critic": create_channel(settings.critic_target, timeout_seconds=1800),
        }
        services = Services(
            generator=generator_pb2_grpc.GeneratorServiceStub(channels["generator"]),
            dedup=dedup_pb2_grpc.DedupServiceStub(channels["dedup"]),
            scorer=scorer_pb2_grpc.ScorerServiceStub(channels["scorer"]),
            tool_executor=tool_executor_pb2_grpc.ToolExecutorServiceStub(channels["tool-executor"]),
            critic=critic_pb2_grpc.CriticServiceStub(channels["critic"]),
            patience_seconds=settings.patience_seconds,
        )
        return Coordinator(store, list(channels.values()), JobManager(store, services, settings.data_dir))

    async def resume(coordinator: Coordinator) -> None:
        # Calls are answered while jobs resume; health turns SERVING once they have.
        await coordinator.manager.resume_unfinished()

    coordinator = Resource("the coordinator", open_coordinator, after_open=resume)
    servicer = CoordinatorServicer(coordinator)
    return Component(SERVICE_NAME, servicer, coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, coordinator)
