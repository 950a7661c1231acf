"""The self-consistency recipe run by the real job manager and store, with
the real vote (the scorer's Vote handler, called in process) and a
DETERMINISTIC DOUBLE of the generator: each question's reasoning paths are
written here, so every outcome (last stated answer, tie, too few votes, no
answer, low confidence) is known in advance.

Covers issue 10 item 1 (the answer a path states last; no winner on a tie;
min_votes), item 6 for this recipe (one final decision per question and path;
stage counts equal the lineage), and item 13's "done never above total"."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Any, cast

import grpc
import pyarrow.parquet as pq
import pytest

from autodidact.backends.llm import LLM
from autodidact.coordinator.jobs import JobManager
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.recipes.self_consistency import STAGES
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import SqliteJobStore
from autodidact.coordinator.tenants import Tenants
from autodidact.runtime.component import Resource
from autodidact.scorer.service import ScorerServicer
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern, extract_answer
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2, scorer_pb2

# Question -> its four sampled paths (paths_per_question 4, min_votes 2 by default, min_confidence 0.7).
PATHS = {
    # The case: the first "The answer is" says 76, the last says 50.
    "Sam had 76 marbles and lost 26. How many are left?": [
        "He had 76. The answer is 76. No: he lost 26, so 76 - 26 = 50. The answer is 50.",
        "At first the answer is 76, but 76 - 26 = 50. The answer is 76 marbles minus 26. The answer is 50.",
        "76 - 26 = 50. The answer is 50.",
        "He has 76. The answer is 76.",
    ],
    "A tie: 7 or 8?": ["The answer is 7.", "The answer is 8.", "So 7. The answer is 7.", "The answer is 8."],
    "Four different answers?": ["The answer is 1.", "The answer is 2.", "The answer is 3.", "The answer is 4."],
    "One voice only?": ["The answer is 9.", "I do not know.", "Hard to say.", "No idea."],
    "Nobody answers?": ["I am not sure.", "Maybe later.", "Who knows.", "Pass."],
    "Two of three agree?": ["The answer is 5.", "The answer is 5.", "The answer is 6.", "Unsure."],
    "Three of four agree?": ["The answer is 3.", "3 in all. The answer is 3.", "The answer is 4.", "The answer is 3."],
}
QUESTIONS = list(PATHS)


class DoubleGenerator:
    """Deterministic double: the paths written above, in order, for the question in the prompt."""

    async def Generate(self, request: generator_pb2.GenerateRequest, timeout: float | None = None) -> generator_pb2.GenerateResponse:
        question = request.prompt.text.rsplit("Q: ", 1)[1].removesuffix("\nA:")
        texts = PATHS[question]
        return generator_pb2.GenerateResponse(
            samples=[common_pb2.Sample(text=" " + texts[i % len(texts)], seed=request.seed + i) for i in range(request.n)],
            model=common_pb2.ModelInfo(backend="double", model="double-model", context_length=2048),
        )

    async def GetModelInfo(
        self, request: generator_pb2.GetModelInfoRequest, timeout: float | None = None
    ) -> generator_pb2.GetModelInfoResponse:
        return generator_pb2.GetModelInfoResponse(
            model=common_pb2.ModelInfo(backend="double", model="double-model", context_length=2048), max_samples=64
        )


async def _no_model() -> LLM:
    raise AssertionError("a majority vote needs no model")


class InProcessScorer:
    """The real Vote handler without a server (majority votes need no model)."""

    def __init__(self) -> None:
        self.servicer = ScorerServicer(Resource("the model", _no_model))  # a majority vote never asks for it

    async def Vote(self, request: scorer_pb2.VoteRequest, timeout: float | None = None) -> scorer_pb2.VoteResponse:
        # No server, so no context: the Vote handler never reads it.
        return await self.servicer.Vote(request, cast("grpc.aio.ServicerContext[Any, Any]", None))


async def _run(tmp_path: Path) -> tuple[coordinator_pb2.Job, Path]:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    data = tmp_path / "data"  # the coordinator's; the questions file beside it is under the allowed root
    out = TenantStorage(data).dataset_dir("default", "sc")
    spec = coordinator_pb2.JobSpec(seed=3)
    spec.self_consistency.questions_path = str(questions)
    spec.self_consistency.paths_per_question = 4
    spec.self_consistency.min_confidence = 0.7
    services = Services(DoubleGenerator(), None, InProcessScorer(), None, None, patience_seconds=1)  # type: ignore[arg-type]
    # The questions are a server file under an input root the test allows.
    manager = JobManager(SqliteJobStore(data / "jobs.sqlite"), services, TenantStorage(data), Tenants(shared_roots=(str(tmp_path),)))
    submitted = manager.submit("sc", spec)
    if inspect.isawaitable(submitted):  # submit asks the generator's model at submit on newer managers
        await submitted
    async for job in manager.watch("sc"):
        final = job
    await manager.close()
    assert final.state == coordinator_pb2.JOB_STATE_SUCCEEDED, final.error
    return final, out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    job, out = asyncio.run(_run(tmp_path_factory.mktemp("self_consistency")))
    lineage = {r["item_id"]: r for r in map(json.loads, (out / "lineage.jsonl").read_text().splitlines())}
    return job, out, lineage


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _question(index: int) -> str:
    return f"q{index:05d}"


def _decisions(row: dict) -> list[tuple[str, bool, str]]:
    return [(d["stage"], d["kept"], d.get("filter", "")) for d in row["lineage"]]


def test_a_path_s_answer_is_the_one_it_states_last(finished):
    _, _, lineage = finished
    answers = [lineage[f"{_question(0)}/p{n:03d}"]["data"]["answer"] for n in range(4)]
    assert answers == ["50", "50", "50", "76"]
    assert lineage[_question(0)]["kept"] and lineage[_question(0)]["data"]["winner"] == "50"


def test_lmsi_direct_and_cot_rows_state_the_voted_answer(finished):
    _, out, lineage = finished
    lmsi = _rows(out / "lmsi.jsonl")
    pattern = compile_pattern(DEFAULT_ANSWER_PATTERN)
    by_path: dict[str, dict[str, str]] = {}
    for row in lmsi:
        by_path.setdefault(row["item_id"], {})[row["format"]] = row["completion"]
    assert set(by_path) == {f"{_question(0)}/p{n:03d}" for n in range(3)} | {f"{_question(6)}/p{n:03d}" for n in (0, 1, 3)}
    for item_id, formats in by_path.items():
        winner = lineage[item_id.split("/")[0]]["data"]["winner"]
        assert formats["direct"] == formats["zero_shot"] == f" The answer is {winner}."
        assert extract_answer(formats["cot"], pattern) == extract_answer(formats["zero_shot_cot"], pattern) == winner


@pytest.mark.parametrize(
    ("index", "filter_", "reason"),
    [
        (1, "no_majority", "tie for the most votes: 7×2, 8×2"),
        (2, "no_majority", "tie for the most votes"),
        (3, "no_majority", "1 of 1 answers agree, fewer than min_votes 2"),
        (4, "no_answer", "no path stated an answer"),
    ],
)
def test_a_question_without_a_clear_winner_is_dropped_at_the_vote(finished, index, filter_, reason):
    _, out, lineage = finished
    row = lineage[_question(index)]
    assert not row["kept"] and _decisions(row) == [("paths", True, ""), ("vote", False, filter_)]
    assert reason in row["lineage"][-1]["reason"]
    for n in range(4):
        path = lineage[f"{_question(index)}/p{n:03d}"]
        assert not path["kept"] and _decisions(path) == [("agreement", False, "no_answer" if not path["data"]["answer"] else filter_)]
    assert not any(r["item_id"].startswith(_question(index)) for r in _rows(out / "paths.jsonl"))


def test_min_confidence_drops_the_question_and_its_agreeing_paths(finished):
    _, _, lineage = finished
    row = lineage[_question(5)]
    assert _decisions(row) == [("paths", True, ""), ("vote", True, ""), ("dataset", False, "low_confidence")]
    assert [_decisions(lineage[f"{_question(5)}/p{n:03d}"]) for n in range(4)] == [
        [("agreement", False, "low_confidence")],
        [("agreement", False, "low_confidence")],
        [("agreement", False, "disagrees")],
        [("agreement", False, "no_answer")],
    ]


def test_every_question_and_path_has_exactly_one_final_decision(finished):
    _, out, lineage = finished
    rows = _rows(out / "lineage.jsonl")
    assert len(rows) == len(lineage) == len(QUESTIONS) * 5  # each question and its 4 paths, once
    for row in rows:
        decisions = _decisions(row)
        drops = [d for d in decisions if not d[1]]
        if row["kept"]:
            assert not drops and decisions[-1][0] == ("agreement" if "/" in row["item_id"] else "dataset")
        else:
            assert len(drops) == 1 and decisions[-1] == drops[0], row
    kept_paths = {r["item_id"] for r in rows if "/" in r["item_id"] and r["kept"]}
    assert {r["item_id"] for r in _rows(out / "paths.jsonl")} == kept_paths
    assert pq.read_table(out / "paths.parquet").num_rows == len(kept_paths)


def test_stage_progress_equals_the_lineage_and_never_passes_its_total(finished):
    job, out, _ = finished
    rows = _rows(out / "lineage.jsonl")
    assert [s.stage for s in job.stages] == [s for s in STAGES if s != "review"]  # no review gate: nothing decided there
    for stage in job.stages:
        at = [d for r in rows for d in r["lineage"] if d["stage"] == stage.stage]
        assert stage.done == len(at) and stage.kept == sum(d["kept"] for d in at), stage.stage
        assert dict(stage.dropped_by_filter) == dict(Counter(d["filter"] for d in at if not d["kept"])), stage.stage
        if stage.HasField("total"):
            assert stage.done <= stage.total, stage.stage
    dataset = next(s for s in job.stages if s.stage == "dataset")
    assert dataset.total == len(QUESTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["stage"], int(s.get("done", 0))) for s in manifest["stages"]] == [(s.stage, s.done) for s in job.stages]


def test_the_summary_names_question_and_path_counts_separately(finished):
    _, out, _ = finished
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary == {"questions": 7, "kept_questions": 2, "paths": 28, "kept_paths": 6}
