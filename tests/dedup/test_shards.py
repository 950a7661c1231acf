"""Dedup shards over real gRPC with the real embedder: two servers, each told
its place (--shard), the coordinator's ShardedDedup in front. Every namespace
lands on the one shard that owns it, and a server asked for another's
namespace refuses, naming the owner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from autodidact.backends.embed.local import LocalEmbedderSettings
from autodidact.dedup.routing import Shard, ShardedDedup, shard_of
from autodidact.runtime.channels import create_channel
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import StackOptions, build_component
from autodidact.v1 import dedup_pb2, dedup_pb2_grpc
from tests.conftest import details_of

NAMESPACES = [f"job-{n}" for n in range(8)]


@pytest.fixture
async def shards(tmp_path: Path) -> AsyncIterator[list[tuple[ServiceHost, Path]]]:
    hosts = []
    for index in range(2):
        data = tmp_path / f"shard-{index}"
        options = StackOptions(embedder=LocalEmbedderSettings(threads=2), dedup_data_dir=data, dedup_shard=Shard(index, 2))
        host = ServiceHost([build_component("dedup", options)], ServerSettings(grace_seconds=0))
        await host.start()
        await host.wait_ready()
        hosts.append((host, data))
    yield hosts
    for host, _ in hosts:
        await host.stop(grace=0)


async def test_each_namespace_lives_on_its_owning_shard_and_the_others_refuse_it(shards: list[tuple[ServiceHost, Path]]) -> None:
    channels = [create_channel(f"127.0.0.1:{host.port}", timeout_seconds=60) for host, _ in shards]
    stubs = [dedup_pb2_grpc.DedupServiceStub(channel) for channel in channels]
    dedup = ShardedDedup(stubs)
    owners = {name: shard_of("default", name, 2) for name in NAMESPACES}
    assert set(owners.values()) == {0, 1}, "the names should spread over both shards"
    for name in NAMESPACES:
        items = [
            dedup_pb2.DedupItem(id="a", text=f"Write a poem about {name}."),
            dedup_pb2.DedupItem(id="b", text="List three prime numbers."),
        ]
        response = await dedup.FilterBatch(dedup_pb2.FilterBatchRequest(namespace=name, items=items, batch_id="1"))
        assert response.namespace_size == 2
    for name, owner in owners.items():
        size = await stubs[owner].GetNamespace(dedup_pb2.GetNamespaceRequest(namespace=name))
        assert size.size == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs[1 - owner].GetNamespace(dedup_pb2.GetNamespaceRequest(namespace=name))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"belongs to dedup shard {owner} of 2" in details_of(refused.value)
        # On disk too: the namespace's folder is on its owner's volume only.
        on_disk = [(data / "tenants" / "default" / "namespaces" / name).is_dir() for _, data in shards]
        assert on_disk == [owner == 0, owner == 1]
    for channel in channels:
        await channel.close()
