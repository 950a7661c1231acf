"""The tool-executor servicer: validate, run the tools, map the outcomes."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from autodidact.errors import InvalidArgument
from autodidact.runtime.channels import create_channel
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.metrics import TOOL_CALLS
from autodidact.runtime.neighbours import rpc_error_text
from autodidact.runtime.principal import TENANT_PATTERN
from autodidact.tool_executor.sandbox import Sandbox, SandboxSettings
from autodidact.tool_executor.search import TenantCollections
from autodidact.tool_executor.tools import TOOLS, BackendFailure, Complete, ToolExecutor
from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc, tool_executor_pb2, tool_executor_pb2_grpc
from autodidact.validation import check_count, check_length, quoted

SERVICE_NAME = tool_executor_pb2.DESCRIPTOR.services_by_name["ToolExecutorService"].full_name
MAX_CALLS = 256
MAX_INPUT_CHARS = 4096
MAX_DOCUMENTS = 10_000
COLLECTION_PATTERN = re.compile(r"[a-z0-9_-]{1,64}\Z")  # \Z: "$" lets a final newline through
QA_MAX_TOKENS = 48


@dataclass(frozen=True)
class ToolExecutorSettings:
    # Where search collections are stored (tenants/<tenant>/search.sqlite).
    data_dir: Path = Path(".autodidact/tool-executor")
    # The generator that QA and translation ask; empty: those tools answer BACKEND errors.
    generator_target: str = "localhost:50051"
    generator_timeout_seconds: float = 60.0
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)


def check_collection(field_name: str, name: str) -> None:
    """The caller's own collection: only its owner indexes into or shares a collection."""
    if not COLLECTION_PATTERN.match(name):
        raise InvalidArgument(
            field_name, f"must be 1 to 64 characters of a-z 0-9 _ - (one of your tenant's collections), got {quoted(name)}"
        )


def check_searchable_collection(field_name: str, name: str) -> None:
    """A collection to search: the caller's own, or "<owner tenant>/<collection>" shared with it."""
    owner, slash, own = name.rpartition("/")
    if not COLLECTION_PATTERN.match(own) or (slash and not TENANT_PATTERN.match(owner)):
        raise InvalidArgument(
            field_name,
            f"must be 1 to 64 characters of a-z 0-9 _ -, or '<owner tenant>/<collection>' for one shared with you, got {quoted(name)}",
        )


