"""The durable job store: the JobStore protocol the coordinator and recipes
use, and its SQLite implementation (WAL mode, one file).

Every stage result is written, keyed by (job, item, stage), before the job
moves on; a restarted coordinator replays a job by reading what is stored and
recomputing only what is not. Results are written once: a second write of the
same key keeps the first, so a stage that raced with a crash cannot change an
answer already read.

The SQLite store never touches the database on the event loop. One writer
thread owns the only writing connection and group-commits: the writes queued
while the previous transaction was committing go into the next one, and each
caller resumes only once the transaction holding its write has committed
(synchronous=FULL, so a result acknowledged to a job survives a power cut).
A reader thread with its own connection answers reads; WAL lets it read the
last committed state while the writer commits, so GetJob and Watch never wait
behind an fsync. Both threads hand their answers back to the caller's event
loop in one wake-up per batch, whichever loop that is (tests run several
asyncio.run loops over one store).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from autodidact.errors import StartupError

T = TypeVar("T")

# PRAGMA user_version of the schema below. 0: the first schema (results keyed by
# (job, item, stage) without a cursor; job-level values as results under the item
# ids of LEGACY_VALUE_ITEMS, or already in job_values). 1: job keys without a
# tenant. 2: jobs without leases. upgrade() brings any of them here.
SCHEMA_VERSION = 3
# The tenant of the jobs of a store from before tenants.
LEGACY_TENANT = "default"
# Item ids under which schema 0 stored job-level values, the stage being the value's key.
LEGACY_VALUE_ITEMS = ("_job", "_seeds", "_closed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec BLOB NOT NULL,
    spec_hash TEXT NOT NULL,
    state INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',  -- the coordinator running the job ('' for none)
    lease_until REAL NOT NULL DEFAULT 0    -- when its lease ends unless renewed (epoch seconds)
);
CREATE TABLE IF NOT EXISTS results (
    -- The cursor: AUTOINCREMENT never reuses a number, even after deletes, so a
    -- follower that read up to seq n misses nothing by asking for seq > n.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    kept INTEGER,            -- 1 kept, 0 dropped, NULL for results that decide nothing
    filter TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL,     -- JSON
    written_at REAL NOT NULL,
    UNIQUE (job_id, item_id, stage)
);
CREATE INDEX IF NOT EXISTS results_by_cursor ON results (job_id, seq);
CREATE TABLE IF NOT EXISTS job_values (
    job_id TEXT NOT NULL,
    key TEXT NOT NULL,       -- a job-level value: the plan, the summary, a recipe's reference date
    value TEXT NOT NULL,     -- JSON
    written_at REAL NOT NULL,
    PRIMARY KEY (job_id, key)
);
-- Decided results per (job, stage, filter), so progress costs O(stages), not a
-- GROUP BY over the job's results. Triggers keep it in the transaction that
-- inserts or deletes the results, so it cannot drift from them.
CREATE TABLE IF NOT EXISTS stage_counts (
    job_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    filter TEXT NOT NULL,
    done INTEGER NOT NULL,
    kept INTEGER NOT NULL,
    PRIMARY KEY (job_id, stage, filter)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS count_inserted AFTER INSERT ON results WHEN NEW.kept IS NOT NULL BEGIN
    INSERT INTO stage_counts (job_id, stage, filter, done, kept) VALUES (NEW.job_id, NEW.stage, NEW.filter, 1, NEW.kept = 1)
    ON CONFLICT (job_id, stage, filter) DO UPDATE SET done = done + 1, kept = kept + excluded.kept;
END;
CREATE TRIGGER IF NOT EXISTS count_deleted AFTER DELETE ON results WHEN OLD.kept IS NOT NULL BEGIN
    UPDATE stage_counts SET done = done - 1, kept = kept - (OLD.kept = 1)
    WHERE job_id = OLD.job_id AND stage = OLD.stage AND filter = OLD.filter;
END;
"""

