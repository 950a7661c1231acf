"""Hostile or careless input gets a typed, short error naming the field: ids,
page tokens, input files, damaged stores, recipe paths, differing specs.

No doubles: the real validation helpers, the real job store (SQLite in a
temporary folder), the real recipe loader."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from autodidact.coordinator.jobs import JobManager, check_job_id
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.recipes.formats import json_lines, read_input
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import SqliteJobStore
from autodidact.coordinator.tenants import Tenants
from autodidact.dedup.service import check_namespace
from autodidact.errors import AlreadyExists, InvalidArgument, StartupError
from autodidact.runner import load_recipe
from autodidact.v1 import coordinator_pb2
from autodidact.validation import check_one_of, quoted


@pytest.mark.parametrize("bad", [".", "..", "a..b", "../up", "job\n", "_hidden", ".hidden", "x" * 129, ""])
@pytest.mark.parametrize("check", [check_job_id, check_namespace])
def test_ids_that_would_name_parent_folders_are_refused(check, bad):
    with pytest.raises(InvalidArgument) as refused:
        check("job_id", bad)
    assert "starting with a letter or digit, without '..'" in str(refused.value)


@pytest.mark.parametrize("good", ["job-1", "self_instruct-3f2a9c0d1e", "v1.2.final", "A", "x" * 128])
def test_ordinary_ids_pass(good):
    check_job_id("job_id", good)
    check_namespace("namespace", good)


def test_quoted_client_input_is_shortened():
    huge = "x" * 78_000
    assert len(quoted(huge)) < 120 and "78,000 characters" in quoted(huge)
    assert quoted("short") == "'short'"
    with pytest.raises(InvalidArgument) as refused:
        check_one_of("role", huge, ("user", "assistant"))
    assert len(str(refused.value)) < 200


@pytest.fixture
def manager(tmp_path):
    class Unreachable:  # a double of the generator: submissions go through without its limits
        async def GetModelInfo(self, request: object, timeout: float) -> object:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "unreachable")

    store = SqliteJobStore(tmp_path / "data" / "jobs.sqlite")
    # The tests' own files are server paths under an input root they allow (the coordinator's data dir never is one).
    tenants = Tenants(shared_roots=(str(tmp_path),))
    yield JobManager(store, Services(Unreachable(), None, None, None, None), TenantStorage(tmp_path / "data"), tenants)  # type: ignore[arg-type]
    asyncio.run(store.close())


@pytest.mark.parametrize("token", ["9" * 40, "²", "-1", "1e5", " 7", "7\n", "x"])
def test_list_jobs_refuses_page_tokens_it_did_not_write(manager, token):
    with pytest.raises(InvalidArgument, match="page_token: is not a token from a previous ListJobs response"):
        asyncio.run(manager.list_jobs(10, token))


def test_list_jobs_accepts_its_own_tokens(manager):
    assert asyncio.run(manager.list_jobs(10, "123")) == ([], "")


def seed_file(path: Path) -> Path:
    lines = [
        json.dumps({"instruction": f"Task {i}: say a word.", "instances": [{"input": "", "output": "word"}], "is_classification": False})
        for i in range(8)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_already_exists_names_the_fields_that_differ(manager, tmp_path):
    spec = coordinator_pb2.JobSpec(
        self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path=str(seed_file(tmp_path / "seeds.jsonl")), target_instructions=2),
        seed=3,
    )
    await manager.submit("job-1", spec)
    other = coordinator_pb2.JobSpec()
    other.CopyFrom(spec)
    other.self_instruct.target_instructions = 5
    other.seed = 4
    try:
        with pytest.raises(AlreadyExists) as refused:
            await manager.submit("job-1", other)
        assert "fields that differ: seed, self_instruct.target_instructions" in str(refused.value)
    finally:
        await manager.cancel("job-1")
        await manager.close()
        await asyncio.sleep(0)


def test_binary_input_files_are_refused_naming_the_line(tmp_path):
    binary = tmp_path / "seeds.jsonl"
    binary.write_bytes(b'{"a": 1}\n{"b": 2}\n\x00\x01\x02binary')
    with pytest.raises(InvalidArgument, match=r"spec.x: is not a text file: line 3 holds a NUL byte"):
        list(read_input(binary, "spec.x"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"a": "ok"}\n{"a": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(InvalidArgument, match=r"spec.x: is not UTF-8 text: line 2 holds the byte 0xe9"):
        list(read_input(latin, "spec.x"))


def test_json_lines_refuses_numbers_and_nesting_python_cannot_parse():
    with pytest.raises(InvalidArgument, match="line 2 is not JSON"):
        json_lines(enumerate(['{"a": 1}', "1" * 5000], 1), "spec.x")
    with pytest.raises(InvalidArgument, match="line 1 is not JSON"):
        json_lines([(1, "[" * 100_000)], "spec.x")


@pytest.mark.parametrize("damage", [b"this is not a database at all" * 100, None])
def test_a_damaged_job_store_refuses_to_open_naming_the_file(tmp_path, damage):
    path = tmp_path / "jobs.sqlite"
    if damage is None:  # a real store whose pages are then overwritten
        store = SqliteJobStore(path)
        for i in range(200):
            asyncio.run(store.create_job(f"job-{i}", b"x" * 500, "h", 1))
        asyncio.run(store.close())
        data = bytearray(path.read_bytes())
        data[4096 : 3 * 4096] = b"\xa5" * (2 * 4096)  # pages 2 and 3: the jobs table's b-tree and its index
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(damage)
    with pytest.raises(StartupError) as refused:
        SqliteJobStore(path)
    message = str(refused.value)
    assert str(path) in message and "damaged" in message and "\n" not in message


def test_a_healthy_job_store_opens(tmp_path):
    asyncio.run(SqliteJobStore(tmp_path / "jobs.sqlite").close())
    asyncio.run(SqliteJobStore(tmp_path / "jobs.sqlite").close())


def test_camel_case_path_keys_resolve_relative_to_the_recipe(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text("self_instruct:\n  seedTasksPath: data/seeds.jsonl\n  targetInstructions: 2\n", encoding="utf-8")
    spec = load_recipe(recipe)
    assert spec.self_instruct.seed_tasks_path == str((folder / "data" / "seeds.jsonl").resolve())


async def test_reading_a_large_input_at_submit_leaves_the_event_loop_free(manager, monkeypatch, tmp_path):
    import time

    from autodidact.coordinator.recipes import registry

    def slow_resolve(spec, job_id):  # stands in for parsing a large input file: 0.5 s of blocking work
        time.sleep(0.5)
        raise InvalidArgument("spec.self_instruct.seed_tasks_path", "stand-in refusal after the parse")

    monkeypatch.setattr(registry.RECIPES["self_instruct"], "resolve", slow_resolve)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    with pytest.raises(InvalidArgument, match="stand-in refusal"):
        seeds = coordinator_pb2.SelfInstructSpec(seed_tasks_path="inline:seeds")
        await manager.submit("big-1", coordinator_pb2.JobSpec(self_instruct=seeds, inline_inputs={"seeds": "{}"}))
    ticker.cancel()
    assert ticks >= 20  # the loop kept running during the parse (before: 0)
