"""The JobStore contract, run against every implementation: SQLite, and
PostgreSQL on a real server the tests start (tests/postgres.py); then the
SQLite store's own promises: its schema upgrade, page boundaries and group
commit.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autodidact.coordinator import store as sqlite_store
from autodidact.coordinator.postgres_store import PostgresJobStore
from autodidact.coordinator.store import JobStore, SqliteJobStore, StageCounts
from autodidact.errors import StartupError

# Opens the store kept at a place (a directory); opening the same place again reopens it.
OpenStore = Callable[[Path], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    if request.param == "sqlite":
        return lambda place: SqliteJobStore(place / "jobs.sqlite")
    server = request.getfixturevalue("postgres")
    databases: dict[Path, str] = {}  # a place is a database of its own, made on first open

    def open_postgres(place: Path) -> JobStore:
        return PostgresJobStore(databases.setdefault(place, server.new_database()))

    return open_postgres


def decided(kept: bool, filter_: str = "") -> dict[str, Any]:
    return {"data": {"kept": kept}, "decision": {"kept": kept, "filter": filter_}}


def recount(rows: list[tuple[str, str, int | None, str]]) -> dict[str, StageCounts]:
    """The stage counts a GROUP BY over (item, stage, kept, filter) rows gives: what the counters must equal."""
    counts: dict[str, StageCounts] = {}
    for _, stage, kept, filter_ in rows:
        if kept is None:
            continue
        c = counts.setdefault(stage, StageCounts(stage, 0, 0, {}))
        counts[stage] = StageCounts(stage, c.done + 1, c.kept + kept, c.dropped_by_filter)
        if not kept:
            c.dropped_by_filter[filter_] = c.dropped_by_filter.get(filter_, 0) + 1
    return counts


async def test_jobs_are_created_once_listed_newest_first_and_change_state(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    row, created = await store.create_job("a", b"spec-a", "hash-a", 1)
    again, created_again = await store.create_job("a", b"other", "other", 2)
    assert created and not created_again and again == row and row.spec == b"spec-a" and row.state == 1
    for name in "bcd":
        await store.create_job(name, b"", "h", 1)
    await store.set_state("c", 3, "it broke")
    newest = await store.list_jobs(2)
    assert [r.id for r in newest] == ["d", "c"]
    assert [r.id for r in await store.list_jobs(10, before_seq=newest[-1].seq)] == ["b", "a"]
    assert [r.id for r in await store.jobs_in_states((1,))] == ["a", "b", "d"]
    changed = await store.get_job("c")
    assert changed is not None and (changed.state, changed.error) == (3, "it broke") and changed.updated_at >= changed.created_at
    assert await store.get_job("nope") is None
    await store.close()


async def test_a_job_is_leased_to_one_owner_until_its_lease_expires_or_is_released(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    for name in ("a", "b", "c", "done"):
        await store.create_job(name, b"", "h", 1)
    await store.set_state("done", 3)
    first = await store.claim_jobs("one", (1, 2), 60, limit=2)
    assert [row.id for row in first] == ["a", "b"]
    # Another owner gets what is left, and a finished job is nobody's; a held job is not claimed again, even by its holder.
    assert [row.id for row in await store.claim_jobs("two", (1, 2), 60, limit=10)] == ["c"]
    assert await store.claim_jobs("three", (1, 2), 60, limit=10) == []
    assert await store.claim_jobs("one", (1, 2), 60, limit=10, job_id="a") == []
    await store.set_state("b", 4)  # e.g. cancelled through another replica: the holder learns it when renewing
    assert await store.renew_leases("one", ["a", "b", "c"], 60) == {"a": 1, "b": 4}
    assert await store.renew_leases("two", [], 60) == {}
    await store.release_lease("a", "two")  # not its lease: nothing happens
    assert await store.claim_jobs("three", (1, 2), 60, limit=10, job_id="a") == []
    await store.release_lease("a", "one")
    assert [row.id for row in await store.claim_jobs("three", (1, 2), 60, limit=10)] == ["a"]
    # A lease nobody renews expires, and the job goes to whoever claims next.
    assert [row.id for row in await store.claim_jobs("four", (1, 2), 0.05, limit=10, job_id="c")] == []
    await store.renew_leases("two", ["c"], 0.05)
    await asyncio.sleep(0.2)
    assert [row.id for row in await store.claim_jobs("four", (1, 2), 60, limit=10)] == ["c"]
    assert await store.renew_leases("two", ["c"], 60) == {}, "an expired lease taken over is no longer the old owner's"
    await store.close()


async def test_a_result_is_written_once_and_put_result_says_whether_it_wrote(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    assert not await store.has_results("job")
    assert await store.put_result("job", "i1", "generate", {"answer": 1}, None) is True
    assert await store.put_result("job", "i1", "generate", {"answer": 2}, True) is False
    assert await store.get_result("job", "i1", "generate") == {"answer": 1}
    assert await store.get_result("job", "i1", "other") is None and await store.get_result("other", "i1", "generate") is None
    assert await store.has_results("job") and not await store.has_results("other")
    assert await store.stage_counts("job") == []  # a result that decides nothing is not counted
    await store.close()


async def test_job_values_are_written_once_until_deleted(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    await store.put_value("job", "summary", {"kept": 3})
    await store.put_value("job", "summary", {"kept": 4})
    assert await store.get_value("job", "summary") == {"kept": 3}
    assert await store.get_value("job", "plan") is None and await store.get_value("other", "summary") is None
    await store.delete_value("job", "summary")
    assert await store.get_value("job", "summary") is None
    await store.put_value("job", "summary", {"kept": 5})
    assert await store.get_value("job", "summary") == {"kept": 5}
    assert not await store.has_results("job"), "a job value is not a result"
    await store.close()


async def test_many_job_values_are_read_at_once(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    for number in range(1200):  # more than one query's worth of keys
        await store.put_value("job", f"review/i{number:04d}", {"n": number})
    await store.put_value("other", "review/i0001", {"n": -1})
    wanted = [f"review/i{number:04d}" for number in (1, 1, 700, 1199, 1200)]
    assert await store.get_values("job", wanted) == {"review/i0001": {"n": 1}, "review/i0700": {"n": 700}, "review/i1199": {"n": 1199}}
    assert await store.get_values("job", []) == {} and await store.get_values("nobody", wanted) == {}
    await store.close()


async def test_stage_counts_match_the_results_after_writes_and_deletes(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    rows: list[tuple[str, str, int | None, str]] = []
    for i in range(60):
        for stage, kept, filter_ in (
            ("raw", None, ""),
            ("heuristics", i % 3 != 0, "" if i % 3 else "length"),
            ("diversity", i % 4 != 0, "" if i % 4 else ("error" if i % 8 else "similarity")),
        ):
            if i % 3 == 0 and stage == "diversity":
                continue  # dropped at heuristics: never reaches diversity
            value = decided(bool(kept), filter_) if kept is not None else {"text": i}
            await store.put_result("job", f"c{i:03d}", stage, value, kept, filter_)
            rows.append((f"c{i:03d}", stage, None if kept is None else int(kept), filter_))
    await store.put_result("other", "c000", "heuristics", decided(False, "length"), False, "length")
    assert await counts_of(store, "job") == recount(rows)

    # A retry forgets the error drops; the counters follow in the same write.
    await store.delete_results("job", filter_="error")
    rows = [row for row in rows if row[3] != "error"]
    assert await counts_of(store, "job") == recount(rows)
    assert "error" not in (await counts_of(store, "job"))["diversity"].dropped_by_filter
    await store.delete_results("job", item_id="c001")
    await store.delete_results("job", stage="heuristics")
    rows = [row for row in rows if row[0] != "c001" and row[1] != "heuristics"]
    assert await counts_of(store, "job") == recount(rows) and "heuristics" not in await counts_of(store, "job")
    assert await counts_of(store, "other") == {"heuristics": StageCounts("heuristics", 1, 0, {"length": 1})}
    with pytest.raises(AssertionError):
        await store.delete_results("job")  # every result of a job at once: refused
    await store.close()


async def counts_of(store: JobStore, job_id: str) -> dict[str, StageCounts]:
    return {c.stage: c for c in await store.stage_counts(job_id)}


async def test_cursors_grow_in_write_order_and_results_since_pages_through_them(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    written = [(f"i{n % 7}", f"s{n}") for n in range(40)]
    for item, stage in written:
        await store.put_result("job", item, stage, {"n": stage}, None)
        await store.put_result("other", item, stage, {"n": stage}, None)
    seen: list[tuple[int, str, str, dict[str, Any]]] = []
    after = 0
    while page := await store.results_since("job", after, 6):
        assert len(page) <= 6
        seen += page
        after = page[-1][0]
    assert [(item, stage) for _, item, stage, _ in seen] == written
    cursors = [cursor for cursor, *_ in seen]
    assert cursors == sorted(set(cursors))
    assert all(value == {"n": stage} for _, _, stage, value in seen)

    # A follower that read everything sees only what is new, even after a delete of the newest.
    await store.delete_results("job", item_id=written[-1][0], stage=written[-1][1])
    await store.put_result("job", "late", "s0", {"n": "late"}, None)
    assert [(item, stage) for _, item, stage, _ in await store.results_since("job", after, 100)] == [("late", "s0")]
    await store.close()


async def test_iter_results_orders_by_item_then_write_order(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    # 3 stages an item, written in an order that is not the stages' alphabetical one, items out of order:
    # 12,000 rows, past any sensible page size.
    items = [f"item-{(n * 7919) % 4000:05d}" for n in range(4000)]
    await asyncio.gather(*(store.put_result("job", item, "b_first", {"i": item}, None) for item in items))
    await asyncio.gather(*(store.put_result("job", item, "c_second", {"i": item}, True) for item in items))
    await asyncio.gather(*(store.put_result("job", item, "a_third", {"i": item}, False, "x") for item in items))
    await store.put_result("other", "item-00000", "b_first", {"i": "other"}, None)
    read = [(item, stage) async for item, stage, _ in store.iter_results("job")]
    assert read == [(item, stage) for item in sorted(items) for stage in ("b_first", "c_second", "a_third")]
    assert await store.results("job") == [(item, stage, {"i": item}) for item, stage in read]
    assert [row async for row in store.iter_results("nothing")] == []
    await store.close()


async def test_get_results_reads_many_ids_at_once(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    await asyncio.gather(*(store.put_result("job", f"i{n}", "s", {"n": n}, None) for n in range(0, 3000, 2)))
    found = await store.get_results("job", [f"i{n}" for n in range(3000)] + ["i0"], "s")
    assert found == {f"i{n}": {"n": n} for n in range(0, 3000, 2)}
    assert await store.get_results("job", [], "s") == {} and await store.get_results("job", ["i0"], "other") == {}
    await store.close()


async def test_concurrent_writers_each_get_their_answer(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    wrote = await asyncio.gather(*(store.put_result("job", f"i{n:04d}", "s", decided(n % 2 == 0), n % 2 == 0) for n in range(1000)))
    assert wrote == [True] * 1000
    # The same 100 keys raced from 5 tasks each: exactly one write of each key wins.
    raced = await asyncio.gather(*(store.put_result("job", f"r{n:03d}", "s", {"by": t}, None) for t in range(5) for n in range(100)))
    assert sum(raced) == 100
    assert await counts_of(store, "job") == {"s": StageCounts("s", 1000, 500, {"": 500})}
    assert len(await store.get_results("job", [f"i{n:04d}" for n in range(1000)], "s")) == 1000
    await store.close()


async def test_a_write_that_fails_fails_only_its_caller(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    not_json = {"value": object()}
    answers = await asyncio.gather(
        *(store.put_result("job", f"i{n}", "s", not_json if n == 5 else {"n": n}, True) for n in range(20)), return_exceptions=True
    )
    assert isinstance(answers[5], TypeError)
    assert [a for n, a in enumerate(answers) if n != 5] == [True] * 19
    assert await store.get_result("job", "i5", "s") is None and await store.get_result("job", "i6", "s") == {"n": 6}
    assert await counts_of(store, "job") == {"s": StageCounts("s", 19, 19, {})}
    await store.close()


async def test_what_was_written_survives_close_and_reopen(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    await store.create_job("job", b"spec", "h", 1)
    await asyncio.gather(*(store.put_result("job", f"i{n}", "s", decided(True), True) for n in range(50)))
    await store.put_value("job", "plan", {"dataset_items": 50})
    await store.close()
    await store.close()  # twice is harmless
    reopened = open_store(tmp_path)
    assert (await reopened.get_job("job")) is not None
    assert len(await reopened.results("job")) == 50 and await reopened.get_value("job", "plan") == {"dataset_items": 50}
    assert await counts_of(reopened, "job") == {"s": StageCounts("s", 50, 50, {})}
    await reopened.close()


def test_one_store_serves_event_loops_one_after_another(tmp_path: Path, open_store: OpenStore) -> None:
    store = open_store(tmp_path)
    assert asyncio.run(store.put_result("job", "i1", "s", {"loop": 1}, None))
    assert asyncio.run(store.get_result("job", "i1", "s")) == {"loop": 1}
    assert asyncio.run(store.put_result("job", "i2", "s", {"loop": 3}, None))
    assert [item for item, _, _ in asyncio.run(store.results("job"))] == ["i1", "i2"]
    asyncio.run(store.close())


# --- the SQLite store's own promises ---

# Schema 0, as the first coordinator created it (git show ba58c3f:services/autodidact/coordinator/store.py).
SCHEMA_0 = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, spec BLOB NOT NULL, spec_hash TEXT NOT NULL,
    state INTEGER NOT NULL, error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE results (
    job_id TEXT NOT NULL, item_id TEXT NOT NULL, stage TEXT NOT NULL, kept INTEGER, filter TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL, written_at REAL NOT NULL, PRIMARY KEY (job_id, item_id, stage)
);
"""


