"""The JobStore on PostgreSQL (psycopg 3, async, with a connection pool):
the store several coordinators share.

Same contract as the SQLite store (store.py): results and values are written
once, a write returns once committed, stage counts are kept by triggers in the
transaction that writes the results, and a result's cursor (seq) grows in the
order the results became visible to readers of its job.

That last promise is why writes are group-committed by one writer, as in the
SQLite store: a sequence hands out numbers at insert time, so two transactions
of one process committing out of order would let a follower read cursor n+1
before n exists and skip n for ever. One writer per process commits its
batches one after another, and a job's results are written by one process at
a time (the replica holding the job), so a job's cursors become visible in
order. Reads go through the pool, several at once.

The pool lives on the store's own event loop, in a thread of its own: callers
on any loop (the server's, or the tests' successive asyncio.run loops) await
it through run_coroutine_threadsafe, and the database's I/O never runs on the
caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from autodidact.coordinator.store import (
    IDS_PER_QUERY,
    MAX_WRITE_BATCH,
    PAGE_ROWS,
    JobRow,
    StageCounts,
    counts_by_stage,
    decode_value,
    encode_value,
)
from autodidact.errors import StartupError

T = TypeVar("T")

# The schema's version, in the autodidact_schema table. Several coordinators may
# start at once: the first creates the schema under an advisory lock, the others
# find it made.
SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x6175746F  # pg_advisory_xact_lock key ("auto"): serialises schema setup across replicas

# Ids compare byte-wise (COLLATE "C"), as in SQLite: iter_results pages by
# item_id and list order must not depend on the database's locale.
SCHEMA = """
CREATE TABLE IF NOT EXISTS autodidact_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    spec BYTEA NOT NULL,
    spec_hash TEXT NOT NULL,
    state INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',                -- the coordinator running the job ('' for none)
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0      -- the database's clock (epoch seconds): replicas' clocks may differ
);
CREATE TABLE IF NOT EXISTS results (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT COLLATE "C" NOT NULL,
    item_id TEXT COLLATE "C" NOT NULL,
    stage TEXT COLLATE "C" NOT NULL,
    kept SMALLINT,           -- 1 kept, 0 dropped, NULL for results that decide nothing
    filter TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL,     -- JSON as written (not jsonb, which would reorder it)
    written_at DOUBLE PRECISION NOT NULL,
    UNIQUE (job_id, item_id, stage)
);
CREATE INDEX IF NOT EXISTS results_by_cursor ON results (job_id, seq);
CREATE TABLE IF NOT EXISTS job_values (
    job_id TEXT COLLATE "C" NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    written_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE TABLE IF NOT EXISTS stage_counts (
    job_id TEXT COLLATE "C" NOT NULL,
    stage TEXT COLLATE "C" NOT NULL,
    filter TEXT COLLATE "C" NOT NULL,
    done BIGINT NOT NULL,
    kept BIGINT NOT NULL,
    PRIMARY KEY (job_id, stage, filter)
);
CREATE OR REPLACE FUNCTION autodidact_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stage_counts (job_id, stage, filter, done, kept)
    VALUES (NEW.job_id, NEW.stage, NEW.filter, 1, CASE WHEN NEW.kept = 1 THEN 1 ELSE 0 END)
    ON CONFLICT (job_id, stage, filter) DO UPDATE SET done = stage_counts.done + 1, kept = stage_counts.kept + excluded.kept;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION autodidact_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE stage_counts SET done = done - 1, kept = kept - CASE WHEN OLD.kept = 1 THEN 1 ELSE 0 END
    WHERE job_id = OLD.job_id AND stage = OLD.stage AND filter = OLD.filter;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER count_inserted AFTER INSERT ON results
    FOR EACH ROW WHEN (NEW.kept IS NOT NULL) EXECUTE FUNCTION autodidact_count_inserted();
CREATE OR REPLACE TRIGGER count_deleted AFTER DELETE ON results
    FOR EACH ROW WHEN (OLD.kept IS NOT NULL) EXECUTE FUNCTION autodidact_count_deleted();
"""

_JOB_COLUMNS = "seq, id, spec, spec_hash, state, error, created_at, updated_at"
# Lease times come from the database's clock, the one clock every replica shares.
_NOW = "extract(epoch FROM clock_timestamp())"

Connection = psycopg.AsyncConnection[Any]
Operation = Callable[[Connection], Awaitable[Any]]
# Connections the pool keeps open at most: reads run this many at once, the writer takes one.
POOL_SIZE = 8
CONNECT_TIMEOUT_SECONDS = 30.0


def _job(row: Sequence[Any]) -> JobRow:
    seq, id_, spec, spec_hash, state, error, created_at, updated_at = row
    return JobRow(seq, id_, bytes(spec), spec_hash, state, error, created_at, updated_at)


class PostgresJobStore:
    """The JobStore on a PostgreSQL database named by a libpq DSN
    (postgresql://user:password@host:5432/db). The schema is created on first
    use; a database with a newer schema is refused."""

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="job store postgres", daemon=True)
        self._thread.start()
        self._closed = False
        self._pool = AsyncConnectionPool(dsn, min_size=1, max_size=pool_size, open=False, kwargs={"autocommit": True})
        self._writes: asyncio.Queue[tuple[Operation, concurrent.futures.Future[Any]] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        try:
            asyncio.run_coroutine_threadsafe(self._open(dsn), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        # A store dropped without close() still ends its thread.
        weakref.finalize(self, _stop_soon, self._loop)

    async def _open(self, dsn: str) -> None:
        where = _without_password(dsn)
        try:
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
        except Exception as exc:
            await self._pool.close()
            raise StartupError(f"cannot connect to the job store database {where}: {exc}") from None
        try:
            async with self._pool.connection() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                await self._create_schema(db, where)
        except StartupError:
            await self._pool.close()
            raise
        except psycopg.Error as exc:
            await self._pool.close()
            raise StartupError(f"the job store database {where} could not be set up (schema {SCHEMA_VERSION}): {exc}") from None
        self._writes = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_batches())

    @staticmethod
    async def _create_schema(db: Connection, where: str) -> None:
        exists = await (await db.execute("SELECT to_regclass('autodidact_schema') IS NOT NULL")).fetchone()
        if exists and exists[0]:
            row = await (await db.execute("SELECT max(version) FROM autodidact_schema")).fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StartupError(
                    f"the job store database {where} has schema {version}, newer than this coordinator's {SCHEMA_VERSION}: "
                    "upgrade autodidact"
                )
            if version == SCHEMA_VERSION:
                return
        await db.execute(SCHEMA)
        await db.execute("DELETE FROM autodidact_schema")
        await db.execute("INSERT INTO autodidact_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    async def close(self) -> None:
        """Waits for the writes already queued, then closes the pool."""
        if self._closed:
            return
        self._closed = True
        await self._on_loop(self._shut())
        await asyncio.to_thread(self._stop_loop)

    async def _shut(self) -> None:
        assert self._writes is not None and self._writer is not None
        self._writes.put_nowait(None)
        await self._writer
        await self._pool.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the job store is closed")

    async def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` on the store's loop and waits for it on the caller's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def _read(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        self._check_open()

        async def read() -> T:
            async with self._pool.connection() as db:
                return await operation(db)

        return await self._on_loop(read())

    async def _write(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        self._check_open()
        answer: concurrent.futures.Future[T] = concurrent.futures.Future()

        def enqueue() -> None:
            assert self._writes is not None
            self._writes.put_nowait((operation, answer))

        self._loop.call_soon_threadsafe(enqueue)
        return await asyncio.wrap_future(answer)

    async def _write_batches(self) -> None:
        """The writer: takes what is queued (up to MAX_WRITE_BATCH) and commits
        it in one transaction; a batch with a failing write is rerun with each
        write under its own savepoint, so only that write's caller fails."""
        assert self._writes is not None
        stopping = False
        while not stopping:
            first = await self._writes.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_WRITE_BATCH and not self._writes.empty():
                call = self._writes.get_nowait()
                if call is None:
                    stopping = True
                    break
                batch.append(call)
            for (_, answer), (ok, value) in zip(batch, await self._commit(batch), strict=True):
                # A caller that stopped waiting cancelled its future (from its own thread): the write still happened.
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    if ok:
                        answer.set_result(value)
                    else:
                        answer.set_exception(value)

    async def _commit(self, batch: list[tuple[Operation, concurrent.futures.Future[Any]]]) -> list[tuple[bool, Any]]:
        try:
            async with self._pool.connection() as db:
                try:
                    async with db.transaction():
                        return [(True, await operation(db)) for operation, _ in batch]
                except Exception:
                    pass  # rolled back: run each write alone below
                answers: list[tuple[bool, Any]] = []
                async with db.transaction():
                    for operation, _ in batch:
                        try:
                            async with db.transaction():  # a savepoint
                                answers.append((True, await operation(db)))
                        except Exception as exc:
                            answers.append((False, exc))
                return answers
        except Exception as exc:  # the connection or the commit failed: every write of the batch did
            return [(False, exc)] * len(batch)

    # --- jobs ---

    async def create_job(self, job_id: str, spec: bytes, spec_hash: str, state: int) -> tuple[JobRow, bool]:
        """Inserts the job, or returns the existing one under that id (created
        False); two replicas racing on one id get one job between them."""

        async def create(db: Connection) -> tuple[JobRow, bool]:
            now = time.time()
            inserted = await db.execute(
                f"INSERT INTO jobs (id, spec, spec_hash, state, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (id) DO NOTHING RETURNING {_JOB_COLUMNS}",
                (job_id, spec, spec_hash, state, now, now),
            )
            row = await inserted.fetchone()
            if row is not None:
                return _job(row), True
            existing = await (await db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))).fetchone()
            assert existing is not None, "a job that conflicted on insert exists"
            return _job(existing), False

        return await self._write(create)

    async def get_job(self, job_id: str) -> JobRow | None:
        row = await self._read(_one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)))
        return None if row is None else _job(row)

    async def list_jobs(self, limit: int, before_seq: int | None = None, key_prefix: str = "") -> list[JobRow]:
        before = before_seq if before_seq is not None else 2**62
        rows = await self._read(
            _all(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE seq < %s AND starts_with(id, %s) ORDER BY seq DESC LIMIT %s",
                (before, key_prefix, limit),
            )
        )
        return [_job(row) for row in rows]

    async def jobs_in_states(self, states: tuple[int, ...]) -> list[JobRow]:
        rows = await self._read(_all(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ANY(%s) ORDER BY seq", (list(states),)))
        return [_job(row) for row in rows]

    async def set_state(self, job_id: str, state: int, error: str = "") -> None:
        await self._write(
            _change("UPDATE jobs SET state = %s, error = %s, updated_at = %s WHERE id = %s", (state, error, time.time(), job_id))
        )

    # --- leases (store.py's JobStore says what they promise) ---

    async def claim_jobs(
        self, owner: str, states: tuple[int, ...], lease_seconds: float, limit: int, job_id: str | None = None
    ) -> list[JobRow]:
        """SKIP LOCKED: replicas claiming at once each take other jobs instead of queueing on one row."""

        async def claim(db: Connection) -> list[JobRow]:
            only, wanted = ("AND id = %s", (job_id,)) if job_id is not None else ("", ())
            rows = await db.execute(
                f"WITH free AS (SELECT seq FROM jobs WHERE state = ANY(%s) AND (lease_owner = '' OR lease_until < {_NOW}) "
                f"{only} ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"UPDATE jobs SET lease_owner = %s, lease_until = {_NOW} + %s FROM free WHERE jobs.seq = free.seq "
                f"RETURNING {', '.join(f'jobs.{column}' for column in _JOB_COLUMNS.split(', '))}",
                (list(states), *wanted, limit, owner, lease_seconds),
            )
            return sorted((_job(row) for row in await rows.fetchall()), key=lambda row: row.seq)

        return await self._write(claim)

    async def renew_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> dict[str, int]:
        async def renew(db: Connection) -> dict[str, int]:
            rows = await db.execute(
                f"UPDATE jobs SET lease_until = {_NOW} + %s WHERE lease_owner = %s AND id = ANY(%s) RETURNING id, state",
                (lease_seconds, owner, list(job_ids)),
            )
            return dict(await rows.fetchall())

        return await self._write(renew) if job_ids else {}

    async def release_lease(self, job_id: str, owner: str) -> None:
        await self._write(_change("UPDATE jobs SET lease_owner = '', lease_until = 0 WHERE id = %s AND lease_owner = %s", (job_id, owner)))

    # --- stage results ---

    async def get_result(self, job_id: str, item_id: str, stage: str) -> dict[str, Any] | None:
        key = (job_id, item_id, stage)
        return await self._read(_value("SELECT value FROM results WHERE job_id = %s AND item_id = %s AND stage = %s", key))

    async def put_result(self, job_id: str, item_id: str, stage: str, value: dict[str, Any], kept: bool | None, filter_: str = "") -> bool:
        """True when this call wrote the result, False when the key already had
        one (kept unchanged). The value is encoded on the store's thread: the
        caller must not change it before this returns."""

        async def insert(db: Connection) -> bool:
            cursor = await db.execute(
                "INSERT INTO results (job_id, item_id, stage, kept, filter, value, written_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (job_id, item_id, stage) DO NOTHING",
                (job_id, item_id, stage, None if kept is None else int(kept), filter_, encode_value(value), time.time()),
            )
            return cursor.rowcount == 1

        return await self._write(insert)

    async def has_results(self, job_id: str) -> bool:
        return await self._read(_one("SELECT 1 FROM results WHERE job_id = %s LIMIT 1", (job_id,))) is not None

    async def delete_results(
        self, job_id: str, *, filter_: str | None = None, item_id: str | None = None, stage: str | None = None
    ) -> None:
        """Forgets a job's results matching every condition given; the stage
        counts go down in the same transaction (store.py says when)."""
        conditions = [(c, v) for c, v in (("filter", filter_), ("item_id", item_id), ("stage", stage)) if v is not None]
        assert conditions, "refusing to delete every result of a job"
        where = " AND ".join(f"{column} = %s" for column, _ in conditions)
        await self._write(_change(f"DELETE FROM results WHERE job_id = %s AND {where}", (job_id, *(v for _, v in conditions))))

    async def get_results(self, job_id: str, item_ids: Sequence[str], stage: str) -> dict[str, dict[str, Any]]:
        """{item_id: value} of the items that have a result at `stage`."""
        ids = list(dict.fromkeys(item_ids))

        async def read(db: Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), IDS_PER_QUERY):
                rows = await db.execute(
                    "SELECT item_id, value FROM results WHERE job_id = %s AND stage = %s AND item_id = ANY(%s)",
                    (job_id, stage, ids[start : start + IDS_PER_QUERY]),
                )
                found.update([(item, decode_value(value)) async for item, value in rows])
            return found

        return await self._read(read) if ids else {}

    async def iter_results(self, job_id: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
        """(item_id, stage, value) of a job, ordered by item then write order,
        PAGE_ROWS rows at a time, never splitting an item across pages."""
        after: str | None = None
        while True:
            page, after = await self._read(functools.partial(_results_page, job_id=job_id, after=after))
            for row in page:
                yield row
            if after is None:
                return

    async def results_since(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(cursor, item_id, stage, value) of results written after cursor `after`, oldest first."""

        async def read(db: Connection) -> list[tuple[int, str, str, dict[str, Any]]]:
            rows = await db.execute(
                "SELECT seq, item_id, stage, value FROM results WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (job_id, after, limit),
            )
            return [(cursor, item, stage_, decode_value(value)) async for cursor, item, stage_, value in rows]

        return await self._read(read)

    async def results(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [row async for row in self.iter_results(job_id)]

    async def stage_counts(self, job_id: str) -> list[StageCounts]:
        """Decided results per stage, from the counters: O(stages)."""
        rows = await self._read(
            _all("SELECT stage, filter, done, kept FROM stage_counts WHERE job_id = %s AND done > 0 ORDER BY stage, filter", (job_id,))
        )
        return counts_by_stage(rows)

    # --- job-level values ---

    async def get_value(self, job_id: str, key: str) -> dict[str, Any] | None:
        return await self._read(_value("SELECT value FROM job_values WHERE job_id = %s AND key = %s", (job_id, key)))

    async def get_values(self, job_id: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{key: value} of the keys that have a value, in one read."""
        wanted = list(dict.fromkeys(keys))

        async def read(db: Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(wanted), IDS_PER_QUERY):
                rows = await db.execute(
                    "SELECT key, value FROM job_values WHERE job_id = %s AND key = ANY(%s)", (job_id, wanted[start : start + IDS_PER_QUERY])
                )
                found.update([(key, decode_value(value)) async for key, value in rows])
            return found

        return await self._read(read) if wanted else {}

    async def put_value(self, job_id: str, key: str, value: dict[str, Any]) -> None:
        async def insert(db: Connection) -> None:
            await db.execute(
                "INSERT INTO job_values (job_id, key, value, written_at) VALUES (%s, %s, %s, %s) ON CONFLICT (job_id, key) DO NOTHING",
                (job_id, key, encode_value(value), time.time()),
            )

        await self._write(insert)

    async def delete_value(self, job_id: str, key: str) -> None:
        await self._write(_change("DELETE FROM job_values WHERE job_id = %s AND key = %s", (job_id, key)))


async def _results_page(db: Connection, job_id: str, after: str | None) -> tuple[list[tuple[str, str, dict[str, Any]]], str | None]:
    """One page of iter_results: the whole items after item `after`, each in
    write order, and the last item read (None once the job's results end)."""
    bound, parameters = ("AND item_id > %s", (job_id, after, PAGE_ROWS)) if after is not None else ("", (job_id, PAGE_ROWS))
    rows = await (
        await db.execute(
            f"SELECT item_id, seq, stage, value FROM results WHERE job_id = %s {bound} ORDER BY item_id, seq LIMIT %s", parameters
        )
    ).fetchall()
    last: str | None = None
    if len(rows) == PAGE_ROWS:  # the last item may go on past the page: leave it to the next one
        last = rows[-1][0]
        whole = [row for row in rows if row[0] != last]
        if whole:
            rows, last = whole, whole[-1][0]
        else:  # one item fills the page: read all of it
            rows = await (
                await db.execute(
                    "SELECT item_id, seq, stage, value FROM results WHERE job_id = %s AND item_id = %s ORDER BY seq", (job_id, last)
                )
            ).fetchall()
    return [(item, stage, decode_value(value)) for item, _, stage, value in rows], last


def _one(sql: str, parameters: Sequence[Any]) -> Callable[[Connection], Awaitable[Any]]:
    async def read(db: Connection) -> Any:
        return await (await db.execute(sql, parameters)).fetchone()

    return read


def _all(sql: str, parameters: Sequence[Any]) -> Callable[[Connection], Awaitable[list[Any]]]:
    async def read(db: Connection) -> list[Any]:
        return await (await db.execute(sql, parameters)).fetchall()

    return read


def _value(sql: str, parameters: Sequence[Any]) -> Callable[[Connection], Awaitable[dict[str, Any] | None]]:
    one = _one(sql, parameters)

    async def read(db: Connection) -> dict[str, Any] | None:
        row = await one(db)
        return None if row is None else decode_value(row[0])

    return read


def _change(sql: str, parameters: Sequence[Any]) -> Callable[[Connection], Awaitable[int]]:
    async def write(db: Connection) -> int:
        return (await db.execute(sql, parameters)).rowcount

    return write


def _stop_soon(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


def _without_password(dsn: str) -> str:
    """The DSN as error messages may show it."""
    with contextlib.suppress(psycopg.Error):
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        return " ".join(f"{key}={value}" for key, value in info.items() if key != "password")
    return "(an unreadable DSN)"