def check_tenant(field_name: str, tenant: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidArgument(
            field_name, f"must be a tenant name, 1 to 64 characters of a-z 0-9 -, starting with a letter or digit, got {quoted(tenant)}"
        )


def parse_execute_request(request: tool_executor_pb2.ExecuteToolsRequest) -> tuple[list[tuple[str, str]], dt.date, str]:
    check_count("calls", request.calls, 1, MAX_CALLS)
    seen: set[str] = set()
    for i, call in enumerate(request.calls):
        check_length(f"calls[{i}].id", call.id, 1, 256)
        if call.id in seen:
            raise InvalidArgument(f"calls[{i}].id", f"{quoted(call.id)} appears twice in the request")
        seen.add(call.id)
        check_length(f"calls[{i}].tool", call.tool, 1, 64)
        check_length(f"calls[{i}].input", call.input, 0, MAX_INPUT_CHARS)
    context = request.context
    reference_date = dt.datetime.now(dt.UTC).date()
    if context.reference_date:
        try:
            reference_date = dt.date.fromisoformat(context.reference_date)
        except ValueError:
            raise InvalidArgument("context.reference_date", f"must be a date YYYY-MM-DD, got {quoted(context.reference_date)}") from None
    if context.collection:
        check_searchable_collection("context.collection", context.collection)
    return [(call.tool, call.input) for call in request.calls], reference_date, context.collection


def parse_index_request(request: tool_executor_pb2.IndexDocumentsRequest) -> list[tuple[str, str]]:
    check_collection("collection", request.collection)
    check_count("documents", request.documents, 1, MAX_DOCUMENTS)
    for i, document in enumerate(request.documents):
        check_length(f"documents[{i}].id", document.id, 1, 256)
        check_length(f"documents[{i}].text", document.text, 1, 65_536)
    return [(d.id, d.text) for d in request.documents]


def parse_share_request(request: tool_executor_pb2.ShareCollectionRequest) -> tuple[str, str]:
    check_collection("collection", request.collection)
    check_tenant("tenant", request.tenant)
    return request.collection, request.tenant


@dataclass
class Tools:
    """What the tool-executor servicer needs once started: the sandbox, the search collections,
    the channel to the generator (QA and translation; None without a generator) and the executor over them."""

    sandbox: Sandbox
    collections: TenantCollections
    generator_channel: grpc.aio.Channel | None
    executor: ToolExecutor

    async def close(self) -> None:
        await self.sandbox.close()
        if self.generator_channel is not None:
            await self.generator_channel.close()
        self.collections.close()


class ToolExecutorServicer(tool_executor_pb2_grpc.ToolExecutorServiceServicer):
    def __init__(self, tools: Resource[Tools]) -> None:
        self._tools = tools

    async def ListTools(
        self, request: tool_executor_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tool_executor_pb2.ListToolsResponse:
        return tool_executor_pb2.ListToolsResponse(
            tools=[
                tool_executor_pb2.ToolSpec(
                    name=t.name,
                    description=t.description,
                    few_shot_prompt=t.few_shot_prompt,
                    prompt_version=t.prompt_version,
                    takes_input=t.takes_input,
                )
                for t in TOOLS.values()
            ]
        )

    async def ExecuteTools(
        self, request: tool_executor_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext
    ) -> tool_executor_pb2.ExecuteToolsResponse:
        executor = self._tools.get().executor
        calls, reference_date, collection = parse_execute_request(request)
        outcomes = await executor.execute(calls, reference_date, collection)
        results = []
        for call, outcome in zip(request.calls, outcomes, strict=True):
            TOOL_CALLS.labels(
                call.tool if call.tool in TOOLS else "unknown", "ok" if outcome.output is not None else outcome.error_kind
            ).inc()
            result = tool_executor_pb2.ToolResult(id=call.id, seconds=outcome.seconds)
            if outcome.output is not None:
                result.output = outcome.output
            else:
                code = tool_executor_pb2.ToolErrorCode.Value(f"TOOL_ERROR_CODE_{outcome.error_kind.upper()}")
                result.error.CopyFrom(tool_executor_pb2.ToolError(code=code, message=outcome.error))
            results.append(result)
        return tool_executor_pb2.ExecuteToolsResponse(results=results)

    async def IndexDocuments(
        self, request: tool_executor_pb2.IndexDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> tool_executor_pb2.IndexDocumentsResponse:
        executor = self._tools.get().executor
        # In a thread: storing thousands of documents must not stall the event loop.
        size = await asyncio.to_thread(executor.index_documents, request.collection, parse_index_request(request))
        return tool_executor_pb2.IndexDocumentsResponse(collection_size=size)

    async def ShareCollection(
        self, request: tool_executor_pb2.ShareCollectionRequest, context: grpc.aio.ServicerContext
    ) -> tool_executor_pb2.ShareCollectionResponse:
        executor = self._tools.get().executor
        collection, tenant = parse_share_request(request)
        tenants = await asyncio.to_thread(executor.share_collection, collection, tenant)
        return tool_executor_pb2.ShareCollectionResponse(tenants=tenants)


def _generator_completion(stub: generator_pb2_grpc.GeneratorServiceAsyncStub, timeout: float) -> Complete:
    async def complete(prompt: str) -> str:
        request = generator_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text=prompt),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=QA_MAX_TOKENS, stop=["\n"]),
            n=1,
        )
        try:
            response = await stub.Generate(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise BackendFailure(f"generator: {rpc_error_text(exc)}") from None
        return response.samples[0].text

    return complete


def tool_executor_component(settings: ToolExecutorSettings) -> Component:
    async def start() -> Tools:
        sandbox = Sandbox(settings.sandbox)
        try:  # a start cut short (a bad data dir, the host stopping) leaves no worker processes behind
            await sandbox.start()
            # Moves the pre-tenancy data_dir/search.sqlite to tenant "default" first.
            collections = TenantCollections(settings.data_dir)
        except BaseException:
            await sandbox.close()
            raise
        channel, complete = None, None
        if settings.generator_target:
            channel = create_channel(settings.generator_target, timeout_seconds=settings.generator_timeout_seconds)
            complete = _generator_completion(generator_pb2_grpc.GeneratorServiceStub(channel), settings.generator_timeout_seconds)
        return Tools(sandbox, collections, channel, ToolExecutor(sandbox, collections, complete))

    tools = Resource("the tool sandbox", start)
    servicer = ToolExecutorServicer(tools)
    return Component(SERVICE_NAME, servicer, tool_executor_pb2_grpc.add_ToolExecutorServiceServicer_to_server, tools)