@pytest.mark.parametrize("with_job_values", [False, True], ids=["values-as-fake-items", "job-values-table"])
def test_a_store_of_the_first_schema_is_upgraded_in_place(tmp_path: Path, with_job_values: bool) -> None:
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(SCHEMA_0)
    old.execute("INSERT INTO jobs (id, spec, spec_hash, state, created_at, updated_at) VALUES ('job', x'0a00', 'h', 2, 1.0, 2.0)")
    rows = [  # in write order; kept=0 rows under filters, a raw result, and job values under fake items
        ("job", "_seeds", "seed_pool", None, "", {"data": {"seed_instructions": 3}, "decision": None}),
        ("job", "c002", "heuristics", 1, "", decided(True)),
        ("job", "c001", "heuristics", 0, "length", decided(False, "length")),
        ("job", "c002", "raw", None, "", {"data": {"text": "t"}, "decision": None}),
        ("job", "_job", "plan", None, "", {"data": {"dataset_items": 2}, "decision": None}),
        ("job", "c002", "diversity", 0, "error", decided(False, "error")),
        ("job", "_closed", "closed", None, "", {"data": {"last_round": 4}, "decision": None}),
        ("job", "_job", "summary", None, "", {"data": {"kept": 0}, "decision": None}),
    ]
    old.executemany(
        "INSERT INTO results (job_id, item_id, stage, kept, filter, value, written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(*row[:5], json.dumps(row[5], sort_keys=True), 10.0 + n) for n, row in enumerate(rows)],
    )
    if with_job_values:  # the second schema 0: job_values existed, a value may be in both places (the table wins)
        old.execute(
            "CREATE TABLE job_values (job_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
            "written_at REAL NOT NULL, PRIMARY KEY (job_id, key))"
        )
        old.execute("""INSERT INTO job_values VALUES ('job', 'summary', '{"kept": 7}', 20.0)""")
    old.commit()
    old.close()

    store = SqliteJobStore(path)  # a store from before tenants: its jobs are the default tenant's
    job = asyncio.run(store.get_job("default/job"))
    assert job is not None and job.spec == b"\n\x00" and job.state == 2
    assert [(item, stage) for _, item, stage, _ in asyncio.run(store.results_since("default/job", 0, 100))] == [
        ("c002", "heuristics"),
        ("c001", "heuristics"),
        ("c002", "raw"),
        ("c002", "diversity"),
    ]
    assert asyncio.run(store.get_value("default/job", "seed_pool")) == {"seed_instructions": 3}
    assert asyncio.run(store.get_value("default/job", "plan")) == {"dataset_items": 2}
    assert asyncio.run(store.get_value("default/job", "closed")) == {"last_round": 4}
    assert asyncio.run(store.get_value("default/job", "summary")) == ({"kept": 7} if with_job_values else {"kept": 0})
    counts = {c.stage: c for c in asyncio.run(store.stage_counts("default/job"))}
    assert counts == {
        "heuristics": StageCounts("heuristics", 2, 1, {"length": 1}),
        "diversity": StageCounts("diversity", 1, 0, {"error": 1}),
    }
    asyncio.run(store.delete_results("default/job", filter_="error"))
    assert "diversity" not in {c.stage for c in asyncio.run(store.stage_counts("default/job"))}
    assert asyncio.run(store.put_result("default/job", "c003", "heuristics", decided(True), True))
    asyncio.run(store.close())

    reopened = SqliteJobStore(path)  # upgraded once: a second open changes nothing
    assert len(asyncio.run(reopened.results("default/job"))) == 4
    asyncio.run(reopened.close())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'results_schema_%'").fetchone()[0] == 0


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    asyncio.run(SqliteJobStore(path).close())
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION + 1}")
    with pytest.raises(StartupError, match="newer than this coordinator"):
        SqliteJobStore(path)


