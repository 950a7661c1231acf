"""The dedup servicer: validate, call the diversity filter, map the result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from autodidact.backends.embed import Embedder
from autodidact.dedup.defaults import DEFAULT_THRESHOLD, NamespaceSettings, is_namespace_reference
from autodidact.dedup.diversity import DiversityFilter
from autodidact.dedup.namespaces import NamespaceRegistry
from autodidact.dedup.routing import Shard
from autodidact.errors import InvalidArgument
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.principal import TENANT_PATTERN, current_principal
from autodidact.v1 import dedup_pb2, dedup_pb2_grpc
from autodidact.validation import ID_RULE, check_count, check_id, check_length, check_range, quoted

SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].full_name
MAX_ITEMS = 4096
MAX_TEXT_CHARS = 65_536


def check_namespace(field: str, name: str) -> None:
    """A namespace as callers name it: "<name>", or "<owner tenant>/<name>" when shared with them."""
    if not is_namespace_reference(name):
        raise InvalidArgument(field, f"{ID_RULE}, or '<owner tenant>/<name>' for one shared with you, got {quoted(name)}")


def check_tenant(field: str, tenant: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidArgument(
            field, f"must be a tenant name, 1 to 64 characters of a-z 0-9 -, starting with a letter or digit, got {quoted(tenant)}"
        )


def parse_share(request: dedup_pb2.ShareNamespaceRequest) -> tuple[str, str]:
    # Only the caller's own namespace is shared: a plain name, never "<owner>/<name>".
    check_id("namespace", request.namespace)
    check_tenant("tenant", request.tenant)
    return request.namespace, request.tenant


def parse_filter_batch(request: dedup_pb2.FilterBatchRequest) -> tuple[list[str], list[str], float]:
    check_namespace("namespace", request.namespace)
    check_count("items", request.items, 1, MAX_ITEMS)
    seen: set[str] = set()
    for i, item in enumerate(request.items):
        check_length(f"items[{i}].id", item.id, 1, 256)
        check_length(f"items[{i}].text", item.text, 1, MAX_TEXT_CHARS)
        if item.id in seen:
            raise InvalidArgument(f"items[{i}].id", f"{quoted(item.id)} appears twice in the batch")
        seen.add(item.id)
    threshold = request.threshold if request.HasField("threshold") else DEFAULT_THRESHOLD
    check_range("threshold", threshold, 0.0, 1.0)
    check_length("batch_id", request.batch_id, 0, 256)
    return [item.id for item in request.items], [item.text for item in request.items], threshold


@dataclass
class DedupBackend:
    """What the dedup servicer needs once loaded: the embedder and the namespaces it fills."""

    embedder: Embedder
    namespaces: NamespaceRegistry
    diversity: DiversityFilter

    async def close(self) -> None:
        await self.embedder.close()
        self.namespaces.close()


class DedupServicer(dedup_pb2_grpc.DedupServiceServicer):
    def __init__(self, backend: Resource[DedupBackend], shard: Shard | None = None) -> None:
        self._backend = backend
        self._shard = shard  # one of several shards: it serves only the namespaces it owns

    def _check_owned(self, namespace: str) -> None:
        if self._shard is not None:
            self._shard.check_owns(namespace, current_principal().tenant)

    async def FilterBatch(self, request: dedup_pb2.FilterBatchRequest, context: grpc.aio.ServicerContext) -> dedup_pb2.FilterBatchResponse:
        diversity = self._backend.get().diversity
        ids, texts, threshold = parse_filter_batch(request)
        self._check_owned(request.namespace)
        result = await diversity.filter_batch(request.namespace, ids, texts, threshold, request.batch_id, request.dry_run)
        return dedup_pb2.FilterBatchResponse(
            verdicts=[
                dedup_pb2.DedupVerdict(id=v.id, kept=v.kept, nearest_id=v.nearest_id, similarity=v.similarity) for v in result.verdicts
            ],
            namespace_size=result.namespace_size,
        )

    async def GetNamespace(
        self, request: dedup_pb2.GetNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> dedup_pb2.GetNamespaceResponse:
        backend = self._backend.get()
        check_namespace("namespace", request.namespace)
        self._check_owned(request.namespace)
        size, kind = await asyncio.to_thread(backend.diversity.describe, request.namespace)
        description = backend.embedder.description
        return dedup_pb2.GetNamespaceResponse(
            size=size, index_kind=kind, dimension=description.dimension, embedder=f"{description.backend}:{description.model}"
        )

    async def ShareNamespace(
        self, request: dedup_pb2.ShareNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> dedup_pb2.ShareNamespaceResponse:
        diversity = self._backend.get().diversity
        namespace, tenant = parse_share(request)
        self._check_owned(namespace)
        tenants = await asyncio.to_thread(diversity.share, namespace, tenant)
        return dedup_pb2.ShareNamespaceResponse(tenants=tenants)


def dedup_component(
    load_embedder: Callable[[], Awaitable[Embedder]], data_dir: Path, settings: NamespaceSettings | None = None, shard: Shard | None = None
) -> Component:
    async def open_backend() -> DedupBackend:
        embedder = await load_embedder()
        # Moves pre-tenancy namespaces (data_dir/namespaces/<name>) to tenant "default" first.
        namespaces = NamespaceRegistry(data_dir, embedder.description.dimension, settings)
        return DedupBackend(embedder, namespaces, DiversityFilter(embedder, namespaces))

    backend = Resource("the embedder", open_backend)
    return Component(SERVICE_NAME, DedupServicer(backend, shard), dedup_pb2_grpc.add_DedupServiceServicer_to_server, backend)
