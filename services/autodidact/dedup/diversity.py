"""The diversity filter: embed a batch, judge it against a namespace, add what is kept."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from autodidact.backends.embed import Embedder
from autodidact.dedup.namespaces import NamespaceRegistry, Verdict
from autodidact.errors import FailedPrecondition, InvalidArgument, NotFound
from autodidact.runtime.metrics import DEDUP_ITEMS


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
        namespace, lock = await asyncio.to_thread(self._namespaces.open, namespace_name)
        replayed = await asyncio.to_thread(self._replay, namespace_name, batch_id, ids)
        if replayed is not None:
            return replayed
        # Embedding, the slow part, runs outside the namespace lock.
        vectors = await self._embedder.embed(texts)

        def judge_and_commit() -> BatchResult:
            with lock:
                # A concurrent retry of the same batch may have committed meanwhile.
                replayed = self._replay(namespace_name, batch_id, ids)
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

    def _replay(self, namespace_name: str, batch_id: str, ids: list[str]) -> BatchResult | None:
        if not batch_id:
            return None
        namespace, _ = self._namespaces.open(namespace_name)
        recorded = namespace.recorded_verdicts(batch_id)
        if recorded is None:
            return None
        if [v.id for v in recorded] != ids:
            raise FailedPrecondition(f"batch_id {batch_id!r} was applied to namespace {namespace_name!r} with other items")
        return BatchResult(recorded, namespace.size)

    def describe(self, namespace_name: str) -> tuple[int, str]:
        if not self._namespaces.exists(namespace_name):
            raise NotFound(f"namespace {namespace_name!r} does not exist")
        namespace, lock = self._namespaces.open(namespace_name)
        with lock:
            return namespace.size, namespace.index_kind
