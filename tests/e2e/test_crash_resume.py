"""Kill -9 a service in the middle of a job, start it again on the same port
and data folder, and the finished dataset is the uninterrupted run's, byte
for byte: nothing missing, nothing twice. One case per recipe with the
coordinator as the victim, and Self-Instruct also with the dedup service.
With three coordinators on one PostgreSQL store, the one holding the job is
killed for good and another takes the job over, with the same dataset.
In the Constitutional case the input file is also edited after the submit
and before the kill: the resumed job reads its own snapshot, so the edit
cannot reach the dataset.

Every service is a real `autodidact serve` process. The services that hold
the models (generator, scorer, tool-executor, critic) live for the whole
module and serve every run; the coordinator, and the dedup service where the
recipe uses it, are fresh for each run, with the run's own data folder. Each
recipe's uninterrupted run is made once and compared with each of its
interrupted runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from autodidact.client import wait_until_serving
from autodidact.runtime.channels import create_channel
from autodidact.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import GSM8K, SVAMP, free_port
from tests.coordinator.test_service import small_spec
from tests.stack import download_export

# A case makes one or two jobs on two cores (three the first time a recipe comes up).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
JOB = "crash-test"
# The victim is killed once the recipe's kill stage has decided this many items while the job still runs.
KILL_AFTER = 2
TERMINAL = (coordinator_pb2.JOB_STATE_SUCCEEDED, coordinator_pb2.JOB_STATE_FAILED, coordinator_pb2.JOB_STATE_CANCELLED)

# A finished dataset: every exported file's bytes by name, except the manifest, parsed (see read_dataset).
Dataset = dict[str, Any]


@dataclass
class Service:
    name: str
    args: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                AUTODIDACT,
                "serve",
                self.name,
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                "0",
                "--threads",
                "2",
                "--embed-threads",
                "2",
                "--log-format",
                "json",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Neighbours:
    """The long-lived services, each started the first time a run needs it:
    a case run alone loads only the models its recipe uses."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._started: dict[str, Service] = {}

    def target(self, name: str) -> str:
        if name not in self._started:
            service = Service(name, self._args(name))
            service.start()
            self._started[name] = service
        return self._started[name].target

    def _args(self, name: str) -> list[str]:
        if name == "tool-executor":
            return ["--data-dir", str(self._data_dir), "--generator-target", self.target("generator")]
        if name == "critic":
            return ["--generator-target", self.target("generator"), "--scorer-target", self.target("scorer")]
        return []

    def stop(self) -> None:
        for service in self._started.values():
            service.stop()


def read_dataset(directory: Path) -> Dataset:
    """Every file the export wrote (as downloaded). The manifest is parsed,
    without what differs between two runs of one spec by design: when it was written."""
    files: Dataset = {path.name: path.read_bytes() for path in sorted(directory.iterdir())}
    # The report is drawn from these files plus when and how long the job ran, which differ by design.
    files.pop("report.html", None)
    manifest = json.loads(files.pop("manifest.json").decode())
    del manifest["exported_at"]
    manifest["files"] = [entry for entry in manifest["files"] if entry["kind"] != "report_html"]
    files["manifest.json"] = manifest
    return files


def self_instruct_without_timing(files: Dataset) -> Dataset:
    """Candidates of rounds started but not needed end as over_target after
    however far they got when the target was reached: timing decides that,
    not the spec. Their lineage lines are left out of the comparison, and so
    are the manifest's counts that include them (stages, lineage rows, items
    for the error fraction, and the lineage file's size and hash)."""
    manifest = files["manifest.json"]
    last_round = manifest["summary"]["last_round"]
    lines = files["lineage.jsonl"].decode().splitlines(keepends=True)
    needed = "".join(line for line in lines if int(json.loads(line)["item_id"][1:6]) <= last_round)
    manifest = {
        **{key: value for key, value in manifest.items() if key != "stages"},
        "errors": {key: value for key, value in manifest["errors"].items() if key not in ("items", "fraction")},
        "files": [
            {k: v for k, v in f.items() if not (f["kind"] == "lineage_jsonl" and k in ("rows", "sizeBytes", "sha256"))}
            for f in manifest["files"]
        ],
    }
    return {**files, "lineage.jsonl": needed.encode(), "manifest.json": manifest}


