"""BASELINE for benchmarks/dedup_scale.py: the dedup Namespace as it was before
issue 13's background snapshots (services/autodidact/dedup/namespaces.py at
commit 7c06df2), so that every benchmark run measures the new namespace against
today's in the same run. Not used by the product; tests/dedup also uses it to
write namespaces in the previous on-disk format.

It rewrites and fsyncs the whole FAISS index every `snapshot_every` additions,
inside the commit, and builds the HNSW graph inside the call that crosses
`exact_limit`. Changed from the copy: only the Verdict and Namespace classes
are kept (the registry and tenancy code are unchanged and not needed here);
its module docstring follows.

Each namespace belongs to a tenant and lives in its own folder,
<data>/tenants/<tenant>/namespaces/<name>/ (NamespaceRegistry):
- `log.sqlite` (WAL): every kept vector with its item id, in order, and the
  verdicts of every batch id applied, so a retried batch gets the same answer
  and adds nothing twice. A batch's rows commit in one transaction: kept items
  join the namespace all together or not at all.
- `index.faiss` + `index.json`: a snapshot of the FAISS index and how many log
  rows it holds, written every `snapshot_every` additions, so a restart
  replays only the rows after it instead of rebuilding a large HNSW graph.

Search is exact (IndexFlatIP) while the namespace is small and becomes an HNSW
graph (IndexHNSWFlat, inner product) past `exact_limit` vectors: HNSW needs no
training, takes additions one batch at a time, and answers in logarithmic time
at millions of vectors, where exact search grows linearly. IVF would need a
training set and periodic retraining as the pool drifts.

A tenant reaches another tenant's namespace only when that tenant's admin
shared it (`shares.json` in the namespace's folder), naming it "<owner>/<name>".
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import structlog

from autodidact.dedup.defaults import NamespaceSettings

log = structlog.get_logger("autodidact.dedup")


@dataclass(frozen=True)
class Verdict:
    id: str
    kept: bool
    nearest_id: str
    similarity: float

    def to_json(self) -> list[object]:
        return [self.id, self.kept, self.nearest_id, self.similarity]

    @classmethod
    def from_json(cls, row: list[Any]) -> Verdict:
        """A row of to_json, read back from the batch's stored JSON (untyped, hence Any)."""
        return cls(str(row[0]), bool(row[1]), str(row[2]), float(row[3]))


