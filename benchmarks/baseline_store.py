"""BASELINE for benchmarks/control_plane.py: the job store as it was before
issue 11's rebuild (a copy of services/autodidact/coordinator/store.py
at commit 2486bd7), so that every benchmark run measures the new store against
today's in the same run. Not used by the product.

Its SQLite connection lives on the event loop's thread and every write is its
own transaction with synchronous=FULL: one fsync per stage result, with the
loop blocked meanwhile. Changed from the copy, only so that it answers issue
11's JobStore protocol, with today's storage behaviour: put_result says whether
it wrote; has_results is new; the lease methods (issue 13) are a lone
coordinator's, which holds every job, so they store nothing; one signature is wrapped to 140 characters and the imports sorted.

The original docstring:
The durable job store: the JobStore protocol the coordinator and recipes
use, and its SQLite implementation (WAL mode, one file).

Every stage result is written, keyed by (job, item, stage), before the job
moves on; a restarted coordinator replays a job by reading what is stored and
recomputing only what is not. Results are written once: a second write of the
same key keeps the first, so a stage that raced with a crash cannot change an
answer already read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from autodidact.errors import StartupError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec BLOB NOT NULL,
    spec_hash TEXT NOT NULL,
    state INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    kept INTEGER,            -- 1 kept, 0 dropped, NULL for results that decide nothing
    filter TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL,     -- JSON
    written_at REAL NOT NULL,
    PRIMARY KEY (job_id, item_id, stage)
);
CREATE TABLE IF NOT EXISTS job_values (
    job_id TEXT NOT NULL,
    key TEXT NOT NULL,       -- a job-level value: the plan, the summary, a recipe's reference date
    value TEXT NOT NULL,     -- JSON
    written_at REAL NOT NULL,
    PRIMARY KEY (job_id, key)
);
"""


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
    # Read by today's coordinator (items held for review); a benchmark job holds none.
    kept_by_filter: dict[str, int] = field(default_factory=dict)