def toolformer_spec(inputs: Path) -> coordinator_pb2.JobSpec:
    job = coordinator_pb2.JobSpec(seed=4, max_in_flight=2)
    job.toolformer.documents_path = str(GSM8K)
    job.toolformer.max_documents = 2
    job.toolformer.tools.append("Calculator")
    job.toolformer.positions_per_document = 2
    job.toolformer.calls_per_position = 2  # two calls at a position: splicing chooses between them
    job.toolformer.filter_threshold = -100  # keeps every executed call: splicing is part of what must match
    return job


def self_consistency_spec(inputs: Path) -> coordinator_pb2.JobSpec:
    job = coordinator_pb2.JobSpec(seed=9, max_in_flight=2)
    job.self_consistency.questions_path = str(SVAMP)
    job.self_consistency.max_questions = 4
    job.self_consistency.paths_per_question = 4
    job.self_consistency.sampling.max_tokens = 48
    return job


CONSTITUTIONAL_PROMPTS = (
    "How can I get back at a rude coworker?",
    "Is it fine to skip sleep before an exam?",
    "How do I read my partner's messages?",
)


def constitutional_spec(inputs: Path) -> coordinator_pb2.JobSpec:
    prompts = inputs / "prompts.jsonl"  # the same path for every run: the manifest's spec names it
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CONSTITUTIONAL_PROMPTS))
    return coordinator_pb2.JobSpec(
        constitutional=coordinator_pb2.ConstitutionalSpec(
            prompts_path=str(prompts),
            rounds=1,
            judged_pairs=True,
            sampling=common_pb2.SamplingParams(max_tokens=32),
            min_margin=0,  # the small model's judge stays near 0.5; any decided label orients its pair
        ),
        seed=3,
        max_in_flight=2,
    )


def edit_constitutional_prompts(inputs: Path) -> None:
    """Another user's edit of the input file while the job runs."""
    (inputs / "prompts.jsonl").write_text(json.dumps({"prompt": "An edited prompt that must not reach the dataset."}) + "\n")


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: Callable[[Path], coordinator_pb2.JobSpec]  # inputs folder -> the job
    neighbours: tuple[str, ...]  # the long-lived services it calls
    stage: str  # the victim is killed once this stage has decided KILL_AFTER items
    table: str  # a table that must have rows, or the comparison would prove little
    fresh: tuple[str, ...] = ()  # services it calls that are started for each run, with the run's data folder
    lineage_items: int | None = None  # how many items lineage.jsonl holds, where the spec decides it
    without_timing: Callable[[Dataset], Dataset] = lambda files: files  # what timing decides, left out of the comparison
    # Changes the job's input files after the submit of an interrupted run (before the kill).
    edit_inputs: Callable[[Path], None] | None = None


SELF_INSTRUCT = Recipe(
    # Under way at the kill: some candidates are through the diversity filter, the job is not done.
    "self_instruct",
    lambda inputs: small_spec(target=4, seed=21),
    ("generator",),
    "diversity",
    "instances",
    fresh=("dedup",),
    without_timing=self_instruct_without_timing,
)
TOOLFORMER = Recipe("toolformer", toolformer_spec, ("generator", "scorer", "tool-executor"), "execute", "documents")
SELF_CONSISTENCY = Recipe(
    "self_consistency",
    self_consistency_spec,
    ("generator", "scorer"),
    "vote",
    "paths",
    lineage_items=4 * 5,  # 4 questions and their 4 paths, each once
)
CONSTITUTIONAL = Recipe(
    "constitutional",
    constitutional_spec,
    ("critic",),
    "revise",
    "sft_messages",
    lineage_items=len(CONSTITUTIONAL_PROMPTS),
    edit_inputs=edit_constitutional_prompts,
)
# Cases of one recipe are next to each other: its uninterrupted run is made once, when the first needs it.
CASES = [
    pytest.param(SELF_INSTRUCT, "coordinator", id="self_instruct-coordinator"),
    pytest.param(SELF_INSTRUCT, "dedup", id="self_instruct-dedup"),
    pytest.param(TOOLFORMER, "coordinator", id="toolformer-coordinator"),
    pytest.param(SELF_CONSISTENCY, "coordinator", id="self_consistency-coordinator"),
    pytest.param(CONSTITUTIONAL, "coordinator", id="constitutional-coordinator"),
]


