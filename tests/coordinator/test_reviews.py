"""Review gates: items whose deciding score lies within the band of the threshold
wait for a person while the rest of the job goes on, ListReviews shows them,
SubmitReviews records decisions (the first stands), the deadline applies the
job's policy, and a coordinator that stops mid-review loses no decision.

On the real SQLite store, with a DOUBLE recipe (labelled: no model runs here):
item i scores i/10 at stage `work` against a threshold of 0.5, and is kept
at `dataset` unless its review dropped it. The review file formats of
`autodidact review` are checked here too (reviews.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from autodidact import reviews
from autodidact.coordinator import jobs
from autodidact.coordinator.jobs import JobManager, review_gate
from autodidact.coordinator.recipes import registry
from autodidact.coordinator.recipes.base import (
    ERROR_FILTER,
    REVIEW_FILTER,
    REVIEW_STAGE,
    Decision,
    JobContext,
    ReviewGate,
    Services,
    StageResult,
    decide_reviews,
)
from autodidact.coordinator.recipes.recipe import DecidingScore, Recipe
from autodidact.coordinator.records import Record
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import SqliteJobStore
from autodidact.errors import FailedPrecondition, InvalidArgument
from autodidact.v1 import coordinator_pb2
from autodidact.validation import MAX_REVIEW_NOTE_CHARS
from tests.coordinator.test_jobs import DoubleGenerator, dataset
from tests.lineage import assert_lineage_agrees, read_jsonl

THRESHOLD = 0.5
SCHEMA = pa.schema((("item_id", pa.string()), ("score", pa.float64())))


@dataclass(frozen=True)
class Params:
    items: int


class ReviewedRecipe(Recipe[Params]):
    """A DOUBLE recipe (answers to spec.self_consistency): item i scores i/10 at `work`; a held item waits for its review."""

    name = "self_consistency"
    stages = ("work", "review", "dataset")
    services = ()
    tables: ClassVar[dict[str, pa.Schema]] = {"scores": SCHEMA}

    def resolve(self, spec: Any, job_id: str) -> Params:
        return Params(spec.max_questions or 10)

    def deciding_scores(self, spec: Any) -> tuple[DecidingScore, ...]:
        return (DecidingScore("work", "i/10", (THRESHOLD,), "at or above"),)

    async def run(self, ctx: JobContext, params: Params) -> dict[str, Any]:
        async def item(index: int) -> bool:
            item_id = f"i{index:02d}"
            score = index / 10

            async def compute() -> StageResult:
                kept = score >= THRESHOLD
                result = StageResult({"text": f"item {index}"}, Decision(kept, "" if kept else "low", score=score, reason=f"{score:g}"))
                return ctx.held(result, score - THRESHOLD, THRESHOLD)

            worked = await ctx.stage(item_id, "work", compute)
            assert worked.decision is not None
            if not worked.decision.kept or (worked.decision.filter == REVIEW_FILTER and not (await ctx.review(item_id)).kept):
                return False
            await ctx.stage(item_id, "dataset", lambda: _ready(StageResult({"score": score}, Decision(True))))
            return True

        kept = await ctx.each_item(params.items, item)
        return {"kept": sum(kept)}

    def belongs(self, summary: dict[str, Any]) -> Any:
        return lambda item_id: True

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return {"scores": [{"item_id": r.item_id, "score": r.data["score"]} for r in records if r.kept]}


async def _ready(result: StageResult) -> StageResult:
    return result


def spec(band: float = 0.15, deadline: int = 3600, keep: bool = False) -> coordinator_pb2.JobSpec:
    value = coordinator_pb2.JobSpec(self_consistency=coordinator_pb2.SelfConsistencySpec(max_questions=10), max_in_flight=2)
    value.review.band = band
    value.review.deadline_seconds = deadline
    value.review.on_deadline = coordinator_pb2.REVIEW_POLICY_KEEP if keep else coordinator_pb2.REVIEW_POLICY_DROP
    return value


def new_manager(tmp_path: Path) -> tuple[JobManager, SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    services = Services(DoubleGenerator(), None, None, None, None, patience_seconds=1)  # type: ignore[arg-type]
    return JobManager(store, services, TenantStorage(tmp_path)), store


@pytest.fixture(autouse=True)
def reviewed_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.RECIPES, "self_consistency", ReviewedRecipe())
    monkeypatch.setattr("autodidact.coordinator.recipes.base.REVIEW_POLL_SECONDS", 0.05)


async def awaiting(manager: JobManager, job_id: str, count: int) -> coordinator_pb2.Job:
    """The job once `count` items await review and every other item is decided."""
    for _ in range(400):
        job = await manager.get(job_id)
        work = next((s for s in job.stages if s.stage == "work"), None)
        dataset_done = next((s.done for s in job.stages if s.stage == "dataset"), 0)
        # Items 7, 8 and 9 are kept without review; 4, 5 and 6 are held.
        if job.awaiting_review == count and work is not None and work.done == 10 and dataset_done == 3:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {count} awaiting review: {job}")


async def finish(manager: JobManager, job_id: str) -> coordinator_pb2.Job:
    return [job async for job in manager.watch(job_id)][-1]


def review(item_id: str, kept: bool, note: str = "", reviewer: str = "ann") -> coordinator_pb2.ItemReview:
    return coordinator_pb2.ItemReview(item_id=item_id, kept=kept, reviewer=reviewer, note=note)


async def test_held_items_wait_while_the_rest_finish_and_people_decide_them(tmp_path: Path) -> None:
    manager, store = new_manager(tmp_path)
    await manager.submit("j", spec())
    # 0.4, 0.5 and 0.6 lie within 0.15 of 0.5; with two items in flight, the other seven finished anyway.
    job = await awaiting(manager, "j", 3)
    assert job.state == coordinator_pb2.JOB_STATE_RUNNING

    listed = await manager.list_reviews("j", 2, "")
    assert [item.item_id for item in listed.items] == ["i04", "i05"] and listed.next_page_token
    rest = await manager.list_reviews("j", 2, listed.next_page_token)
    assert [item.item_id for item in rest.items] == ["i06"] and not rest.next_page_token
    first = listed.items[0]
    assert (first.stage, first.score, first.threshold, first.proposed_kept) == ("work", 0.4, THRESHOLD, False)
    assert dict(first.data) == {"text": "item 4"} and rest.HasField("deadline")

    answer = await manager.submit_reviews("j", [review("i04", True, "reads fine"), review("i05", False, "off topic"), review("i00", True)])
    outcomes = [(r.item_id, r.outcome) for r in answer.results]
    assert outcomes == [
        ("i04", coordinator_pb2.REVIEW_OUTCOME_RECORDED),
        ("i05", coordinator_pb2.REVIEW_OUTCOME_RECORDED),
        ("i00", coordinator_pb2.REVIEW_OUTCOME_NOT_AWAITING),  # dropped by its filter, never held
    ]
    assert answer.awaiting_review == 1
    again = await manager.submit_reviews("j", [review("i05", True)])  # the first decision stands
    assert again.results[0].outcome == coordinator_pb2.REVIEW_OUTCOME_ALREADY_DECIDED and not again.results[0].kept
    await manager.submit_reviews("j", [review("i06", True)])

    job = await finish(manager, "j")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED and job.awaiting_review == 0
    out = dataset(tmp_path, "j")
    assert_lineage_agrees(job, out)
    rows = {row["item_id"]: row for row in read_jsonl(out / "lineage.jsonl")}
    decided = next(d for d in rows["i05"]["lineage"] if d["stage"] == REVIEW_STAGE)
    assert decided == {
        "stage": "review",
        "kept": False,
        "filter": "human_review",
        "reason": "dropped by ann: off topic",
        "decided_by": "human",
        "reviewer": "ann",
        "note": "off topic",
    }
    assert (
        rows["i04"]["lineage"][0]["filter"] == REVIEW_FILTER
        and "alone, the filter would drop it (low)" in rows["i04"]["lineage"][0]["reason"]
    )
    assert [row["item_id"] for row in read_jsonl(out / "scores.jsonl")] == ["i04", "i06", "i07", "i08", "i09"]
    await manager.close()
    await store.close()


async def test_a_coordinator_stopped_mid_review_loses_no_decision(tmp_path: Path) -> None:
    manager, store = new_manager(tmp_path)
    await manager.submit("j", spec())
    await awaiting(manager, "j", 3)
    await manager.submit_reviews("j", [review("i04", False, "no")])
    await manager.close()  # the job task stops where it waits, as in a crash: RUNNING, its lease released
    await store.close()

    manager, store = new_manager(tmp_path)  # a new coordinator on the same store
    await manager.resume_unfinished()
    await awaiting(manager, "j", 2)
    assert [item.item_id for item in (await manager.list_reviews("j", 10, "")).items] == ["i05", "i06"]
    resent = await manager.submit_reviews("j", [review("i04", True), review("i05", True), review("i06", True)])
    assert [r.outcome for r in resent.results] == [
        coordinator_pb2.REVIEW_OUTCOME_ALREADY_DECIDED,
        coordinator_pb2.REVIEW_OUTCOME_RECORDED,
        coordinator_pb2.REVIEW_OUTCOME_RECORDED,
    ]
    job = await finish(manager, "j")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED
    kept = [row["item_id"] for row in read_jsonl(dataset(tmp_path, "j") / "scores.jsonl")]
    assert kept == ["i05", "i06", "i07", "i08", "i09"]
    await manager.close()
    await store.close()


@pytest.mark.parametrize(("keep", "expected"), [(False, ["i05", "i07", "i08", "i09"]), (True, ["i04", "i05", "i06", "i07", "i08", "i09"])])
async def test_items_unreviewed_at_the_deadline_follow_the_jobs_policy(tmp_path: Path, keep: bool, expected: list[str]) -> None:
    manager, store = new_manager(tmp_path)
    await manager.submit("j", spec(deadline=2, keep=keep))
    await awaiting(manager, "j", 3)
    await manager.submit_reviews("j", [review("i05", True)])
    job = await finish(manager, "j")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED
    out = dataset(tmp_path, "j")
    assert_lineage_agrees(job, out)
    assert [row["item_id"] for row in read_jsonl(out / "scores.jsonl")] == expected
    by_deadline = next(d for d in read_jsonl(out / "lineage.jsonl")[4]["lineage"] if d["stage"] == REVIEW_STAGE)
    assert by_deadline["decided_by"] == "deadline" and by_deadline["kept"] == keep
    await manager.close()
    await store.close()


async def test_bad_reviews_are_refused_naming_the_field(tmp_path: Path) -> None:
    manager, store = new_manager(tmp_path)
    await manager.submit("j", spec())
    await awaiting(manager, "j", 3)
    cases = [
        ([], "reviews"),
        ([review("i04", True), review("i04", False)], "reviews[1].item_id"),
        ([review("", True)], "reviews[0].item_id"),
        ([review("i04", True, reviewer="a\nb")], "reviews[0].reviewer"),
        ([review("i04", True, note="n" * (MAX_REVIEW_NOTE_CHARS + 1))], "reviews[0].note"),
    ]
    for sent, field in cases:
        with pytest.raises(InvalidArgument) as refused:
            await manager.submit_reviews("j", sent)
        assert refused.value.field == field
    with pytest.raises(InvalidArgument, match="page_token"):
        await manager.list_reviews("j", 10, "not-a-token")
    # Nothing of the refused calls was recorded.
    assert (await manager.get("j")).awaiting_review == 3
    await manager.submit("plain", coordinator_pb2.JobSpec(self_consistency=coordinator_pb2.SelfConsistencySpec(max_questions=2)))
    with pytest.raises(FailedPrecondition, match="no review gate"):
        await manager.submit_reviews("plain", [review("i00", True)])
    await manager.close()
    await store.close()


def test_a_review_gate_needs_a_score_to_hold_by_and_bounds() -> None:
    registry_constitutional = coordinator_pb2.JobSpec(constitutional=coordinator_pb2.ConstitutionalSpec(prompts_path="inline:p"))
    registry_constitutional.review.band = 0.1
    with pytest.raises(InvalidArgument) as refused:
        review_gate(registry_constitutional)  # without judged_pairs nothing is scored
    assert refused.value.field == "spec.review.band"
    registry_constitutional.constitutional.judged_pairs = True
    assert review_gate(registry_constitutional) == ReviewGate(0.1, 86_400.0, False)
    registry_constitutional.review.deadline_seconds = jobs.MAX_REVIEW_DEADLINE_SECONDS + 1
    with pytest.raises(InvalidArgument) as refused:
        review_gate(registry_constitutional)
    assert refused.value.field == "spec.review.deadline_seconds"
    assert review_gate(coordinator_pb2.JobSpec(constitutional=coordinator_pb2.ConstitutionalSpec())) is None


def test_held_keeps_a_borderline_item_going_and_says_what_the_filter_proposed() -> None:
    services = Services(None, None, None, None, None)  # type: ignore[arg-type]
    ctx = JobContext("j", 0, None, services, 1, lambda: None, review=ReviewGate(0.1, 60, False))  # type: ignore[arg-type]
    dropped = StageResult({"nearest": "x"}, Decision(False, "similarity", score=0.93, reason="cosine 0.93"))
    held = ctx.held(dropped, 0.93 - 0.9, 0.9)
    assert held.decision == Decision(
        True, REVIEW_FILTER, 0.93, "held for review (within 0.1 of 0.9); alone, the filter would drop it (similarity): cosine 0.93"
    )
    assert held.data == {
        "nearest": "x",
        "review_hold": {"proposed_kept": False, "filter": "similarity", "threshold": 0.9, "reason": "cosine 0.93"},
    }
    assert ctx.held(dropped, 0.93 - 0.8, 0.8) is dropped  # outside the band
    errored = StageResult({}, Decision(False, ERROR_FILTER, score=0.9, reason="refused"))
    assert ctx.held(errored, 0.0, 0.9) is errored  # an error is never a judgement call
    no_gate = JobContext("j", 0, None, services, 1, lambda: None)  # type: ignore[arg-type]
    assert no_gate.held(dropped, 0.0, 0.9) is dropped


def test_label_studio_tasks_and_their_exports_round_trip(tmp_path: Path) -> None:
    item = coordinator_pb2.ReviewItem(item_id="q00001", stage="vote", score=0.5, threshold=0.6, proposed_kept=False, reason="2 of 4")
    item.data.update({"question": "How many <b>apples</b>?", "winner": "4"})
    task = reviews.label_studio_task(item, "job")
    assert task["data"]["item_id"] == "q00001" and task["data"]["proposed"] == "drop"
    assert sorted(task["data"]["text"].splitlines()) == ["question: How many <b>apples</b>?", "winner: 4"]
    assert task["predictions"][0]["result"][0]["value"] == {"choices": ["drop"]}
    annotation = {
        "completed_by": {"email": "ann@example.com"},
        "result": [
            {"from_name": "decision", "to_name": "item", "type": "choices", "value": {"choices": ["keep"]}},
            {"from_name": "note", "to_name": "item", "type": "textarea", "value": {"text": ["fine"]}},
        ],
    }
    exported = tmp_path / "export.json"
    unannotated = {"id": 2, "data": {**task["data"], "item_id": "q00002"}, "annotations": []}
    cancelled = {"id": 3, "data": {**task["data"], "item_id": "q00003"}, "annotations": [{**annotation, "was_cancelled": True}]}
    exported.write_text(json.dumps([{"id": 1, **task, "annotations": [annotation]}, unannotated, cancelled]))
    assert reviews.read_decisions(exported, "", "job") == [reviews.Decided("q00001", True, "ann@example.com", "fine")]
    assert reviews.read_decisions(exported, "bob", "job")[0].reviewer == "bob"
    with pytest.raises(reviews.ReviewFileError, match="task 1: is of job 'job', not 'other'"):
        reviews.read_decisions(exported, "", "other")

    lines = tmp_path / "decisions.jsonl"
    lines.write_text('{"item_id": "a", "kept": false, "note": "dup"}\n\n{"item_id": "b", "kept": true, "reviewer": "cy"}\n')
    assert reviews.read_decisions(lines, "dee", "job") == [reviews.Decided("a", False, "dee", "dup"), reviews.Decided("b", True, "cy", "")]
    for bad, message in [
        ('{"item_id": "a", "kept": "yes"}\n', "line 1"),
        ("[1, 2]", "task 1"),
        ('[{"data": {"item_id": "a"}, "annotations": [{"result": []}]}]', "neither keep nor drop"),
        ("", "holds no decision"),
        ('{"item_id": "a", "kept": true}\n{"item_id": "a", "kept": false}\n', "item 'a' is decided twice"),
        ('{"item_id": "a", "kept": true, "note": "' + "n" * 4097 + '"}\n', "the note is at most 4,096 characters"),
        ('{"item_id": "a", "kept": true, "reviewer": "a\\tb"}\n', "printable characters"),
        ('{"item_id": "", "kept": true}\n', "1 to 256 characters"),
    ]:
        lines.write_text(bad)
        with pytest.raises(reviews.ReviewFileError, match=message.replace("(", r"\(")):
            reviews.read_decisions(lines, "", "job")


async def test_a_waiting_item_gives_its_slot_back(tmp_path: Path) -> None:
    """With one item in flight, item 0 waiting for a review does not stop items 1 to 3."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    services = Services(None, None, None, None, None)  # type: ignore[arg-type]
    ctx = JobContext("j", 0, store, services, 1, lambda: None, review=ReviewGate(1.0, 60, False))
    finished: list[int] = []

    async def item(index: int) -> bool:
        if index == 0:
            decision = await ctx.review("i0")
            finished.append(index)
            return decision.kept
        finished.append(index)
        return True

    running = asyncio.create_task(ctx.each_item(4, item))
    started = time.monotonic()
    while finished != [1, 2, 3]:
        assert time.monotonic() - started < 5, f"the other items did not go on: {finished}"
        await asyncio.sleep(0.01)
    await decide_reviews(store, "j", {"i0": Decision(True, decided_by="human")})  # as SubmitReviews stores it
    assert await asyncio.wait_for(running, 5) == [True, True, True, True]
    assert finished == [1, 2, 3, 0]
    await store.close()


async def test_a_stopped_run_leaves_no_review_poll_behind(tmp_path: Path) -> None:
    """A run cancelled while items wait (a cancel, a lost lease) closes its context: nothing
    it left decides those items later, so a retried run or another replica meets them undecided."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    services = Services(None, None, None, None, None)  # type: ignore[arg-type]
    ctx = JobContext("j", 0, store, services, 2, lambda: None, review=ReviewGate(1.0, 0.3, False))

    async def item(index: int) -> bool:
        return (await ctx.review(f"i{index}")).kept

    running = asyncio.create_task(ctx.each_item(2, item))
    while len(ctx._awaiting_review) < 2:
        await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    ctx.close()
    await asyncio.sleep(0.6)  # past the 0.3 s deadline a leftover poll would have decided them
    assert await store.get_results("j", ["i0", "i1"], REVIEW_STAGE) == {}
    assert await store.get_values("j", ["review/i0", "review/i1"]) == {}
    await store.close()
