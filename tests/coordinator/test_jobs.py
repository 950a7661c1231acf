"""The job manager's error budget, retry, partial export and submit-time model
checks, on the real job store with a deterministic double recipe and a double
generator stub (labelled: no model runs here). The recipe is plain code over
JobContext like the real ones: each item calls a "service" once at stage
`work`, then is decided at `dataset`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pyarrow as pa
import pytest

from autodidact.coordinator import jobs
from autodidact.coordinator.jobs import JobManager
from autodidact.coordinator.postgres_store import PostgresJobStore
from autodidact.coordinator.recipes import registry
from autodidact.coordinator.recipes.base import Decision, JobContext, Services, StageResult
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.records import Record
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import SqliteJobStore
from autodidact.errors import FailedPrecondition, InvalidArgument
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2
from tests.lineage import assert_lineage_agrees, lineage_problems

# A tuple of fields, not a list: mypy joins a list's mixed (name, type) pairs to tuple[str, object], which pa.schema refuses.
SCHEMA = pa.schema((("item_id", pa.string()), ("value", pa.int64())))


@dataclass
class DoubleService:
    """Refuses the items in `refuse` with INVALID_ARGUMENT; `gate` holds every call until set."""

    refuse: set[int] = field(default_factory=set)
    calls: list[int] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def work(self, index: int) -> int:
        self.calls.append(index)
        if self.gate is not None:
            await self.gate.wait()
        if index in self.refuse:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), f"item {index} is malformed"
            )
        return index * 10


class DoubleGenerator:
    async def GetModelInfo(self, request: Any, timeout: float) -> generator_pb2.GetModelInfoResponse:
        return generator_pb2.GetModelInfoResponse(model=common_pb2.ModelInfo(backend="double", model="double", context_length=2048))


@dataclass(frozen=True)
class Params:
    items: int
    sampling: common_pb2.SamplingParams


class DoubleRecipe(Recipe[Params]):
    """A DOUBLE recipe (answers to spec.self_consistency): item i calls the double service at `work`, then is kept."""

    name = "self_consistency"
    stages = ("work", "dataset")
    services = ()
    tables: ClassVar[dict[str, pa.Schema]] = {"values": SCHEMA}

    def __init__(self, service: DoubleService) -> None:
        self.service = service

    def resolve(self, spec: Any, job_id: str) -> Params:
        return Params(spec.max_questions or 10, spec.sampling)

    def item_count(self, params: Params) -> int:
        return params.items

    async def run(self, ctx: JobContext, params: Params) -> dict[str, Any]:
        async def item(index: int) -> bool:
            async def compute() -> StageResult:
                value = await ctx.call(lambda: self.service.work(index), "double service")
                return StageResult({"value": value}, Decision(True))

            done = await ctx.stage(f"i{index:02d}", "work", compute)
            if await ctx.stored(f"i{index:02d}", "dataset") is None:
                await ctx.record(f"i{index:02d}", "dataset", StageResult(done.data, Decision(True)))
            return True

        kept = await ctx.each_item(params.items, item)
        return {"kept": sum(kept)}

    def belongs(self, summary: dict[str, Any]) -> Any:
        return lambda item_id: True

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return {"values": [{"item_id": r.item_id, "value": r.data["value"]} for r in records if r.kept]}


def dataset(data_dir: Path, job_id: str) -> Path:
    """Where the job manager exports a job of the default tenant (no authentication here)."""
    return TenantStorage(data_dir).dataset_dir("default", job_id)


def double_recipe(service: DoubleService) -> DoubleRecipe:
    return DoubleRecipe(service)


@pytest.fixture
def manager(tmp_path, monkeypatch):
    service = DoubleService()
    monkeypatch.setitem(registry.RECIPES, "self_consistency", double_recipe(service))
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    services = Services(DoubleGenerator(), None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]
    yield JobManager(store, services, TenantStorage(tmp_path)), service
    asyncio.run(store.close())


def spec(items: int = 10, fraction: float | None = None, max_tokens: int = 64) -> coordinator_pb2.JobSpec:
    value = coordinator_pb2.JobSpec(
        self_consistency=coordinator_pb2.SelfConsistencySpec(max_questions=items, sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    )
    if fraction is not None:
        value.max_error_fraction = fraction
    return value


async def finish(manager: JobManager, job_id: str) -> coordinator_pb2.Job:
    events = [job async for job in manager.watch(job_id)]
    return events[-1]


async def test_one_refused_item_is_dropped_and_reported_and_the_lineage_contract_holds(manager, tmp_path):
    manager, service = manager
    service.refuse = {4}
    await manager.submit("one-bad", spec())
    job = await finish(manager, "one-bad")
    assert job.state == jobs.SUCCEEDED, job.error
    manifest = json.loads((dataset(tmp_path, "one-bad") / "manifest.json").read_text())
    assert manifest["errors"] == {
        "count": 1,
        "items": 10,
        "fraction": 0.1,
        "max_error_fraction": 0.1,
        "messages": ["i04 at work: double service: INVALID_ARGUMENT: item 4 is malformed"],
    }
    lineage = {r["item_id"]: r for r in map(json.loads, (dataset(tmp_path, "one-bad") / "lineage.jsonl").read_text().splitlines())}
    assert lineage["i04"]["kept"] is False and lineage["i04"]["lineage"][-1]["filter"] == "error"
    assert_lineage_agrees(job, dataset(tmp_path, "one-bad"))

    import datasets  # the export folder reads as a dataset, by table name

    loaded = datasets.load_dataset(str(dataset(tmp_path, "one-bad")), name="values", split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["value"]) == [i * 10 for i in range(10) if i != 4]


async def test_too_many_errors_fail_the_job_and_retry_resumes_it_redoing_only_the_errored_items(manager, tmp_path):
    manager, service = manager
    service.refuse = {1, 2}
    await manager.submit("two-bad", spec())
    job = await finish(manager, "two-bad")
    assert job.state == jobs.FAILED and "more than max_error_fraction 0.1" in job.error
    with pytest.raises(FailedPrecondition, match="RetryJob"):
        await manager.export("two-bad")

    answered = set(service.calls) - {1, 2}  # stored: a retry replays these
    service.refuse, service.calls = set(), []  # the service is fixed
    retried = await manager.retry("two-bad")
    assert retried.state == jobs.PENDING and not retried.error
    job = await finish(manager, "two-bad")
    assert job.state == jobs.SUCCEEDED, job.error
    assert {1, 2} <= set(service.calls), "the errored items were not tried again"
    assert answered and not answered & set(service.calls), "items answered before the failure were asked again"
    assert_lineage_agrees(job, dataset(tmp_path, "two-bad"))
    with pytest.raises(FailedPrecondition, match="only a FAILED or CANCELLED job"):
        await manager.retry("two-bad")


async def test_a_raised_budget_lets_the_same_errors_through(manager, tmp_path):
    manager, service = manager
    service.refuse = {1, 2}
    await manager.submit("lenient", spec(fraction=0.2))
    assert (await finish(manager, "lenient")).state == jobs.SUCCEEDED


async def test_resubmitting_a_failed_job_resumes_it(manager, tmp_path):
    manager, service = manager
    service.refuse = set(range(10))
    await manager.submit("again", spec())
    assert (await finish(manager, "again")).state == jobs.FAILED
    service.refuse = set()
    _, created, resumed = await manager.submit("again", spec())
    assert resumed and not created
    assert (await finish(manager, "again")).state == jobs.SUCCEEDED
    _, created, resumed = await manager.submit("again", spec())
    assert not created and not resumed


async def test_a_cancelled_job_exports_what_it_finished_marked_partial(manager, tmp_path):
    manager, service = manager
    service.gate = asyncio.Event()
    await manager.submit("stopped", spec())
    while len(service.calls) < 2:
        await asyncio.sleep(0.01)
    await manager.cancel("stopped")
    files = {f.kind: f for f in await manager.export("stopped")}
    folder = dataset(tmp_path, "stopped")
    manifest = json.loads((folder / files["manifest"].name).read_text())
    assert manifest["partial"] is True and manifest["state"] == "CANCELLED"
    assert "cancelled" in (folder / files["dataset_card"].name).read_text()


async def test_limits_of_the_generators_model_are_refused_at_submit_naming_the_field(manager, tmp_path):
    manager, _ = manager
    with pytest.raises(
        InvalidArgument,
        match=r"spec.self_consistency.sampling.max_tokens: must be at most the generator's context length, 2,048 tokens, got 2,049",
    ):
        await manager.submit("too-many-tokens", spec(max_tokens=2049))
    with pytest.raises(InvalidArgument, match=r"spec.max_error_fraction: must be between 0 and 1"):
        await manager.submit("bad-fraction", spec(fraction=1.5))


async def test_the_lineage_checker_finds_a_missing_row_and_a_second_drop(manager, tmp_path):
    manager, _ = manager
    await manager.submit("checked", spec(items=3))
    job = await finish(manager, "checked")
    path = dataset(tmp_path, "checked") / "lineage.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["lineage"] = [{"stage": "work", "kept": False, "filter": "a"}, {"stage": "dataset", "kept": False, "filter": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    problems = "\n".join(lineage_problems(job, dataset(tmp_path, "checked")))
    assert "rule 2: i00 was dropped 2 times" in problems
    assert "rule 3: stage work: done 3, lineage rows with a decision there 2" in problems


async def test_a_generator_that_does_not_answer_is_asked_again_only_after_a_while(tmp_path, monkeypatch):
    class SilentGenerator:
        calls = 0

        async def GetModelInfo(self, request: Any, timeout: float) -> Any:
            SilentGenerator.calls += 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection refused")

    monkeypatch.setitem(registry.RECIPES, "self_consistency", double_recipe(DoubleService()))
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    manager = JobManager(store, Services(SilentGenerator(), None, None, None, None, patience_seconds=1), TenantStorage(tmp_path))  # type: ignore[arg-type]
    for number in range(3):  # accepted: the limits are then met per item at run time
        _, created, _ = await manager.submit(f"blind-{number}", spec(items=1))
        assert created
    assert SilentGenerator.calls == 1
    await manager.close()
    await store.close()


async def test_watch_reads_the_stage_counters_once_per_wake_up_not_once_per_result(manager, tmp_path, monkeypatch):
    manager, _ = manager
    reads = 0
    counters = manager._store.stage_counts

    async def counted(job_id: str) -> Any:
        nonlocal reads
        reads += 1
        return await counters(job_id)

    monkeypatch.setattr(manager._store, "stage_counts", counted)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await manager.submit("many", spec(items=300))
    events = [job async for job in manager.watch("many")]
    elapsed = loop.time() - started
    assert events[-1].state == jobs.SUCCEEDED and {s.stage: s.done for s in events[-1].stages} == {"work": 300, "dataset": 300}
    # 600 results: watch reads at most every 0.2 s (plus submit's and the export's reads), not per result.
    assert reads <= 4 + elapsed / 0.2, (reads, elapsed)


async def test_following_samples_sends_every_item_once_and_ends_with_the_job(manager, tmp_path):
    manager, service = manager
    service.gate, service.refuse = asyncio.Event(), {3}
    await manager.submit("followed", spec())
    following = asyncio.create_task(_collect(manager.samples("followed", follow=True, include_dropped=True)))
    while len(service.calls) < 2:
        await asyncio.sleep(0.01)
    assert not following.done()
    service.gate.set()
    records = await asyncio.wait_for(following, timeout=10)
    assert sorted(r.item_id for r in records) == [f"i{n:02d}" for n in range(10)]
    assert [r.item_id for r in records if not r.kept] == ["i03"]
    kept_only = await _collect(manager.samples("followed", follow=False, include_dropped=False))
    assert sorted(r.item_id for r in kept_only) == [f"i{n:02d}" for n in range(10) if n != 3]


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_two_managers_on_one_postgres_store_pass_a_job_between_them_by_its_lease(tmp_path, monkeypatch, postgres):
    gate = asyncio.Event()
    service = DoubleService(gate=gate)
    monkeypatch.setitem(registry.RECIPES, "self_consistency", double_recipe(service))
    dsn = postgres.new_database()
    stores = [PostgresJobStore(dsn), PostgresJobStore(dsn)]
    services = Services(DoubleGenerator(), None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]
    one, two = (JobManager(store, services, TenantStorage(tmp_path), lease_seconds=0.6) for store in stores)
    await one.resume_unfinished()
    await two.resume_unfinished()
    key = "default/shared"
    await one.submit("shared", spec(items=6))
    while not service.calls:
        await asyncio.sleep(0.01)
    assert one._running(key) and not two._running(key)

    # Cancelled through the other replica: the holder stops the job when it next renews its lease.
    assert (await two.cancel("shared")).state == coordinator_pb2.JOB_STATE_CANCELLED
    for _ in range(100):
        if not one._running(key):
            break
        await asyncio.sleep(0.05)
    assert not one._running(key), "the holder went on with a job cancelled elsewhere"

    # Retried through the second, which takes it; it dies without giving the lease back; the first takes over.
    await two.retry("shared")
    assert two._running(key)
    monkeypatch.setattr(stores[1], "release_lease", lambda *args: asyncio.sleep(0))  # as if killed: nothing given back
    await two.close()
    for _ in range(100):
        if one._running(key):
            break
        await asyncio.sleep(0.05)
    assert one._running(key), "nobody took over the job of the coordinator that died"
    gate.set()
    job = await finish(one, "shared")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
    results = await stores[0].results(key)
    assert sorted(item for item, stage, _ in results if stage == "dataset") == [f"i{n:02d}" for n in range(6)]
    await one.close()
    for store in stores:
        await store.close()


async def test_the_same_submission_to_two_managers_at_once_makes_one_job_that_keeps_its_inputs(tmp_path, monkeypatch, postgres):
    service = DoubleService()
    recipe = double_recipe(service)
    monkeypatch.setattr(recipe, "inputs", ("questions_path",))  # the double reads nothing, but its input is snapshotted
    monkeypatch.setitem(registry.RECIPES, "self_consistency", recipe)
    dsn = postgres.new_database()
    stores = [PostgresJobStore(dsn), PostgresJobStore(dsn)]
    services = Services(DoubleGenerator(), None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]
    managers = [JobManager(store, services, TenantStorage(tmp_path)) for store in stores]
    job_spec = spec(items=4)
    job_spec.self_consistency.questions_path = "inline:questions"
    job_spec.inline_inputs["questions"] = '[{"Body": "b", "Question": "q", "Answer": 1}]'
    answers = await asyncio.gather(*(manager.submit("twice", job_spec) for manager in managers for _ in range(3)))
    assert sum(created for _, created, _ in answers) == 1
    assert len({job.id for job, _, _ in answers}) == 1
    job = await finish(managers[0], "twice")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
    inputs = TenantStorage(tmp_path).inputs_dir("default", "twice")
    assert sorted(path.name for path in inputs.iterdir()) == [jobs.SPEC_HASH_FILE, "questions_path"]
    for manager in managers:
        await manager.close()
    for store in stores:
        await store.close()