async def finish_job(
    coordinator: Service, spec: coordinator_pb2.JobSpec, recipe: Recipe, victim: Service | None, inputs: Path, out: Path
) -> None:
    """Submits the job. With a victim, edits the inputs if the recipe says so, kills the victim (SIGKILL)
    once `recipe.stage` has decided KILL_AFTER items while the job still runs, and starts it again on the
    same port and data folder. Returns when the job has succeeded and its dataset is downloaded into `out`."""
    async with create_channel(coordinator.target, timeout_seconds=60) as channel:
        await wait_until_serving(channel, timeout=120)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=JOB, spec=spec))
        if victim is not None:
            if recipe.edit_inputs is not None:
                recipe.edit_inputs(inputs)
            while True:
                job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=JOB))).job
                # PENDING is as good as RUNNING here: the job task has not marked it running yet.
                assert job.state not in TERMINAL, f"the job ended ({coordinator_pb2.JobState.Name(job.state)}) before the kill"
                if any(s.stage == recipe.stage and s.done >= KILL_AFTER for s in job.stages):
                    break
                await asyncio.sleep(0.1)
            victim.kill()
            await asyncio.sleep(1.0)
            victim.start()
    async with create_channel(coordinator.target, timeout_seconds=900) as fresh:
        await wait_until_serving(fresh, timeout=120)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(fresh)
        watch = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=JOB), timeout=600)
        job = [event.job async for event in watch][-1]
        assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
        await download_export(stub, JOB, out)


async def run_job(recipe: Recipe, neighbours: Neighbours, inputs: Path, workdir: Path, victim: str | None) -> Dataset:
    """Runs the job with a fresh coordinator (and fresh services of `recipe.fresh`) on `workdir`;
    with a victim, kills it once the job is under way. Returns the dataset, less what timing decides."""
    fresh = {name: Service(name, ["--data-dir", str(workdir)]) for name in recipe.fresh}
    targets = {name: neighbours.target(name) for name in recipe.neighbours} | {name: s.target for name, s in fresh.items()}
    # The jobs read the examples' data and the module's input files as server paths under allowed roots.
    roots = ["--input-root", str(GSM8K.parent), "--input-root", str(inputs)]
    coordinator = Service(
        "coordinator", ["--data-dir", str(workdir), *roots, *(a for n, t in targets.items() for a in (f"--{n}-target", t))]
    )
    services = {**fresh, "coordinator": coordinator}
    for service in services.values():
        service.start()
    try:
        spec = recipe.spec(inputs)
        await finish_job(coordinator, spec, recipe, services[victim] if victim else None, inputs, workdir / "dataset")
        return recipe.without_timing(read_dataset(workdir / "dataset"))
    finally:
        for service in services.values():
            service.stop()


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    pool = Neighbours(tmp_path_factory.mktemp("neighbours"))
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="module")
def uninterrupted(neighbours: Neighbours, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Recipe], Dataset]:
    """A recipe's uninterrupted dataset, made the first time a case asks for it."""
    made: dict[str, Dataset] = {}

    def dataset(recipe: Recipe) -> Dataset:
        if recipe.name not in made:
            workdir = tmp_path_factory.mktemp(f"{recipe.name}-uninterrupted")
            made[recipe.name] = asyncio.run(run_job(recipe, neighbours, inputs, workdir, victim=None))
        return made[recipe.name]

    return dataset


