"""Routing namespaces to dedup shards (dedup/routing.py): the hash is stable
and balanced, growing the shard count moves few namespaces, and the sharded
stub sends each call to its namespace's owner. The stubs here are DOUBLES that
record what they were sent (the servers' side is in test_shards.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from autodidact.dedup.routing import ShardedDedup, owner_and_name, shard_of
from autodidact.runtime.principal import Principal, acting_as
from autodidact.v1 import dedup_pb2

NAMES = [f"job-{n}-instructions" for n in range(10_000)]


def test_each_namespace_has_one_stable_owner_and_the_shards_share_them_evenly() -> None:
    owners = [shard_of("team-a", name, 4) for name in NAMES]
    assert owners == [shard_of("team-a", name, 4) for name in NAMES], "the same namespace went to another shard"
    counts = Counter(owners)
    assert sorted(counts) == [0, 1, 2, 3] and all(2_200 < count < 2_800 for count in counts.values()), counts
    # The tenant is part of the key: the same name of two tenants need not live together.
    assert sum(shard_of("team-a", name, 4) != shard_of("team-b", name, 4) for name in NAMES) > 6_000
    assert all(shard_of("team-a", name, 1) == 0 for name in NAMES[:100])


def test_a_fifth_shard_takes_about_a_fifth_of_the_namespaces_and_nothing_else_moves() -> None:
    before = [shard_of("team-a", name, 4) for name in NAMES]
    after = [shard_of("team-a", name, 5) for name in NAMES]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == 4 for _, new in moved), "a namespace moved between the old shards"
    assert 0.15 < len(moved) / len(NAMES) < 0.25


def test_a_shared_namespace_is_routed_by_its_owner_not_by_the_caller() -> None:
    assert owner_and_name("instructions", "team-b") == ("team-b", "instructions")
    assert owner_and_name("team-a/instructions", "team-b") == ("team-a", "instructions")


class RecordingShard:
    """A DOUBLE of one shard's stub: records the namespaces it is sent."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def FilterBatch(self, request: Any, **options: Any) -> str:
        self.namespaces.append(request.namespace)
        return "answered"

    GetNamespace = FilterBatch
    ShareNamespace = FilterBatch


def test_the_sharded_stub_sends_every_call_to_the_owner_of_its_namespace() -> None:
    shards = [RecordingShard() for _ in range(3)]
    dedup = ShardedDedup(shards)  # type: ignore[arg-type]
    with acting_as(Principal("team-b", "job:x", frozenset())):
        for name in NAMES[:300]:
            assert dedup.FilterBatch(dedup_pb2.FilterBatchRequest(namespace=name)) == "answered"
            dedup.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace=f"team-a/{name}"))
    for index, shard in enumerate(shards):
        assert shard.namespaces, f"shard {index} got nothing"
        for namespace in shard.namespaces:
            owner, name = owner_and_name(namespace, "team-b")
            assert shard_of(owner, name, 3) == index
    with pytest.raises(ValueError, match="at least one"):
        ShardedDedup([])