async def test_iter_results_never_splits_an_item_across_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "PAGE_ROWS", 4)
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    layout = {"a": 1, "b": 3, "c": 6, "d": 4, "e": 2}  # c alone is more than a page
    for stage_number in range(6):
        for item, stages in layout.items():
            if stage_number < stages:
                await store.put_result("job", item, f"s{5 - stage_number}", {}, None)
    read = [(item, stage) async for item, stage, _ in store.iter_results("job")]
    assert read == [(item, f"s{5 - n}") for item, stages in layout.items() for n in range(stages)]
    await store.close()


async def test_writes_queued_together_share_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    await store.put_result("job", "first", "s", {}, None)
    transactions: list[int] = []
    one_transaction = sqlite_store._transaction

    def counted(db: sqlite3.Connection, operations: list[Any]) -> list[Any]:
        transactions.append(len(operations))
        return one_transaction(db, operations)

    monkeypatch.setattr(sqlite_store, "_transaction", counted)
    writes = asyncio.gather(*(store.put_result("job", f"i{n:05d}", "s", {"n": n}, None) for n in range(5000)))
    assert await writes == [True] * 5000
    assert sum(transactions) == 5000 and len(transactions) < 500, f"{len(transactions)} commits for 5,000 writes queued together"
    await store.close()