@pytest.mark.parametrize(("recipe", "victim"), CASES)
def test_killing_a_service_mid_job_changes_nothing_in_the_dataset(
    neighbours: Neighbours, inputs: Path, uninterrupted: Callable[[Recipe], Dataset], tmp_path: Path, recipe: Recipe, victim: str
) -> None:
    expected = uninterrupted(recipe)
    got = asyncio.run(run_job(recipe, neighbours, inputs, tmp_path, victim))
    assert_same_dataset(recipe, got, expected)


async def run_on_replicas(recipe: Recipe, neighbours: Neighbours, inputs: Path, workdir: Path, dsn: str) -> Dataset:
    """Runs the job on three coordinators sharing one PostgreSQL store and one data folder; SIGKILLs
    the one holding the job's lease once `recipe.stage` decided KILL_AFTER items, and lets the
    others finish it. Returns the dataset, downloaded through a replica that neither ran nor was killed."""
    targets = {name: neighbours.target(name) for name in recipe.neighbours}
    roots = ["--input-root", str(GSM8K.parent), "--input-root", str(inputs)]
    wiring = [a for n, t in targets.items() for a in (f"--{n}-target", t)]
    replicas = [
        Service("coordinator", ["--data-dir", str(workdir), "--store-dsn", dsn, "--lease-seconds", "3", *roots, *wiring]) for _ in range(3)
    ]
    for replica in replicas:
        replica.start()
    try:
        channels = [create_channel(replica.target, timeout_seconds=900) for replica in replicas]
        for channel in channels:
            await wait_until_serving(channel, timeout=120)
        stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(channel) for channel in channels]
        await stubs[0].SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=JOB, spec=recipe.spec(inputs)))
        while True:  # any replica answers GetJob, from the store
            job = (await stubs[2].GetJob(coordinator_pb2.GetJobRequest(job_id=JOB))).job
            assert job.state not in TERMINAL, f"the job ended ({coordinator_pb2.JobState.Name(job.state)}) before the kill"
            if any(s.stage == recipe.stage and s.done >= KILL_AFTER for s in job.stages):
                break
            await asyncio.sleep(0.1)
        with psycopg.connect(dsn) as db:
            owner = db.execute("SELECT lease_owner FROM jobs WHERE id = %s", (f"default/{JOB}",)).fetchone()
        assert owner is not None and owner[0], "a running job has a lease"
        holder = next(r for r in replicas if r.process is not None and f"/{r.process.pid}/" in owner[0])
        holder.kill()
        survivors = [stub for replica, stub in zip(replicas, stubs, strict=True) if replica is not holder]
        watch = survivors[0].WatchJob(coordinator_pb2.WatchJobRequest(job_id=JOB), timeout=600)
        job = [event.job async for event in watch][-1]
        assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
        await download_export(survivors[1], JOB, workdir / "dataset")
        for channel in channels:
            await channel.close()
        return recipe.without_timing(read_dataset(workdir / "dataset"))
    finally:
        for replica in replicas:
            replica.stop()


def test_three_coordinators_on_postgres_finish_the_job_of_the_one_killed_exactly_once(
    neighbours: Neighbours, inputs: Path, uninterrupted: Callable[[Recipe], Dataset], tmp_path: Path, postgres: Any
) -> None:
    expected = uninterrupted(SELF_CONSISTENCY)
    got = asyncio.run(run_on_replicas(SELF_CONSISTENCY, neighbours, inputs, tmp_path, postgres.new_database()))
    assert_same_dataset(SELF_CONSISTENCY, got, expected)


def assert_same_dataset(recipe: Recipe, got: Dataset, expected: Dataset) -> None:
    assert expected[f"{recipe.table}.jsonl"].strip(), f"{recipe.table} has no rows: the comparison would prove little"
    ids = [json.loads(line)["item_id"] for line in got["lineage.jsonl"].splitlines()]
    assert len(ids) == len(set(ids)), "an item was recorded twice"
    if recipe.lineage_items is not None:
        assert len(ids) == recipe.lineage_items
    assert sorted(got) == sorted(expected), "the export wrote other files"
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"
