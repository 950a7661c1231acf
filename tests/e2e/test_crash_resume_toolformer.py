"""Kill -9 the coordinator in the middle of a Toolformer job (generator,
scorer and tool-executor behind it): the finished dataset equals an
uninterrupted run's, nothing missing, nothing twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from autodidact.v1 import coordinator_pb2
from tests.conftest import GSM8K
from tests.e2e.test_crash_resume import Service, finish_job

pytestmark = pytest.mark.slow
JOB = "crash-toolformer"
FILES = ("documents.jsonl", "calls.jsonl", "lineage.jsonl")


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory) -> Iterator[dict[str, Service]]:
    generator = Service("generator", [])
    generator.start()
    services = {
        "generator": generator,
        "scorer": Service("scorer", []),
        "tool-executor": Service(
            "tool-executor", ["--data-dir", str(tmp_path_factory.mktemp("tools")), "--generator-target", generator.target]
        ),
    }
    for name in ("scorer", "tool-executor"):
        services[name].start()
    yield services
    for service in services.values():
        service.stop()


def spec(output_dir: Path) -> coordinator_pb2.JobSpec:
    job = coordinator_pb2.JobSpec(seed=4, max_in_flight=2, output_dir=str(output_dir))
    job.toolformer.documents_path = str(GSM8K)
    job.toolformer.max_documents = 3
    job.toolformer.tools.append("Calculator")
    job.toolformer.positions_per_document = 4
    job.toolformer.calls_per_position = 3
    job.toolformer.filter_threshold = -100  # keeps every executed call: splicing is part of what must match
    return job


async def run_job(neighbours: dict[str, Service], workdir: Path, kill: bool) -> dict[str, str]:
    targets = [
        "--generator-target",
        neighbours["generator"].target,
        "--scorer-target",
        neighbours["scorer"].target,
        "--tool-executor-target",
        neighbours["tool-executor"].target,
    ]
    coordinator = Service("coordinator", ["--data-dir", str(workdir), *targets])
    coordinator.start()
    try:
        await finish_job(coordinator, JOB, spec(workdir / "dataset"), "execute", coordinator if kill else None)
        return {name: (workdir / "dataset" / name).read_text() for name in FILES}
    finally:
        coordinator.stop()


def test_killing_the_coordinator_mid_job_changes_nothing_in_the_dataset(neighbours, tmp_path):
    expected = asyncio.run(run_job(neighbours, tmp_path / "uninterrupted", kill=False))
    got = asyncio.run(run_job(neighbours, tmp_path / "interrupted", kill=True))
    assert expected["documents.jsonl"].strip(), "no document got a call: the comparison would prove little"
    ids = [json.loads(line)["item_id"] for line in got["lineage.jsonl"].splitlines()]
    assert len(ids) == len(set(ids)), "an item was recorded twice"
    for name in FILES:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"
