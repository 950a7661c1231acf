"""Namespaces of unit vectors with cosine-similarity search, durable across restarts.

Each namespace belongs to a tenant and lives in its own folder,
<data>/tenants/<tenant>/namespaces/<name>/ (NamespaceRegistry):
- `log.sqlite` (WAL): every kept vector with its item id, in order, and the
  verdicts of every batch id applied, so a retried batch gets the same answer
  and adds nothing twice. A batch's rows commit in one transaction: kept items
  join the namespace all together or not at all. This append-only log is the
  only thing a commit writes and fsyncs: O(batch), whatever the size.
- `index.faiss` + `index.json`: a snapshot of the FAISS index and how many log
  rows it holds, so a restart reads the graph instead of rebuilding it and
  searches only the rows after it exactly. Written in the background.

Search is exact (IndexFlatIP) while the namespace is small and becomes an HNSW
graph (IndexHNSWFlat, inner product) past `exact_limit` vectors: HNSW needs no
training, takes additions one batch at a time, and answers in logarithmic time
at millions of vectors, where exact search grows linearly. IVF would need a
training set and periodic retraining as the pool drifts.

Nothing slow happens inside a call (issue 13). Rows live in two places: the
HNSW graph (rows 0..g-1, in log order; none while the namespace is exact) and
the exact rows (rows g.., a float32 array searched with one matrix product,
several times faster than IndexFlatIP's k=1 search). Building the graph and
writing a snapshot run on a background thread, against rows nothing changes
meanwhile: the graph is frozen (searched, not added to) while it is written,
and the exact rows are only ever appended to. Commits append to the exact rows;
once the background work is done, the next commit adopts its result (the new
graph, the snapshot's size), and each commit folds its own rows plus
`drain_per_commit` exact rows into the graph. A restart loads the snapshot and
puts the log rows after it in the exact rows: opening never builds a graph.

A tenant reaches another tenant's namespace only when that tenant's admin
shared it (`shares.json` in the namespace's folder), naming it "<owner>/<name>".
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import structlog

from autodidact.dedup.defaults import NamespaceSettings, is_namespace_reference
from autodidact.errors import NotFound, StartupError
from autodidact.runtime.principal import DEFAULT_TENANT

log = structlog.get_logger("autodidact.dedup")

# Where namespaces lived before they belonged to tenants: <root>/namespaces/<name>.
LEGACY_FOLDER = "namespaces"
SHARES_FILE = "shares.json"
SNAPSHOT_FILE = "index.faiss"
SNAPSHOT_META = "index.json"
SNAPSHOT_SYNC_BYTES = 16 << 20
CHECKPOINT_ROWS = 2_000  # log rows (about 3 MB at dimension 384) between WAL checkpoints


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


class ExactRows:
    """Rows searched exactly: a growable float32 array, appended at the end and
    folded into the graph from the front. Appending never writes over rows
    already there (a full array is copied to a larger one), so a view taken by
    `vectors` stays valid for a background thread while calls append."""

    def __init__(self, dimension: int) -> None:
        self._rows = np.empty((1024, dimension), dtype=np.float32)
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def vectors(self) -> np.ndarray:
        return self._rows[self._start : self._end]

    def append(self, vectors: np.ndarray) -> None:
        if self._end + len(vectors) > len(self._rows):
            live = self.vectors
            capacity = max(1024, 2 * (len(live) + len(vectors)))
            rows = np.empty((capacity, self._rows.shape[1]), dtype=np.float32)
            rows[: len(live)] = live
            self._rows, self._start, self._end = rows, 0, len(live)
        self._rows[self._end : self._end + len(vectors)] = vectors
        self._end += len(vectors)

    def take(self, count: int) -> np.ndarray:
        """The first `count` rows, removed (a view: use it before the next append,
        which may reuse the space). Only folding into the graph takes rows, and
        while there is a graph no background job holds a view of these rows."""
        taken = self._rows[self._start : self._start + count]
        self._start += len(taken)
        if self._start == self._end:
            self._start = self._end = 0
        return taken

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best inner product and its row (counted from the first) for each query."""
        scores = queries @ self.vectors.T
        best = np.argmax(scores, axis=1)
        return scores[np.arange(len(queries)), best], best