async def test_reads_and_the_event_loop_go_on_while_the_writer_is_busy(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    await store.create_job("job", b"", "h", 1)
    release = threading.Event()
    busy = asyncio.ensure_future(store._write(lambda db: release.wait(10)))  # a commit that takes as long as we like
    queued = asyncio.ensure_future(store.put_result("job", "i1", "s", {}, None))
    started = time.perf_counter()
    job = await asyncio.wait_for(store.get_job("job"), 5)
    assert job is not None and time.perf_counter() - started < 1.0 and not queued.done()
    release.set()
    assert await busy is True and await queued is True
    assert await store.get_result("job", "i1", "s") == {}  # read after the write returned: the new commit is seen
    await store.close()


def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    asyncio.run(store.close())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(store.get_job("job"))


def test_a_store_from_before_tenants_moves_its_jobs_to_the_default_tenant(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = SqliteJobStore(path)

    async def fill() -> None:
        await store.create_job("old-job", b"spec", "hash", 2)
        await store.put_result("old-job", "c001", "heuristics", decided(False, "length"), False, "length")
        await store.put_value("old-job", "summary", {"kept": 1})

    asyncio.run(fill())
    asyncio.run(store.close())
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 1")  # as a coordinator from before tenants left it

    upgraded = SqliteJobStore(path)
    try:
        assert asyncio.run(upgraded.get_job("old-job")) is None
        job = asyncio.run(upgraded.get_job("default/old-job"))
        assert job is not None and job.spec == b"spec" and job.state == 2
        assert [(item, stage) for item, stage, _ in asyncio.run(upgraded.results("default/old-job"))] == [("c001", "heuristics")]
        assert asyncio.run(upgraded.get_value("default/old-job", "summary")) == {"kept": 1}
        assert asyncio.run(counts_of(upgraded, "default/old-job")) == {"heuristics": StageCounts("heuristics", 1, 0, {"length": 1})}
        assert [row.id for row in asyncio.run(upgraded.list_jobs(10, key_prefix="default/"))] == ["default/old-job"]
        assert asyncio.run(upgraded.list_jobs(10, key_prefix="team-a/")) == []
    finally:
        asyncio.run(upgraded.close())


def test_job_folders_from_before_tenants_move_to_the_default_tenant(tmp_path):
    from autodidact.coordinator.storage import TenantStorage

    legacy = tmp_path / "jobs"
    (legacy / "old-job" / "dataset").mkdir(parents=True)
    (legacy / "old-job" / "dataset" / "manifest.json").write_text("{}")
    storage = TenantStorage(tmp_path)
    storage.prepare(legacy)
    assert (storage.dataset_dir("default", "old-job") / "manifest.json").read_text() == "{}" and not legacy.exists()
    (legacy / "old-job").mkdir(parents=True)  # the same job in both places: neither is overwritten
    with pytest.raises(StartupError, match="keep one of them"):
        storage.prepare(legacy)


# --- the PostgreSQL store's own promises ---


async def test_replicas_on_one_database_share_jobs_and_see_results_in_cursor_order(postgres: Any) -> None:
    dsn = postgres.new_database()
    one, two = PostgresJobStore(dsn), PostgresJobStore(dsn)  # two coordinators' stores, set up on one database at once
    raced = await asyncio.gather(*(store.create_job("t/job", b"spec", "h", 1) for store in (one, two) for _ in range(5)))
    assert sum(created for _, created in raced) == 1 and len({row.seq for row, _ in raced}) == 1
    writes = asyncio.gather(*(one.put_result("t/job", f"i{n:04d}", "s", decided(True), True) for n in range(2000)))
    seen: list[int] = []
    while not writes.done() or (await two.results_since("t/job", seen[-1] if seen else 0, 1)):
        page = await two.results_since("t/job", seen[-1] if seen else 0, 500)
        seen += [cursor for cursor, *_ in page]
        await asyncio.sleep(0)
    await writes
    # A follower on the other replica, paging by cursor while the writes commit, misses none and sees none twice.
    assert len(seen) == 2000 and seen == sorted(set(seen))
    assert await counts_of(two, "t/job") == {"s": StageCounts("s", 2000, 2000, {})}
    await one.close()
    await two.close()


def test_a_postgres_store_of_a_newer_schema_is_refused(postgres: Any) -> None:
    import psycopg

    dsn = postgres.new_database()
    asyncio.run(PostgresJobStore(dsn).close())
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("UPDATE autodidact_schema SET version = version + 1")
    with pytest.raises(StartupError, match="newer than this coordinator"):
        PostgresJobStore(dsn)


def test_an_unreachable_database_is_a_startup_error_that_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from autodidact.coordinator import postgres_store
    from tests.conftest import free_port

    monkeypatch.setattr(postgres_store, "CONNECT_TIMEOUT_SECONDS", 2.0)
    with pytest.raises(StartupError, match="cannot connect to the job store database") as refused:
        PostgresJobStore(f"postgresql://coordinator:s3cret@127.0.0.1:{free_port()}/jobs")
    assert "s3cret" not in str(refused.value) and "127.0.0.1" in str(refused.value)


def test_leftovers_of_a_crash_are_removed_at_start_but_not_another_replicas_work_in_progress(tmp_path):
    import os

    from autodidact.coordinator.storage import LEFTOVER_SECONDS, UPLOAD_PREFIX, TenantStorage

    storage = TenantStorage(tmp_path)
    datasets, staging = storage.tenant_dir("team-a") / "datasets", storage.tenant_dir("team-a") / "staging"
    datasets.mkdir(parents=True)
    (staging / "old" / "inputs").mkdir(parents=True)
    (staging / "young").mkdir()
    for path in (datasets / f"{UPLOAD_PREFIX}old", datasets / f"{UPLOAD_PREFIX}young"):
        path.write_bytes(b"part of an upload")
    long_ago = os.stat(datasets).st_mtime - LEFTOVER_SECONDS - 60
    for path in (datasets / f"{UPLOAD_PREFIX}old", staging / "old"):
        os.utime(path, (long_ago, long_ago))
    storage.prepare(tmp_path / "jobs")
    assert sorted(p.name for p in datasets.iterdir()) == [f"{UPLOAD_PREFIX}young"]
    assert sorted(p.name for p in staging.iterdir()) == ["young"]
