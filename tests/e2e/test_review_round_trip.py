"""A review gate end to end on real processes: a Self-Consistency job holds
every question with a winner for review (its vote share within the band of
min_confidence), `autodidact review --export` writes them as Label Studio
tasks, a Label Studio export with one "drop" and "keep" for the rest goes back
through `autodidact review --submit`, and the job then finishes: the dataset
holds the kept questions only, and each held question's lineage carries the
person's decision (decided_by "human", who, the note).

Run twice: as is, and with the coordinator killed (SIGKILL) between the first
decision and the rest. The decision sent before the kill is not lost: sent
again it is "already decided", and the dataset shows it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autodidact.client import wait_until_serving
from autodidact.runtime.channels import create_channel
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import SVAMP
from tests.e2e.test_crash_resume import AUTODIDACT, TERMINAL, Neighbours, Service
from tests.lineage import assert_lineage_agrees, read_jsonl
from tests.stack import download_export

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB = "reviewed"
ANNOTATOR = "ann@example.com"


def spec() -> coordinator_pb2.JobSpec:
    job = coordinator_pb2.JobSpec(seed=5, max_in_flight=2)
    job.self_consistency.questions_path = str(SVAMP)
    job.self_consistency.max_questions = 4
    job.self_consistency.paths_per_question = 4
    job.self_consistency.sampling.max_tokens = 96
    job.self_consistency.sampling.temperature = 0.1  # near-greedy: the small model's paths agree, so questions have winners
    job.self_consistency.min_confidence = 0.5
    job.review.band = 0.5  # every vote share (0 to 1) lies within 0.5 of 0.5: each question with a winner is held
    job.review.deadline_seconds = 3600
    return job


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    pool = Neighbours(tmp_path_factory.mktemp("neighbours"))
    yield pool
    pool.stop()


def cli(*args: str) -> str:
    done = subprocess.run([AUTODIDACT, "review", JOB, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"autodidact review {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def annotated(tasks: list[dict[str, Any]], drop: set[str]) -> list[dict[str, Any]]:
    """The tasks as Label Studio exports them once annotated: a choice and a note each."""
    exported = []
    for number, task in enumerate(tasks, 1):
        choice = "drop" if task["data"]["item_id"] in drop else "keep"
        result = [
            {"from_name": "decision", "to_name": "item", "type": "choices", "value": {"choices": [choice]}},
            {"from_name": "note", "to_name": "item", "type": "textarea", "value": {"text": [f"{choice}: checked by hand"]}},
        ]
        exported.append({"id": number, **task, "annotations": [{"id": number, "completed_by": {"email": ANNOTATOR}, "result": result}]})
    return exported


async def wait_for_reviews(stub: Any) -> coordinator_pb2.Job:
    """The job once every question was voted on and the held ones wait for review."""
    while True:
        job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=JOB))).job
        assert job.state not in TERMINAL, f"the job ended ({coordinator_pb2.JobState.Name(job.state)}: {job.error}) before its reviews"
        vote = next((s for s in job.stages if s.stage == "vote"), None)
        if vote is not None and vote.done == 4 and job.awaiting_review == vote.kept:
            return job
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("kill", [False, True], ids=["as-is", "coordinator-killed-mid-review"])
def test_borderline_items_go_out_to_label_studio_and_the_decisions_come_back_into_the_dataset(
    neighbours: Neighbours, tmp_path: Path, kill: bool
) -> None:
    coordinator = Service(
        "coordinator",
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--input-root",
            str(SVAMP.parent),
            "--generator-target",
            neighbours.target("generator"),
            "--scorer-target",
            neighbours.target("scorer"),
        ],
    )
    coordinator.start()
    try:
        asyncio.run(round_trip(coordinator, tmp_path, kill))
    finally:
        coordinator.stop()


async def round_trip(coordinator: Service, tmp_path: Path, kill: bool) -> None:
    target = ["--target", coordinator.target]
    async with create_channel(coordinator.target, timeout_seconds=60) as channel:
        await wait_until_serving(channel, timeout=120)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=JOB, spec=spec()))
        job = await wait_for_reviews(stub)
    assert job.awaiting_review >= 2, f"the small model gave only {job.awaiting_review} questions a winner; the test needs 2"

    # Out: the held questions as Label Studio tasks, the filter's verdict as a prediction.
    tasks_file = tmp_path / "tasks.json"
    said = cli("--export", str(tasks_file), *target)
    tasks = json.loads(tasks_file.read_text())
    assert f"{job.awaiting_review} items awaiting review" in said
    assert len(tasks) == job.awaiting_review
    assert all(task["data"]["stage"] == "vote" and "question" in task["data"]["text"] for task in tasks)
    assert (tmp_path / "tasks.label-config.xml").read_text().startswith("<View>")
    held = [task["data"]["item_id"] for task in tasks]
    dropped = held[0]

    # In: a Label Studio export of the annotated tasks, one decision first, then the rest.
    first, rest = tmp_path / "first.json", tmp_path / "rest.json"
    first.write_text(json.dumps(annotated(tasks[:1], {dropped})))
    rest.write_text(json.dumps(annotated(tasks[1:], {dropped})))
    assert f"1 recorded; {len(held) - 1} items still awaiting review" in cli("--submit", str(first), *target)
    if kill:
        coordinator.kill()  # the decision was acknowledged: it must survive
        coordinator.start()
        async with create_channel(coordinator.target, timeout_seconds=60) as channel:
            await wait_until_serving(channel, timeout=120)
    assert "1 already decided" in cli("--submit", str(first), *target, "--timeout", "120")
    assert f"{len(held) - 1} recorded; 0 items still awaiting review" in cli("--submit", str(rest), *target)

    async with create_channel(coordinator.target, timeout_seconds=600) as channel:
        await wait_until_serving(channel, timeout=120)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        job = [event.job async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=JOB), timeout=600)][-1]
        assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.awaiting_review == 0
        await download_export(stub, JOB, tmp_path / "out")

    out = tmp_path / "out"
    assert_lineage_agrees(job, out)
    rows = {row["item_id"]: row for row in read_jsonl(out / "lineage.jsonl")}
    for item_id in held:
        review = next(d for d in rows[item_id]["lineage"] if d["stage"] == "review")
        assert review["decided_by"] == "human" and review["reviewer"] == ANNOTATOR
        assert review["kept"] == (item_id != dropped)
        assert review["note"] == f"{'drop' if item_id == dropped else 'keep'}: checked by hand"
        assert rows[item_id]["kept"] == (item_id != dropped)
    # The dataset reflects the decisions: the dropped question's paths are out with it, the kept ones' agreeing paths in.
    paths = [row for item_id, row in rows.items() if item_id.startswith(dropped + "/")]
    assert paths and not any(row["kept"] for row in paths)
    assert all(d["filter"] in ("human_review", "disagrees", "no_answer") for row in paths for d in row["lineage"] if not d["kept"])
    in_table = {row["item_id"].split("/")[0] for row in read_jsonl(out / "paths.jsonl")}
    assert dropped not in in_table
    assert in_table == {item_id for item_id in held[1:] if any(r["kept"] for i, r in rows.items() if i.startswith(item_id + "/"))}
    assert in_table, "a kept question has at least its winner's paths in the table"
