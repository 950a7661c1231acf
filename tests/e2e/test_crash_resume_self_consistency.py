"""Kill -9 the coordinator in the middle of a self-consistency job (a recipe
on the generator and the scorer): the finished dataset equals an
uninterrupted run's, nothing missing, nothing twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from autodidact.v1 import coordinator_pb2
from tests.conftest import SVAMP
from tests.e2e.test_crash_resume import Service, finish_job

pytestmark = pytest.mark.slow
JOB = "crash-consistency"
FILES = ("paths.jsonl", "lmsi.jsonl", "lineage.jsonl")


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[Service, Service]]:
    generator, scorer = Service("generator", []), Service("scorer", [])
    generator.start()
    scorer.start()
    yield generator, scorer
    generator.stop()
    scorer.stop()


def spec(output_dir: Path) -> coordinator_pb2.JobSpec:
    job = coordinator_pb2.JobSpec(seed=9, max_in_flight=2, output_dir=str(output_dir))
    job.self_consistency.questions_path = str(SVAMP)
    job.self_consistency.max_questions = 6
    job.self_consistency.paths_per_question = 4
    job.self_consistency.sampling.max_tokens = 48
    return job


async def run_job(models: tuple[Service, Service], workdir: Path, kill: bool) -> dict[str, str]:
    generator, scorer = models
    coordinator = Service(
        "coordinator", ["--data-dir", str(workdir), "--generator-target", generator.target, "--scorer-target", scorer.target]
    )
    coordinator.start()
    try:
        await finish_job(coordinator, JOB, spec(workdir / "dataset"), "vote", coordinator if kill else None)
        return {name: (workdir / "dataset" / name).read_text() for name in FILES}
    finally:
        coordinator.stop()


def test_killing_the_coordinator_mid_job_changes_nothing_in_the_dataset(models, tmp_path):
    expected = asyncio.run(run_job(models, tmp_path / "uninterrupted", kill=False))
    got = asyncio.run(run_job(models, tmp_path / "interrupted", kill=True))
    assert expected["paths.jsonl"].strip(), "the job kept nothing: the comparison would prove little"
    ids = [json.loads(line)["item_id"] for line in got["lineage.jsonl"].splitlines()]
    assert len(ids) == len(set(ids)) == 6 * 5  # 6 questions and their 4 paths, each once
    for name in FILES:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"
