"""The diversity filter: embed a batch, judge it against a namespace, add what is kept.

Namespaces are named as the caller's tenant sees them (`current_principal()`):
"<name>" is its own, "<owner>/<name>" one another tenant shared with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from autodidact.backends.embed import Embedder
from autodidact.dedup.defaults import NAMESPACE_PATTERN
from autodidact.dedup.namespaces import NamespaceKey, NamespaceRegistry, Verdict
from autodidact.errors import FailedPrecondition, InvalidArgument, NotFound
from autodidact.runtime.metrics import DEDUP_ITEMS
from autodidact.runtime.principal import ADMIN, current_principal


@dataclass(frozen=True)
class BatchResult:
    verdicts: list[Verdict]
    namespace_size: int


class DiversityFilter:
    def __init__(self, embedder: Embedder, namespaces: NamespaceRegistry) -> None:
        self._embedder = embedder
        self._namespaces = namespaces

    async def filter_batch(
        self, namespace_name: str, ids: list[str], texts: list[str], threshold: float, batch_id: str = "", dry_run: bool = False
    ) -> BatchResult:
        tenant = current_principal().tenant
        key = await asyncio.to_thread(self._namespaces.resolve, tenant, namespace_name, create=True)
        namespace, lock = await asyncio.to_thread(self._namespaces.open, key)
        replayed = await asyncio.to_thread(self._replay, key, namespace_name, batch_id, ids)
        if replayed is not None:
            return replayed
        # Embedding, the slow part, runs outside the namespace lock.
        vectors = await self._embedder.embed(texts)

        def judge_and_commit() -> BatchResult:
            with lock:
                # A concurrent retry of the same batch may have committed meanwhile.
                replayed = self._replay(key, namespace_name, batch_id, ids)
                if replayed is not None:
                    return replayed
                for position, item_id in enumerate(ids):
                    if namespace.contains(item_id):
                        raise InvalidArgument(f"items[{position}].id", f"{item_id!r} is already in namespace {namespace_name!r}")
                verdicts = namespace.judge(ids, vectors, threshold)
                if not dry_run:
                    namespace.commit(batch_id, verdicts, vectors)
                    for verdict in verdicts:
                        DEDUP_ITEMS.labels("kept" if verdict.kept else "dropped").inc()
                return BatchResult(verdicts, namespace.size)

        return await asyncio.to_thread(judge_and_commit)

    def _replay(self, key: NamespaceKey, namespace_name: str, batch_id: str, ids: list[str]) -> BatchResult | None:
        if not batch_id:
            return None
        namespace, _ = self._namespaces.open(key)
        recorded = namespace.recorded_verdicts(batch_id)
        if recorded is None:
            return None
        if [v.id for v in recorded] != ids:
            raise FailedPrecondition(f"batch_id {batch_id!r} was applied to namespace {namespace_name!r} with other items")
        return BatchResult(recorded, namespace.size)

    def describe(self, namespace_name: str) -> tuple[int, str]:
        """Size and index kind of a namespace the caller's tenant may use; NotFound otherwise."""
        key = self._namespaces.resolve(current_principal().tenant, namespace_name, create=False)
        namespace, lock = self._namespaces.open(key)
        with lock:
            return namespace.size, namespace.index_kind

    def share(self, namespace_name: str, tenant: str) -> list[str]:
        """Lets `tenant` use the caller's tenant's namespace as "<owner>/<name>"
        (admins only; idempotent). Returns every tenant it is shared with."""
        principal = current_principal()
        principal.require(ADMIN, "ShareNamespace")
        if tenant == principal.tenant:
            raise InvalidArgument("tenant", f"{tenant!r} owns the namespace already; name another tenant")
        # Only the caller's own namespace: never "<owner>/<name>" shared with it, which it may not pass on.
        key = NamespaceKey(principal.tenant, namespace_name)
        if not NAMESPACE_PATTERN.match(namespace_name) or not self._namespaces.exists(key):
            raise NotFound(f"namespace {namespace_name!r} does not exist")
        return self._namespaces.share(key, tenant)