class Namespace:
    """One namespace. Not thread-safe: callers hold its lock (see NamespaceRegistry)."""

    def __init__(self, directory: Path, dimension: int, settings: NamespaceSettings) -> None:
        self.directory = directory
        self.dimension = dimension
        self._settings = settings
        directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(directory / "log.sqlite", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS vectors (seq INTEGER PRIMARY KEY, item_id TEXT NOT NULL UNIQUE, vector BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, verdicts TEXT NOT NULL);
            """
        )
        self._index: faiss.Index = faiss.IndexFlatIP(dimension)
        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._restore()

    # --- state ---

    @property
    def size(self) -> int:
        return len(self._ids)

    @property
    def index_kind(self) -> str:
        return "hnsw" if isinstance(self._index, faiss.IndexHNSWFlat) else "flat"

    def contains(self, item_id: str) -> bool:
        return item_id in self._id_set

    def recorded_verdicts(self, batch_id: str) -> list[Verdict] | None:
        row = self._db.execute("SELECT verdicts FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if row is None else [Verdict.from_json(v) for v in json.loads(row[0])]

    # --- judging and adding ---

    def judge(self, ids: list[str], vectors: np.ndarray, threshold: float) -> list[Verdict]:
        """Keep or drop each item, in order, against the namespace and the items
        of the same batch kept before it. Changes nothing."""
        if self.size:
            self._index_search_params()
            pool_similarity, pool_rows = self._index.search(vectors, 1)
        within_batch = vectors @ vectors.T
        kept_positions: list[int] = []
        verdicts = []
        for j, item_id in enumerate(ids):
            nearest_id, similarity = "", float("-inf")
            if self.size and pool_rows[j, 0] >= 0:
                nearest_id, similarity = self._ids[pool_rows[j, 0]], float(pool_similarity[j, 0])
            if kept_positions:
                candidates = within_batch[j, kept_positions]
                best = int(np.argmax(candidates))
                if candidates[best] > similarity:
                    nearest_id, similarity = ids[kept_positions[best]], float(candidates[best])
            kept = similarity < threshold
            if kept:
                kept_positions.append(j)
            verdicts.append(Verdict(item_id, kept, nearest_id, 0.0 if nearest_id == "" else min(similarity, 1.0)))
        return verdicts

    def commit(self, batch_id: str, verdicts: list[Verdict], vectors: np.ndarray) -> None:
        """Adds the kept items (and the batch's verdicts, when it has an id) in one transaction."""
        kept = [(v.id, vectors[j]) for j, v in enumerate(verdicts) if v.kept]
        first_seq = self.size
        with self._transaction():
            self._db.executemany(
                "INSERT INTO vectors (seq, item_id, vector) VALUES (?, ?, ?)",
                [(first_seq + k, item_id, vector.astype(np.float32).tobytes()) for k, (item_id, vector) in enumerate(kept)],
            )
            if batch_id:
                self._db.execute(
                    "INSERT INTO batches (batch_id, verdicts) VALUES (?, ?)",
                    (batch_id, json.dumps([v.to_json() for v in verdicts])),
                )
        if kept:
            self._add([item_id for item_id, _ in kept], np.stack([vector for _, vector in kept]))
            if self.size - self._snapshot_size() >= self._settings.snapshot_every:
                self._write_snapshot()

    # --- internals ---

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _add(self, ids: list[str], vectors: np.ndarray) -> None:
        if self.index_kind == "flat" and self.size + len(ids) > self._settings.exact_limit:
            self._index = self._to_hnsw(self._index)
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._ids.extend(ids)
        self._id_set.update(ids)

    def _index_search_params(self) -> None:
        if isinstance(self._index, faiss.IndexHNSWFlat):
            self._index.hnsw.efSearch = self._settings.hnsw_ef_search

    def _to_hnsw(self, flat: faiss.Index) -> faiss.Index:
        hnsw = faiss.IndexHNSWFlat(self.dimension, self._settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self._settings.hnsw_ef_construction
        if flat.ntotal:
            hnsw.add(flat.reconstruct_n(0, flat.ntotal))
        return hnsw

    def _snapshot_size(self) -> int:
        meta = self.directory / "index.json"
        return int(json.loads(meta.read_text())["size"]) if meta.exists() else 0

    def _write_snapshot(self) -> None:
        tmp = self.directory / "index.faiss.tmp"
        faiss.write_index(self._index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / "index.faiss")
        meta_tmp = self.directory / "index.json.tmp"
        meta_tmp.write_text(json.dumps({"size": self.size}))
        os.replace(meta_tmp, self.directory / "index.json")

    def _restore(self) -> None:
        """The snapshot (when consistent with the log), then the log rows after it."""
        rows = self._db.execute("SELECT item_id FROM vectors ORDER BY seq").fetchall()
        snapshot_size = self._snapshot_size()
        snapshot = self.directory / "index.faiss"
        if 0 < snapshot_size <= len(rows) and snapshot.exists():
            index = faiss.read_index(str(snapshot))
            if index.ntotal == snapshot_size and index.d == self.dimension:
                self._index = index
                self._ids = [row[0] for row in rows[:snapshot_size]]
                self._id_set = set(self._ids)
        replay = self._db.execute("SELECT item_id, vector FROM vectors WHERE seq >= ? ORDER BY seq", (self.size,))
        while chunk := replay.fetchmany(10_000):
            vectors = np.frombuffer(b"".join(v for _, v in chunk), dtype=np.float32).reshape(len(chunk), self.dimension)
            self._add([item_id for item_id, _ in chunk], vectors)

    def close(self) -> None:
        self._db.close()