def write_snapshot(directory: Path, index: faiss.Index) -> None:
    """The index file, then the row count beside it, each replaced atomically
    and durably. A crash between the two leaves counts that disagree with the
    file, which _restore detects (it then rebuilds from the log)."""
    tmp = directory / f"{SNAPSHOT_FILE}.tmp"
    with open(tmp, "wb") as handle:
        unsynced = 0

        def write(chunk: bytes) -> None:
            # Flushed every few MiB: the log's fsync in a concurrent commit
            # waits for the file system's journal, which on ext4 (data=ordered)
            # first writes out every dirty page, a whole unflushed snapshot
            # included (measured: 166 ms commits beside a 384 MB write, 17 ms paced).
            nonlocal unsynced
            handle.write(chunk)
            unsynced += len(chunk)
            if unsynced >= SNAPSHOT_SYNC_BYTES:
                handle.flush()
                os.fdatasync(handle.fileno())
                unsynced = 0

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))  # type: ignore[attr-defined]  # missing from the stubs
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / SNAPSHOT_FILE)
    meta_tmp = directory / f"{SNAPSHOT_META}.tmp"
    with open(meta_tmp, "w") as meta:
        meta.write(json.dumps({"size": index.ntotal}))
        meta.flush()
        os.fsync(meta.fileno())
    os.replace(meta_tmp, directory / SNAPSHOT_META)
    _fsync_directory(directory)


def _one_thread() -> None:
    # OpenMP's thread count is per calling thread: background work gets one
    # core and leaves the others to the calls it must not slow down.
    faiss.omp_set_num_threads(1)


