"""Which dedup shard owns a namespace: the one place that decides it.

Dedup runs as N shards (a StatefulSet, a volume each), and every namespace
lives on exactly one of them. The owner is picked by rendezvous hashing of
"<owning tenant>/<namespace>" over the shard indexes: stable for as long as N
is, with no table to keep, and growing N to N+1 moves only the namespaces the
new shard wins (about 1/(N+1) of them) where `hash % N` would move most.

ShardedDedup is what the coordinator calls: the DedupService stub's methods,
each sent to the shard that owns the request's namespace. A dedup server told
its own index (--shard I/N) refuses a namespace it does not own, so a
misconfigured route fails loudly instead of forking a namespace in two.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autodidact.errors import FailedPrecondition
from autodidact.runtime.principal import current_principal
from autodidact.v1 import dedup_pb2_grpc


def shard_of(owner: str, namespace: str, shards: int) -> int:
    """The index (0 to shards-1) of the shard that owns `owner`'s namespace `namespace`."""
    key = f"{owner}/{namespace}".encode()

    def weight(index: int) -> bytes:
        return hashlib.blake2b(key, digest_size=8, salt=index.to_bytes(8, "little")).digest()

    return max(range(shards), key=weight)


def owner_and_name(requested: str, tenant: str) -> tuple[str, str]:
    """The owning tenant and name of a namespace as a caller of `tenant` names it:
    its own "<name>", or "<owner>/<name>" another tenant shared with it."""
    owner, _, name = requested.rpartition("/")
    return owner or tenant, name


SHARD_PATTERN = re.compile(r"([0-9]{1,4})/([0-9]{1,4})\Z")


@dataclass(frozen=True)
class Shard:
    """A dedup server's place among the shards (--shard INDEX/COUNT): it serves only the
    namespaces shard_of gives its index."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = SHARD_PATTERN.match(text.strip())
        if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"{text!r} is not INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/3")
        return cls(int(match.group(1)), int(match.group(2)))

    def check_owns(self, requested: str, tenant: str) -> None:
        """FAILED_PRECONDITION for a namespace another shard owns: a caller whose shard
        list disagrees with this server's must not fork the namespace in two."""
        owner, name = owner_and_name(requested, tenant)
        owning = shard_of(owner, name, self.count)
        if owning != self.index:
            raise FailedPrecondition(
                f"namespace {requested!r} belongs to dedup shard {owning} of {self.count}, not to this one ({self.index}): "
                "the caller's --dedup-target must list every shard, in shard order"
            )


class ShardedDedup:
    """A DedupService stub over several shards (their stubs in shard-index order)."""

    def __init__(self, shards: Sequence[dedup_pb2_grpc.DedupServiceStub]) -> None:
        if not shards:
            raise ValueError("at least one dedup shard is needed")
        self._shards = list(shards)

    def shard_for(self, namespace: str) -> dedup_pb2_grpc.DedupServiceStub:
        """The stub of the shard owning `namespace`, as the current principal's tenant names it."""
        owner, name = owner_and_name(namespace, current_principal().tenant)
        return self._shards[shard_of(owner, name, len(self._shards))]

    def FilterBatch(self, request: Any, **options: Any) -> Any:
        return self.shard_for(request.namespace).FilterBatch(request, **options)

    def GetNamespace(self, request: Any, **options: Any) -> Any:
        return self.shard_for(request.namespace).GetNamespace(request, **options)

    def ShareNamespace(self, request: Any, **options: Any) -> Any:
        return self.shard_for(request.namespace).ShareNamespace(request, **options)