# Writes one transaction holds at most: bounds the memory of a burst and how
# long the last caller of a batch waits for the first.
MAX_WRITE_BATCH = 20_000
MAX_READ_BATCH = 1_000
# Rows iter_results reads at a time, and ids per IN (...) list of get_results
# (well under SQLite's parameter limit).
PAGE_ROWS = 5_000
IDS_PER_QUERY = 500


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    spec: bytes
    spec_hash: str
    state: int
    error: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StageCounts:
    stage: str
    done: int
    kept: int
    dropped_by_filter: dict[str, int]
    # Kept decisions that name a filter, by filter: items a review gate holds (recipes/base.py, REVIEW_FILTER).
    kept_by_filter: dict[str, int] = field(default_factory=dict)


class JobStore(Protocol):
    """What the coordinator and the recipes need from durable storage. Every
    method is a coroutine: an implementation never blocks the event loop.
    Results and values are written once (a second write of a key keeps the
    first); a write returns once it is durable."""

    async def create_job(self, job_id: str, spec: bytes, spec_hash: str, state: int) -> tuple[JobRow, bool]: ...
    async def get_job(self, job_id: str) -> JobRow | None: ...
    # key_prefix: only jobs whose key starts with it ("<tenant>/": one tenant's).
    async def list_jobs(self, limit: int, before_seq: int | None = None, key_prefix: str = "") -> list[JobRow]: ...
    async def jobs_in_states(self, states: tuple[int, ...]) -> list[JobRow]: ...
    async def set_state(self, job_id: str, state: int, error: str = "") -> None: ...
    # Leases: a job in `states` is run by the coordinator holding its lease (several may share a
    # store). claim_jobs takes up to `limit` of them (only `job_id`, when given) whose lease is
    # free or expired; renew_leases extends the owner's leases and answers {job_id: state} for
    # those it still holds; release_lease frees one at once.
    async def claim_jobs(
        self, owner: str, states: tuple[int, ...], lease_seconds: float, limit: int, job_id: str | None = None
    ) -> list[JobRow]: ...
    async def renew_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> dict[str, int]: ...
    async def release_lease(self, job_id: str, owner: str) -> None: ...
    async def get_result(self, job_id: str, item_id: str, stage: str) -> dict[str, Any] | None: ...
    async def put_result(
        self, job_id: str, item_id: str, stage: str, value: dict[str, Any], kept: bool | None, filter_: str = ""
    ) -> bool: ...
    async def has_results(self, job_id: str) -> bool: ...
    async def delete_results(
        self, job_id: str, *, filter_: str | None = None, item_id: str | None = None, stage: str | None = None
    ) -> None: ...
    async def get_results(self, job_id: str, item_ids: Sequence[str], stage: str) -> dict[str, dict[str, Any]]: ...
    async def results(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]: ...
    def iter_results(self, job_id: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]: ...
    async def results_since(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str, dict[str, Any]]]: ...
    async def stage_counts(self, job_id: str) -> list[StageCounts]: ...
    async def get_value(self, job_id: str, key: str) -> dict[str, Any] | None: ...
    async def get_values(self, job_id: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    async def put_value(self, job_id: str, key: str, value: dict[str, Any]) -> None: ...
    async def delete_value(self, job_id: str, key: str) -> None: ...
    async def close(self) -> None: ...


Operation = Callable[[sqlite3.Connection], Any]
# A queued call: what to run, and the loop and future to answer on.
Call = tuple[Operation, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
_STOP = None  # queued to end a worker thread


class _Worker:
    """One thread that owns one SQLite connection and runs the calls queued
    for it in order, a batch at a time. A writer runs each batch in one
    transaction; if any call in it fails, the batch is rolled back and run
    again with each call under its own savepoint, so a failing write (a
    constraint, a value that is not JSON) fails only its own caller, and the
    rest still share one commit."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection], max_batch: int, transactional: bool) -> None:
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._transactional = transactional
        self._opened: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, args=(connect,), name=name, daemon=True)
        self._thread.start()
        failure = self._opened.get()  # the connection is opened (and checked) on the thread that owns it
        if failure is not None:
            self._thread.join()
            raise failure

    def submit(self, operation: Operation) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((operation, loop, future))
        return future

    def stop(self) -> None:
        """Ends the thread once the calls queued before are answered."""
        self._calls.put(_STOP)

    def join(self) -> None:
        self._thread.join()

    def _serve(self, connect: Callable[[], sqlite3.Connection]) -> None:
        try:
            db = connect()
        except BaseException as exc:  # reported to the constructor, which raises it
            self._opened.put(exc)
            return
        self._opened.put(None)
        try:
            while True:
                first = self._calls.get()
                if first is _STOP:
                    return
                batch = [first]
                stopping = False
                while len(batch) < self._max_batch:
                    try:
                        call = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if call is _STOP:
                        stopping = True
                        break
                    batch.append(call)
                _answer(batch, self._run_batch(db, batch))
                if stopping:
                    return
        finally:
            db.close()

    def _run_batch(self, db: sqlite3.Connection, batch: list[Call]) -> list[tuple[bool, Any]]:
        operations = [operation for operation, _, _ in batch]
        if not self._transactional:
            return [_attempt(operation, db) for operation in operations]
        try:
            return [(True, value) for value in _transaction(db, operations)]
        except Exception:
            return _each_alone(db, operations)


def _transaction(db: sqlite3.Connection, operations: list[Operation]) -> list[Any]:
    """Runs the operations in one transaction and returns their results once it committed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        results = [operation(db) for operation in operations]
        db.execute("COMMIT")
        return results
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _each_alone(db: sqlite3.Connection, operations: list[Operation]) -> list[tuple[bool, Any]]:
    """Reruns a failed batch in one transaction, each operation under its own
    savepoint: a failing one is undone and answers its exception, the others
    commit together. If the commit itself fails (a full disk), all of them fail."""
    answers: list[tuple[bool, Any]] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for operation in operations:
            db.execute("SAVEPOINT one_write")
            answer = _attempt(operation, db)
            if not answer[0]:
                db.execute("ROLLBACK TO one_write")
            db.execute("RELEASE one_write")
            answers.append(answer)
        db.execute("COMMIT")
    except Exception as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return [(False, exc)] * len(operations)
    return answers


def _attempt(function: Callable[..., Any], *arguments: Any) -> tuple[bool, Any]:
    """(True, result) or (False, the exception): a failure goes to its caller, not to the worker."""
    try:
        return True, function(*arguments)
    except Exception as exc:
        return False, exc


def _answer(batch: list[Call], answers: list[tuple[bool, Any]]) -> None:
    """Resolves the batch's futures with one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (_, loop, future), (ok, value) in zip(batch, answers, strict=True):
        by_loop.setdefault(loop, []).append((future, ok, value))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.cancelled():
            continue  # the caller stopped waiting; a write still happened
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _configure(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA busy_timeout = 10000")
    # FULL: a result acknowledged to the job survives a crash of the machine too.
    db.execute("PRAGMA synchronous=FULL")


def _open_writer(path: Path) -> sqlite3.Connection:
    # isolation_level=None: the writer opens and commits its transactions itself.
    db = sqlite3.connect(path, isolation_level=None)
    try:
        _configure(db)  # a file that is not a database fails here already
        db.execute("PRAGMA journal_mode=WAL")
        # A damaged store refuses the start, naming the file, instead of
        # answering INTERNAL later or replaying half-read results.
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        problems = [str(exc)]
    if problems != ["ok"]:
        db.close()
        raise StartupError(
            f"the job store {path} is damaged ({' '.join('; '.join(problems).split())[:200]}): "
            "restore it from a backup, or move it away to start with no jobs"
        )
    try:
        upgrade(db)
        # A SQLite store serves one coordinator at a time: the leases an earlier process held
        # are void, and a coordinator restarted after a crash resumes its jobs at once.
        db.execute("UPDATE jobs SET lease_owner = '', lease_until = 0 WHERE lease_owner != ''")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StartupError(f"the job store {path} could not be upgraded to schema {SCHEMA_VERSION}: {exc}") from exc
    except StartupError:
        db.close()
        raise
    return db


def upgrade(db: sqlite3.Connection) -> None:
    """Brings a store of any earlier schema to SCHEMA_VERSION in one
    transaction (a crash leaves the old schema, upgraded at the next start)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StartupError(f"the job store has schema {version}, newer than this coordinator's {SCHEMA_VERSION}: upgrade autodidact")
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(results)")]
        if columns and "seq" not in columns:
            _upgrade_from_0(db)
        for statement in _statements(SCHEMA):
            db.execute(statement)
        if version < 2:
            _upgrade_to_tenant_keys(db)
        jobs_columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        if "lease_owner" not in jobs_columns:  # schema 2 and before: jobs without leases
            db.execute("ALTER TABLE jobs ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''")
            db.execute("ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _upgrade_from_0(db: sqlite3.Connection) -> None:
    """Schema 0: results without a cursor, and (before job_values existed) job
    values as results of the fake items LEGACY_VALUE_ITEMS, stored as
    {"data": value, "decision": null} under the value's key as stage."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS job_values (job_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
        "written_at REAL NOT NULL, PRIMARY KEY (job_id, key))"
    )
    marks = ",".join("?" * len(LEGACY_VALUE_ITEMS))
    legacy = db.execute(
        f"SELECT job_id, stage, value, written_at FROM results WHERE item_id IN ({marks}) ORDER BY rowid", LEGACY_VALUE_ITEMS
    ).fetchall()
    db.executemany(
        "INSERT INTO job_values (job_id, key, value, written_at) VALUES (?, ?, ?, ?) ON CONFLICT (job_id, key) DO NOTHING",
        [(job, key, json.dumps(json.loads(value)["data"], sort_keys=True), at) for job, key, value, at in legacy],
    )
    db.execute("ALTER TABLE results RENAME TO results_schema_0")
    for statement in _statements(SCHEMA):
        db.execute(statement)
    # Write order is kept (rowid order), so cursors follow it; the triggers count the copies.
    db.execute(
        "INSERT INTO results (job_id, item_id, stage, kept, filter, value, written_at) "
        f"SELECT job_id, item_id, stage, kept, filter, value, written_at FROM results_schema_0 WHERE item_id NOT IN ({marks}) "
        "ORDER BY rowid",
        LEGACY_VALUE_ITEMS,
    )
    db.execute("DROP TABLE results_schema_0")


def _upgrade_to_tenant_keys(db: sqlite3.Connection) -> None:
    """Schema 1 keyed a job by its id alone; a job's key is now "<tenant>/<id>"
    (job_key), and the jobs of a store from before tenants belong to "default"."""
    for table in ("results", "job_values", "stage_counts"):
        db.execute(f"UPDATE {table} SET job_id = '{LEGACY_TENANT}/' || job_id WHERE instr(job_id, '/') = 0")
    db.execute(f"UPDATE jobs SET id = '{LEGACY_TENANT}/' || id WHERE instr(id, '/') = 0")


def _statements(script: str) -> list[str]:
    """The script's statements, to run one by one inside a transaction
    (executescript would commit it)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def _open_reader(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    _configure(db)
    db.execute("PRAGMA query_only = 1")
    return db


class SqliteJobStore:
    """The JobStore on one SQLite file: a writer thread that group-commits and
    a reader thread (module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _Worker(f"job store writer {path.name}", lambda: _open_writer(path), MAX_WRITE_BATCH, transactional=True)
        try:
            self._reader = _Worker(f"job store reader {path.name}", lambda: _open_reader(path), MAX_READ_BATCH, transactional=False)
        except BaseException:
            self._writer.stop()
            raise
        self._closed = False
        # A store dropped without close() still ends its threads.
        weakref.finalize(self, self._writer.stop)
        weakref.finalize(self, self._reader.stop)

    async def close(self) -> None:
        """Waits for the writes already queued, then closes both connections."""
        if self._closed:
            return
        self._closed = True
        for worker in (self._writer, self._reader):
            worker.stop()
            await asyncio.to_thread(worker.join)

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        result: T = await self._writer.submit(operation)
        return result

    async def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        result: T = await self._reader.submit(operation)
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the job store is closed")

    # --- jobs ---

    async def create_job(self, job_id: str, spec: bytes, spec_hash: str, state: int) -> tuple[JobRow, bool]:
        """Inserts the job, or returns the existing one under that id (created False)."""

        def create(db: sqlite3.Connection) -> tuple[JobRow, bool]:
            now = time.time()
            cursor = db.execute(
                "INSERT INTO jobs (id, spec, spec_hash, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (job_id, spec, spec_hash, state, now, now),
            )
            return JobRow(*db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()), cursor.rowcount == 1

        return await self._write(create)

    async def get_job(self, job_id: str) -> JobRow | None:
        row = await self._read(_one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)))
        return None if row is None else JobRow(*row)

    async def list_jobs(self, limit: int, before_seq: int | None = None, key_prefix: str = "") -> list[JobRow]:
        before = before_seq if before_seq is not None else 2**62
        rows = await self._read(
            _all(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE seq < ? AND substr(id, 1, ?) = ? ORDER BY seq DESC LIMIT ?",
                (before, len(key_prefix), key_prefix, limit),
            )
        )
        return [JobRow(*row) for row in rows]

    async def jobs_in_states(self, states: tuple[int, ...]) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = await self._read(_all(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", states))
        return [JobRow(*row) for row in rows]

    async def set_state(self, job_id: str, state: int, error: str = "") -> None:
        await self._write(_change("UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?", (state, error, time.time(), job_id)))

    # --- leases ---

    async def claim_jobs(
        self, owner: str, states: tuple[int, ...], lease_seconds: float, limit: int, job_id: str | None = None
    ) -> list[JobRow]:
        def claim(db: sqlite3.Connection) -> list[JobRow]:
            now = time.time()
            marks = ",".join("?" * len(states))
            only, wanted = ("AND id = ?", (job_id,)) if job_id is not None else ("", ())
            rows = db.execute(
                f"UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE seq IN (SELECT seq FROM jobs WHERE state IN ({marks}) "
                f"AND (lease_owner = '' OR lease_until < ?) {only} ORDER BY seq LIMIT ?) RETURNING {_JOB_COLUMNS}",
                (owner, now + lease_seconds, *states, now, *wanted, limit),
            ).fetchall()
            return sorted((JobRow(*row) for row in rows), key=lambda row: row.seq)

        return await self._write(claim)

    async def renew_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> dict[str, int]:
        ids = list(job_ids)

        def renew(db: sqlite3.Connection) -> dict[str, int]:
            held: dict[str, int] = {}
            for start in range(0, len(ids), IDS_PER_QUERY):
                chunk = ids[start : start + IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                held.update(
                    db.execute(
                        f"UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND id IN ({marks}) RETURNING id, state",
                        (time.time() + lease_seconds, owner, *chunk),
                    ).fetchall()
                )
            return held

        return await self._write(renew) if ids else {}

    async def release_lease(self, job_id: str, owner: str) -> None:
        await self._write(_change("UPDATE jobs SET lease_owner = '', lease_until = 0 WHERE id = ? AND lease_owner = ?", (job_id, owner)))

    # --- stage results ---

    async def get_result(self, job_id: str, item_id: str, stage: str) -> dict[str, Any] | None:
        key = (job_id, item_id, stage)
        return await self._read(_value("SELECT value FROM results WHERE job_id = ? AND item_id = ? AND stage = ?", key))

    async def put_result(self, job_id: str, item_id: str, stage: str, value: dict[str, Any], kept: bool | None, filter_: str = "") -> bool:
        """True when this call wrote the result, False when the key already had
        one (kept unchanged). The value is encoded on the writer thread: the
        caller must not change it before this returns."""

        def insert(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO results (job_id, item_id, stage, kept, filter, value, written_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id, item_id, stage) DO NOTHING",
                (job_id, item_id, stage, None if kept is None else int(kept), filter_, encode_value(value), time.time()),
            )
            return cursor.rowcount == 1

        return await self._write(insert)

    async def has_results(self, job_id: str) -> bool:
        return await self._read(_one("SELECT 1 FROM results WHERE job_id = ? LIMIT 1", (job_id,))) is not None

    async def delete_results(
        self, job_id: str, *, filter_: str | None = None, item_id: str | None = None, stage: str | None = None
    ) -> None:
        """Forgets a job's results matching every condition given (a retried
        job recomputes them); the only exception to write-once. The stage
        counts go down in the same transaction."""
        conditions = [(c, v) for c, v in (("filter", filter_), ("item_id", item_id), ("stage", stage)) if v is not None]
        assert conditions, "refusing to delete every result of a job"
        where = " AND ".join(f"{column} = ?" for column, _ in conditions)
        await self._write(_change(f"DELETE FROM results WHERE job_id = ? AND {where}", (job_id, *(v for _, v in conditions))))

    async def get_results(self, job_id: str, item_ids: Sequence[str], stage: str) -> dict[str, dict[str, Any]]:
        """{item_id: value} of the items that have a result at `stage`."""
        ids = list(dict.fromkeys(item_ids))

        def read(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), IDS_PER_QUERY):
                chunk = ids[start : start + IDS_PER_QUERY]
                rows = db.execute(
                    f"SELECT item_id, value FROM results WHERE job_id = ? AND stage = ? AND item_id IN ({','.join('?' * len(chunk))})",
                    (job_id, stage, *chunk),
                )
                found.update((item, decode_value(value)) for item, value in rows)
            return found

        return await self._read(read) if ids else {}

    async def iter_results(self, job_id: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
        """(item_id, stage, value) of a job, ordered by item then write order.
        Reads PAGE_ROWS rows at a time and never splits an item across pages,
        so a job's results are never all in memory."""
        after: str | None = None
        while True:
            page, after = await self._read(functools.partial(_results_page, job_id=job_id, after=after))
            for row in page:
                yield row
            if after is None:
                return

    async def results_since(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(cursor, item_id, stage, value) of results written after cursor `after`, oldest first."""

        def read(db: sqlite3.Connection) -> list[tuple[int, str, str, dict[str, Any]]]:
            rows = db.execute(
                "SELECT seq, item_id, stage, value FROM results WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, after, limit)
            )
            return [(cursor, item, stage_, decode_value(value)) for cursor, item, stage_, value in rows]

        return await self._read(read)

    async def results(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(item_id, stage, value) of a job, ordered by item then write order."""
        return [row async for row in self.iter_results(job_id)]

    async def stage_counts(self, job_id: str) -> list[StageCounts]:
        """Decided results per stage, from the counters: O(stages)."""
        rows = await self._read(
            _all("SELECT stage, filter, done, kept FROM stage_counts WHERE job_id = ? AND done > 0 ORDER BY stage, filter", (job_id,))
        )
        return counts_by_stage(rows)

    # --- job-level values ---

    async def get_value(self, job_id: str, key: str) -> dict[str, Any] | None:
        return await self._read(_value("SELECT value FROM job_values WHERE job_id = ? AND key = ?", (job_id, key)))

    async def get_values(self, job_id: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{key: value} of the keys that have a value, in one read."""
        wanted = list(dict.fromkeys(keys))

        def read(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(wanted), IDS_PER_QUERY):
                chunk = wanted[start : start + IDS_PER_QUERY]
                rows = db.execute(
                    f"SELECT key, value FROM job_values WHERE job_id = ? AND key IN ({','.join('?' * len(chunk))})", (job_id, *chunk)
                )
                found.update((key, decode_value(value)) for key, value in rows)
            return found

        return await self._read(read) if wanted else {}

    async def put_value(self, job_id: str, key: str, value: dict[str, Any]) -> None:
        await self._write(
            _change(
                "INSERT INTO job_values (job_id, key, value, written_at) VALUES (?, ?, ?, ?) ON CONFLICT (job_id, key) DO NOTHING",
                (job_id, key, encode_value(value), time.time()),
            )
        )

    async def delete_value(self, job_id: str, key: str) -> None:
        """Forgets a value (a retried job writes its summary again)."""
        await self._write(_change("DELETE FROM job_values WHERE job_id = ? AND key = ?", (job_id, key)))


def counts_by_stage(rows: Sequence[tuple[str, str, int, int]]) -> list[StageCounts]:
    """StageCounts from the counter rows (stage, filter, done, kept), ordered by stage then filter."""
    done: dict[str, int] = {}
    kept: dict[str, int] = {}
    dropped: dict[str, dict[str, int]] = {}
    flagged: dict[str, dict[str, int]] = {}
    for stage, filter_, stage_done, stage_kept in rows:
        done[stage] = done.get(stage, 0) + stage_done
        kept[stage] = kept.get(stage, 0) + stage_kept
        by_filter = dropped.setdefault(stage, {})
        if stage_done > stage_kept:
            by_filter[filter_] = stage_done - stage_kept
        if filter_ and stage_kept:
            flagged.setdefault(stage, {})[filter_] = stage_kept
    return [StageCounts(stage, done[stage], kept[stage], dropped[stage], flagged.get(stage, {})) for stage in done]


def _results_page(db: sqlite3.Connection, job_id: str, after: str | None) -> tuple[list[tuple[str, str, dict[str, Any]]], str | None]:
    """One page of iter_results: the whole items after item `after`, each in
    write order, and the last item read (None once the job's results end)."""
    bound, parameters = ("AND item_id > ?", (job_id, after, PAGE_ROWS)) if after is not None else ("", (job_id, PAGE_ROWS))
    rows = db.execute(
        f"SELECT item_id, seq, stage, value FROM results WHERE job_id = ? {bound} ORDER BY item_id, stage LIMIT ?", parameters
    ).fetchall()
    last: str | None = None
    if len(rows) == PAGE_ROWS:  # the last item may go on past the page: leave it to the next one
        last = rows[-1][0]
        whole = [row for row in rows if row[0] != last]
        if whole:
            rows, last = whole, whole[-1][0]
        else:  # one item fills the page: read all of it
            rows = db.execute("SELECT item_id, seq, stage, value FROM results WHERE job_id = ? AND item_id = ?", (job_id, last)).fetchall()
    rows.sort(key=lambda row: (row[0], row[1]))
    return [(item, stage, decode_value(value)) for item, _, stage, value in rows], last


def _one(sql: str, parameters: Sequence[Any]) -> Operation:
    """A read of one row (or None). fetchall, not fetchone: a statement left
    unfinished would hold the reader's snapshot open, hiding later commits."""

    def read(db: sqlite3.Connection) -> Any:
        rows = db.execute(sql, parameters).fetchall()
        return rows[0] if rows else None

    return read


def _all(sql: str, parameters: Sequence[Any]) -> Operation:
    return lambda db: db.execute(sql, parameters).fetchall()


def _value(sql: str, parameters: Sequence[Any]) -> Operation:
    """A read of one JSON value, decoded on the reader thread (None when there is none)."""

    one = _one(sql, parameters)

    def read(db: sqlite3.Connection) -> dict[str, Any] | None:
        row = one(db)
        return None if row is None else decode_value(row[0])

    return read


def _change(sql: str, parameters: Sequence[Any]) -> Operation:
    """A write that answers how many rows it changed (not its cursor, which belongs to the writer thread)."""
    return lambda db: db.execute(sql, parameters).rowcount


def encode_value(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


def decode_value(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


_JOB_COLUMNS = "seq, id, spec, spec_hash, state, error, created_at, updated_at"