class JobStore(Protocol):
    """What the coordinator and the recipes need from durable storage. Every
    method is a coroutine: an implementation never blocks the event loop.
    Results and values are written once (a second write of a key keeps the
    first); a write returns once it is durable."""

    async def create_job(self, job_id: str, spec: bytes, spec_hash: str, state: int) -> tuple[JobRow, bool]: ...
    async def get_job(self, job_id: str) -> JobRow | None: ...
    async def list_jobs(self, limit: int, before_seq: int | None = None) -> list[JobRow]: ...
    async def jobs_in_states(self, states: tuple[int, ...]) -> list[JobRow]: ...
    async def set_state(self, job_id: str, state: int, error: str = "") -> None: ...
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
    async def put_value(self, job_id: str, key: str, value: dict[str, Any]) -> None: ...
    async def delete_value(self, job_id: str, key: str) -> None: ...
    async def close(self) -> None: ...


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._leases: dict[str, str] = {}  # job id -> owner, in memory: a lone coordinator's
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a result acknowledged to the job survives a crash of the machine too.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            # A damaged store refuses the start, naming the file, instead of
            # answering INTERNAL later or replaying half-read results.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
            problems = [str(exc)]
        if problems != ["ok"]:
            self._db.close()
            raise StartupError(
                f"the job store {path} is damaged ({' '.join('; '.join(problems).split())[:200]}): "
                "restore it from a backup, or move it away to start with no jobs"
            )

    async def close(self) -> None:
        self._db.close()

    # --- jobs ---

    async def create_job(self, job_id: str, spec: bytes, spec_hash: str, state: int) -> tuple[JobRow, bool]:
        """Inserts the job, or returns the existing one under that id (created False)."""
        now = time.time()
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO jobs (id, spec, spec_hash, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, spec, spec_hash, state, now, now),
        )
        row = await self.get_job(job_id)
        assert row is not None
        return row, cursor.rowcount == 1

    async def get_job(self, job_id: str) -> JobRow | None:
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRow(*row)

    async def list_jobs(self, limit: int, before_seq: int | None = None) -> list[JobRow]:
        rows = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (before_seq if before_seq is not None else 2**62, limit),
        ).fetchall()
        return [JobRow(*row) for row in rows]

    async def jobs_in_states(self, states: tuple[int, ...]) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", states).fetchall()
        return [JobRow(*row) for row in rows]

    async def claim_jobs(
        self, owner: str, states: tuple[int, ...], lease_seconds: float, limit: int, job_id: str | None = None
    ) -> list[JobRow]:
        rows = [row for row in await self.jobs_in_states(states) if row.id not in self._leases and job_id in (None, row.id)]
        self._leases.update((row.id, owner) for row in rows[:limit])
        return rows[:limit]

    async def renew_leases(self, owner: str, job_ids: Sequence[str], lease_seconds: float) -> dict[str, int]:
        held = [job_id for job_id in job_ids if self._leases.get(job_id) == owner]
        return {job_id: row.state for job_id in held if (row := await self.get_job(job_id)) is not None}

    async def release_lease(self, job_id: str, owner: str) -> None:
        if self._leases.get(job_id) == owner:
            del self._leases[job_id]

    async def set_state(self, job_id: str, state: int, error: str = "") -> None:
        self._db.execute("UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?", (state, error, time.time(), job_id))

    # --- stage results ---

    async def get_result(self, job_id: str, item_id: str, stage: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT value FROM results WHERE job_id = ? AND item_id = ? AND stage = ?", (job_id, item_id, stage)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    async def put_result(self, job_id: str, item_id: str, stage: str, value: dict[str, Any], kept: bool | None, filter_: str = "") -> bool:
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO results (job_id, item_id, stage, kept, filter, value, written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, item_id, stage, None if kept is None else int(kept), filter_, json.dumps(value, sort_keys=True), time.time()),
        )
        return cursor.rowcount == 1

    async def has_results(self, job_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM results WHERE job_id = ? LIMIT 1", (job_id,)).fetchone() is not None

    async def delete_results(
        self, job_id: str, *, filter_: str | None = None, item_id: str | None = None, stage: str | None = None
    ) -> None:
        """Forgets a job's results matching every condition given (a retried
        job recomputes them); the only exception to write-once."""
        conditions = [(c, v) for c, v in (("filter", filter_), ("item_id", item_id), ("stage", stage)) if v is not None]
        assert conditions, "refusing to delete every result of a job"
        where = " AND ".join(f"{column} = ?" for column, _ in conditions)
        self._db.execute(f"DELETE FROM results WHERE job_id = ? AND {where}", (job_id, *(v for _, v in conditions)))

    async def get_results(self, job_id: str, item_ids: Sequence[str], stage: str) -> dict[str, dict[str, Any]]:
        """{item_id: value} of the items that have a result at `stage`."""
        found = {}
        for item_id in item_ids:
            value = await self.get_result(job_id, item_id, stage)
            if value is not None:
                found[item_id] = value
        return found

    async def iter_results(self, job_id: str) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
        """(item_id, stage, value) of a job, ordered by item then write order, without holding them all."""
        for row in await self.results(job_id):
            yield row

    async def results_since(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(cursor, item_id, stage, value) of results written after cursor `after`, oldest first."""
        rows = self._db.execute(
            "SELECT rowid, item_id, stage, value FROM results WHERE job_id = ? AND rowid > ? ORDER BY rowid LIMIT ?", (job_id, after, limit)
        ).fetchall()
        return [(cursor, item, stage_, json.loads(value)) for cursor, item, stage_, value in rows]

    async def results(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(item_id, stage, value) of a job, ordered by item then write order."""
        rows = self._db.execute(
            "SELECT item_id, stage, value FROM results WHERE job_id = ? ORDER BY item_id, written_at", (job_id,)
        ).fetchall()
        return [(item, stage_, json.loads(value)) for item, stage_, value in rows]

    async def stage_counts(self, job_id: str) -> list[StageCounts]:
        counts: dict[str, StageCounts] = {}
        for stage, done, kept in self._db.execute(
            "SELECT stage, COUNT(*), SUM(kept = 1) FROM results WHERE job_id = ? AND kept IS NOT NULL GROUP BY stage", (job_id,)
        ):
            counts[stage] = StageCounts(stage, done, kept or 0, {})
        for stage, filter_, dropped in self._db.execute(
            "SELECT stage, filter, COUNT(*) FROM results WHERE job_id = ? AND kept = 0 GROUP BY stage, filter", (job_id,)
        ):
            counts[stage].dropped_by_filter[filter_] = dropped
        return list(counts.values())

    # --- job-level values ---

    async def get_value(self, job_id: str, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM job_values WHERE job_id = ? AND key = ?", (job_id, key)).fetchone()
        return None if row is None else json.loads(row[0])

    async def put_value(self, job_id: str, key: str, value: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO job_values (job_id, key, value, written_at) VALUES (?, ?, ?, ?)",
            (job_id, key, json.dumps(value, sort_keys=True), time.time()),
        )

    async def delete_value(self, job_id: str, key: str) -> None:
        """Forgets a value (a retried job writes its summary again)."""
        self._db.execute("DELETE FROM job_values WHERE job_id = ? AND key = ?", (job_id, key))


_JOB_COLUMNS = "seq, id, spec, spec_hash, state, error, created_at, updated_at"