class Namespace:
    """One namespace. Not thread-safe: callers hold its lock (see NamespaceRegistry).
    Its background thread never touches its state, only rows frozen for it;
    the next call that holds the lock adopts what it produced."""

    def __init__(self, directory: Path, dimension: int, settings: NamespaceSettings) -> None:
        self.directory = directory
        self.dimension = dimension
        self._settings = settings
        directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(directory / "log.sqlite", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # SQLite would copy the WAL into the database (and fsync it) inside the
        # commit that fills 1,000 pages, one call in 40; _checkpoint does it on
        # the background thread instead, over a connection of its own.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer: sqlite3.Connection | None = None
        self._rows_since_checkpoint = 0
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS vectors (seq INTEGER PRIMARY KEY, item_id TEXT NOT NULL UNIQUE, vector BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, verdicts TEXT NOT NULL);
            """
        )
        self._graph: faiss.IndexHNSWFlat | None = None  # rows 0 .. ntotal-1
        self._exact = ExactRows(dimension)  # rows graph.ntotal .. size-1
        self._ids: list[str] = []  # by row
        self._id_set: set[str] = set()
        self._snapshot_rows = 0  # rows in the snapshot on disk
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedup-background", initializer=_one_thread)
        # The running background job and the rows it covers; the graph is frozen while it runs.
        self._job: Future[faiss.IndexHNSWFlat | None] | None = None
        self._job_rows = 0
        self._retry_at = 0  # after a failed job, rows covered before the next try
        self._restore()

    # --- state ---

    @property
    def size(self) -> int:
        return len(self._ids)

    @property
    def index_kind(self) -> str:
        return "flat" if self._graph is None else "hnsw"

    @property
    def exact_rows(self) -> int:
        """Rows searched exactly: all of them while the namespace is exact (tests)."""
        return len(self._exact)

    def contains(self, item_id: str) -> bool:
        return item_id in self._id_set

    def recorded_verdicts(self, batch_id: str) -> list[Verdict] | None:
        row = self._db.execute("SELECT verdicts FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if row is None else [Verdict.from_json(v) for v in json.loads(row[0])]

    # --- judging and adding ---

    def judge(self, ids: list[str], vectors: np.ndarray, threshold: float) -> list[Verdict]:
        """Keep or drop each item, in order, against the namespace and the items
        of the same batch kept before it. Changes nothing."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        pool_similarity, pool_rows = self._search(vectors)
        within_batch = vectors @ vectors.T
        kept_positions: list[int] = []
        verdicts = []
        for j, item_id in enumerate(ids):
            nearest_id, similarity = "", float("-inf")
            if pool_rows[j] >= 0:
                nearest_id, similarity = self._ids[pool_rows[j]], float(pool_similarity[j])
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
        """Adds the kept items (and the batch's verdicts, when it has an id) in
        one transaction, then to the in-memory index. Never waits for a
        snapshot or a graph build: those run in the background."""
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
            self._append([item_id for item_id, _ in kept], np.stack([vector for _, vector in kept]))
        self._rows_since_checkpoint += len(kept) + 1
        if self._rows_since_checkpoint >= CHECKPOINT_ROWS:
            self._rows_since_checkpoint = 0
            self._background.submit(self._checkpoint)  # queued behind a snapshot, if one runs: the WAL just grows meanwhile
        self._advance(fold=len(kept) + self._settings.drain_per_commit)

    def settle(self) -> None:
        """Waits for background work and folds every exact row into the graph
        (when there is one), as if calls could wait (tests and benchmarks).
        Callers hold the lock."""
        while self._job is not None or (self._graph is not None and len(self._exact)):
            if self._job is not None:
                wait_for([self._job])
            self._advance(fold=len(self._exact))

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

    def _append(self, ids: list[str], vectors: np.ndarray) -> None:
        self._exact.append(np.asarray(vectors, dtype=np.float32))
        self._ids.extend(ids)
        self._id_set.update(ids)

    def _search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best similarity and row in the namespace for each query (row -1: none)."""
        similarity = np.full(len(queries), -np.inf, dtype=np.float32)
        rows = np.full(len(queries), -1, dtype=np.int64)
        graph_rows = 0 if self._graph is None else self._graph.ntotal
        if self._graph is not None and graph_rows:
            # Set only when it differs: the background thread may be reading the graph.
            if self._graph.hnsw.efSearch != self._settings.hnsw_ef_search:
                self._graph.hnsw.efSearch = self._settings.hnsw_ef_search
            found_similarity, found_rows = self._graph.search(queries, 1)
            similarity[:], rows[:] = found_similarity[:, 0], found_rows[:, 0]
        if len(self._exact):
            exact_similarity, exact_rows = self._exact.search(queries)
            better = exact_similarity > similarity
            similarity[better] = exact_similarity[better]
            rows[better] = graph_rows + exact_rows[better]
        return similarity, rows

    def _advance(self, fold: int) -> None:
        """The one place the index changes shape: adopt finished background
        work, fold at most `fold` exact rows into the graph, then start the
        background work that is due (the graph past `exact_limit` rows, else a
        snapshot). Costs one graph add of `fold` rows at most."""
        if self._job is not None:
            if not self._job.done():
                return  # the graph is frozen; the exact rows take additions meanwhile
            self._adopt(self._job)
            self._job = None
        if self._graph is not None and fold and len(self._exact):
            self._graph.add(np.ascontiguousarray(self._exact.take(min(fold, len(self._exact)))))
        frozen: faiss.IndexHNSWFlat | np.ndarray
        if self._graph is None:
            # Exact: every row is in one array that appending never overwrites.
            covered, frozen = len(self._exact), self._exact.vectors
        else:
            covered, frozen = self._graph.ntotal, self._graph
        if covered < self._retry_at:
            return
        if self._graph is None and covered > self._settings.exact_limit:
            self._start(self._build_hnsw, frozen, covered)
        elif covered - self._snapshot_rows >= self._snapshot_due():
            self._start(self._write_snapshot, frozen, covered)

    def _start(self, job: Callable[[Any], faiss.IndexHNSWFlat | None], frozen: Any, rows: int) -> None:
        self._job, self._job_rows = self._background.submit(job, frozen), rows

    def _adopt(self, job: Future[faiss.IndexHNSWFlat | None]) -> None:
        try:
            built = job.result()
        except Exception:
            # The log holds every row, so nothing is lost; the work is tried
            # again snapshot_every rows later, not at every call (a full disk
            # would otherwise be rewritten to at every commit).
            log.exception("dedup_background_failed", directory=str(self.directory))
            self._retry_at = self._job_rows + self._settings.snapshot_every
            return
        if built is None:  # a snapshot
            self._snapshot_rows = self._job_rows
            return
        # The graph holds the first exact rows, which nothing took meanwhile.
        self._exact.take(built.ntotal)
        self._graph = built
        log.info("dedup_index_switched", directory=str(self.directory), kind="hnsw", rows=built.ntotal)

    def _snapshot_due(self) -> int:
        """Rows added to the graph (or while exact, to the namespace) since the last snapshot that call for the next one."""
        relative = int(self._settings.snapshot_fraction * self._snapshot_rows)
        return max(self._settings.snapshot_every, min(relative, self._settings.snapshot_max_tail))

    # Both run on the background thread, on rows nothing changes meanwhile.

    def _build_hnsw(self, vectors: np.ndarray) -> faiss.IndexHNSWFlat:
        graph = faiss.IndexHNSWFlat(self.dimension, self._settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self._settings.hnsw_ef_construction
        graph.add(np.ascontiguousarray(vectors))
        return graph

    def _write_snapshot(self, rows: faiss.IndexHNSWFlat | np.ndarray) -> None:
        """The graph, or while the namespace is exact, its rows as an IndexFlatIP
        (the format every version reads)."""
        index: faiss.Index
        if isinstance(rows, np.ndarray):
            index = faiss.IndexFlatIP(self.dimension)
            index.add(np.ascontiguousarray(rows))
        else:
            index = rows
        write_snapshot(self.directory, index)

    def _checkpoint(self) -> None:
        """Copies the log's WAL into the database file (background thread only)."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.directory / "log.sqlite", isolation_level=None, check_same_thread=False)
                self._checkpointer.execute("PRAGMA synchronous=FULL")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            log.exception("dedup_checkpoint_failed", directory=str(self.directory))  # the WAL keeps every row meanwhile

    def _snapshot_size(self) -> int:
        meta = self.directory / SNAPSHOT_META
        return int(json.loads(meta.read_text())["size"]) if meta.exists() else 0

    def _restore(self) -> None:
        """The snapshot (when consistent with the log), then the log rows after
        it as exact rows: opening never builds a graph. The files have the
        format of earlier versions, which open as they are."""
        rows = self._db.execute("SELECT item_id FROM vectors ORDER BY seq").fetchall()
        snapshot_size = self._snapshot_size()
        snapshot = self.directory / SNAPSHOT_FILE
        if 0 < snapshot_size <= len(rows) and snapshot.exists():
            index = faiss.read_index(str(snapshot))
            if index.ntotal == snapshot_size and index.d == self.dimension:
                if isinstance(index, faiss.IndexHNSWFlat):
                    self._graph = index
                else:  # an exact namespace's rows
                    self._exact.append(index.reconstruct_n(0, index.ntotal))
                self._snapshot_rows = snapshot_size
        self._ids = [row[0] for row in rows[: self._snapshot_rows]]
        self._id_set = set(self._ids)
        replay = self._db.execute("SELECT item_id, vector FROM vectors WHERE seq >= ? ORDER BY seq", (self.size,))
        while chunk := replay.fetchmany(10_000):
            vectors = np.frombuffer(b"".join(v for _, v in chunk), dtype=np.float32).reshape(len(chunk), self.dimension)
            self._append([item_id for item_id, _ in chunk], vectors)
        self._advance(fold=0)

    def close(self) -> None:
        """Lets running background work finish (a snapshot half written would
        only be ignored, but finishing it spares the next start), then closes."""
        self._background.shutdown(wait=True)
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()


@dataclass(frozen=True)
class NamespaceKey:
    """A namespace as stored: its owner tenant and its name there."""

    tenant: str
    name: str


def _fsync_directory(directory: Path) -> None:
    """Makes renames and new entries in `directory` survive a power cut."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def migrate_pre_tenancy(root: Path) -> None:
    """Moves the namespaces of a data folder from before tenancy
    (<root>/namespaces/<name>) to tenant "default". Each namespace moves with
    one rename, so a crash leaves each one whole in one place or the other, and
    the next start moves the rest. A destination that already exists stops the
    start rather than merging two namespaces' logs."""
    legacy = root / LEGACY_FOLDER
    if not legacy.is_dir():
        return
    target = root / "tenants" / DEFAULT_TENANT / "namespaces"
    target.mkdir(parents=True, exist_ok=True)
    for directory in sorted(p for p in legacy.iterdir() if p.is_dir()):
        destination = target / directory.name
        if destination.exists():
            raise StartupError(f"cannot move dedup namespace {directory} to {destination}: that folder exists; move one of them away")
        os.rename(directory, destination)
        log.info("namespace_migrated", namespace=directory.name, tenant=DEFAULT_TENANT)
    _fsync_directory(target)
    with contextlib.suppress(OSError):  # not empty: something else was left there; it does no harm
        legacy.rmdir()
    _fsync_directory(root)


class NamespaceRegistry:
    """Namespaces under one data folder, per tenant, opened on first use, one lock each.

    A namespace lives in <root>/tenants/<tenant>/namespaces/<name>/, so one
    tenant's names never reach another's folder. The tenants it is shared with
    are listed in its `shares.json`, beside its log, so checking a share never
    loads an index.
    """

    def __init__(self, root: Path, dimension: int, settings: NamespaceSettings | None = None) -> None:
        self._root = root
        self._dimension = dimension
        self._settings = settings or NamespaceSettings()
        self._namespaces: dict[NamespaceKey, Namespace] = {}
        self._locks: dict[NamespaceKey, threading.Lock] = {}
        self._guard = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        migrate_pre_tenancy(root)

    def directory(self, key: NamespaceKey) -> Path:
        return self._root / "tenants" / key.tenant / "namespaces" / key.name

    def open(self, key: NamespaceKey) -> tuple[Namespace, threading.Lock]:
        """The namespace, created when new."""
        with self._guard:
            if key not in self._namespaces:
                self._namespaces[key] = Namespace(self.directory(key), self._dimension, self._settings)
                self._locks[key] = threading.Lock()
            return self._namespaces[key], self._locks[key]

    def exists(self, key: NamespaceKey) -> bool:
        return key in self._namespaces or (self.directory(key) / "log.sqlite").exists()

    def shared_with(self, key: NamespaceKey) -> list[str]:
        """The tenants besides its owner that may use the namespace."""
        path = self.directory(key) / SHARES_FILE
        return sorted(json.loads(path.read_text())) if path.exists() else []

    def share(self, key: NamespaceKey, tenant: str) -> list[str]:
        """Lets `tenant` use the namespace (idempotent); returns every tenant it is shared with."""
        with self._guard:  # two shares at once must not lose one
            tenants = self.shared_with(key)
            if tenant not in tenants:
                tenants = sorted([*tenants, tenant])
                tmp = self.directory(key) / f"{SHARES_FILE}.tmp"
                with open(tmp, "w") as handle:
                    handle.write(json.dumps(tenants))
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.directory(key) / SHARES_FILE)
                _fsync_directory(self.directory(key))
            return tenants

    def resolve(self, tenant: str, requested: str, *, create: bool) -> NamespaceKey:
        """The namespace that `tenant` means by `requested`: its own "<name>"
        (created when `create`), or "<owner>/<name>" that the owner shared with
        it. Anything else is NotFound with the message a missing namespace
        gets, so another tenant's namespace names cannot be probed."""
        owner, _, name = requested.rpartition("/")
        key = NamespaceKey(owner or tenant, name)
        if is_namespace_reference(requested):  # callers validate; checking again keeps a bad name out of paths all the same
            if key.tenant == tenant and (create or self.exists(key)):
                return key
            if key.tenant != tenant and self.exists(key) and tenant in self.shared_with(key):
                return key
        raise NotFound(f"namespace {requested!r} does not exist")

    def close(self) -> None:
        with self._guard:
            for namespace in self._namespaces.values():
                namespace.close()
            self._namespaces.clear()
