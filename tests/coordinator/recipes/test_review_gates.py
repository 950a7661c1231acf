"""Review gates in each real recipe, against the recipes' deterministic service
DOUBLES (no model runs here; the real services run in the integration and e2e
tests): an item whose deciding score lies within the band of its threshold is
held, goes on through the recipe (Self-Instruct: until the end of its rounds), and waits for a decision at stage `review`;
a person (played here by a task writing to the store, as SubmitReviews does)
keeps or drops it; its lineage shows the person's decision, the dataset follows
it, and items outside the band end as they would without a gate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from autodidact.coordinator.recipes.base import REVIEW_FILTER, REVIEW_STAGE, Decision, JobContext, ReviewGate, StageResult, decide_reviews
from autodidact.coordinator.recipes.constitutional import Constitutional, ConstitutionalParams
from autodidact.coordinator.recipes.ids import DocumentId
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.recipes.self_consistency import SelfConsistency
from autodidact.coordinator.recipes.self_instruct import SelfInstruct
from autodidact.coordinator.recipes.toolformer import Toolformer
from autodidact.coordinator.records import Record
from autodidact.coordinator.store import JobStore, SqliteJobStore
from autodidact.v1 import common_pb2, coordinator_pb2, critic_pb2, dedup_pb2, generator_pb2, scorer_pb2
from tests.coordinator.recipes import test_constitutional, test_self_consistency, test_self_instruct_lineage, test_toolformer_errors
from tests.coordinator.recipes.harness import JOB, assert_lineage_agrees, job_context, run_recipe

pytestmark = pytest.mark.timeout(60)

# How long the person waits for the items it decides to be held and waiting, at most.
PERSON_PATIENCE_SECONDS = 20.0


@pytest.fixture(autouse=True)
def fast_review_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("autodidact.coordinator.recipes.base.REVIEW_POLL_SECONDS", 0.05)


def human(kept: bool) -> Decision:
    """A person's decision, as SubmitReviews stores it."""
    return Decision(
        kept, "" if kept else "human_review", reason=f"{'kept' if kept else 'dropped'} by t: n", decided_by="human", reviewer="t", note="n"
    )


async def held_at(store: JobStore, stage: str) -> set[str]:
    """The items whose decision at `stage` holds them for review."""
    held = set()
    for item_id, at, value in await store.results(JOB):
        decision = StageResult.from_json(value).decision
        if at == stage and decision is not None and decision.filter == REVIEW_FILTER:
            held.add(item_id)
    return held


@dataclass
class Person:
    """Plays the reviewer: waits until every item it decides is held at `stage` and its job
    is waiting for the review (so the wait itself is exercised, not only a stored decision
    found at once), then stores its decisions as SubmitReviews does (decide_reviews)."""

    stage: str
    decisions: dict[str, bool]
    held_when_deciding: set[str] = field(default_factory=set)

    async def __call__(self, store: JobStore, ctx: JobContext) -> None:
        wanted = set(self.decisions)
        give_up = time.monotonic() + PERSON_PATIENCE_SECONDS
        while True:
            held = await held_at(store, self.stage)
            waiting = set(ctx._awaiting_review)  # the items whose `review` is waiting now (a private field, read only)
            if wanted <= held and wanted <= waiting:
                break
            assert time.monotonic() < give_up, f"never held and waiting: {sorted(wanted - (held & waiting))}; held {sorted(held)}"
            await asyncio.sleep(0.01)
        self.held_when_deciding = held
        decided = await decide_reviews(store, JOB, {item_id: human(kept) for item_id, kept in self.decisions.items()})
        assert all(ours for _, ours in decided.values())


def run_reviewed(
    tmp_path: Path,
    services: dict[str, Any],
    recipe: Recipe[Any],
    params: Any,
    gate: ReviewGate,
    person: Callable[[JobStore, JobContext], Awaitable[None]] | None,
    max_in_flight: int = 2,
    max_error_fraction: float = 0.1,
) -> tuple[dict[str, Any], JobStore]:
    """Runs `recipe` once on a fresh store with `gate`, the person (if any) deciding concurrently in the same loop."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = SqliteJobStore(tmp_path / "jobs.sqlite")

    async def both() -> dict[str, Any]:
        await store.create_job(JOB, b"", "hash", 1)
        ctx = job_context(store, services, max_in_flight, max_error_fraction, review=gate)
        if person is None:
            return await recipe.run(ctx, params)
        summary, _ = await asyncio.gather(recipe.run(ctx, params), person(store, ctx))
        return summary

    return asyncio.run(both()), store


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.item_id: r for r in records}


def stages(record: Record) -> list[tuple[str, bool, str]]:
    return [(stage, d.kept, d.filter) for stage, d in record.lineage]


def reviewed(record: Record) -> Decision:
    return next(d for stage, d in record.lineage if stage == REVIEW_STAGE)


def assert_decided_by_the_person(record: Record, kept: bool) -> None:
    decision = reviewed(record)
    assert (decision.kept, decision.decided_by, decision.reviewer, decision.note) == (kept, "human", "t", "n"), record


def comparable(record: Record) -> tuple[str, bool, dict[str, Any], list[tuple[str, Decision]]]:
    return record.item_id, record.kept, record.data, record.lineage


# --- Constitutional: `judge` holds P(revision better) near the nearer edge of 0.5 ± min_margin ---

# Beside the double's labels: a prompt the judge only just decides (0.65, within 0.1 of the edge 0.6).
CONSTITUTIONAL_LABELS = {**test_constitutional.LABELS, "Slightly prefers the revision?": 0.65}


def constitutional_params() -> ConstitutionalParams:
    return ConstitutionalParams(
        prompts=list(CONSTITUTIONAL_LABELS),
        constitution=critic_pb2.ConstitutionRef(),
        rounds=1,
        judged_pairs=True,
        chain_of_thought=False,
        sampling=common_pb2.SamplingParams(),
        min_margin=0.1,
    )


@pytest.fixture
def constitutional_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_constitutional, "LABELS", CONSTITUTIONAL_LABELS)


@pytest.mark.usefixtures("constitutional_labels")
def test_constitutional_holds_labels_near_the_undecided_zone_and_follows_the_person(tmp_path):
    # p00001 (0.55, undecided alone) and p00004 (0.65, revision preferred alone) lie within 0.1 of their edge;
    # 0.2 and 0.9 do not, and p00003 (unrevised) is never judged.
    person = Person("judge", {"p00001": True, "p00004": False})
    gate = ReviewGate(0.1, 3600, False)
    summary, store = run_reviewed(
        tmp_path / "gated", {"critic": test_constitutional.CriticDouble()}, Constitutional(), constitutional_params(), gate, person
    )
    assert person.held_when_deciding == {"p00001", "p00004"}
    assert summary == {"prompts": 5, "kept": 3}
    records = by_id(assert_lineage_agrees(store, Constitutional(), summary))

    kept_on_review, dropped_on_review = records["p00001"], records["p00004"]
    assert stages(kept_on_review) == [("revise", True, ""), ("judge", True, REVIEW_FILTER), ("review", True, ""), ("dataset", True, "")]
    assert stages(dropped_on_review) == [("revise", True, ""), ("judge", True, REVIEW_FILTER), ("review", False, "human_review")]
    assert_decided_by_the_person(kept_on_review, True)
    assert_decided_by_the_person(dropped_on_review, False)
    judged = kept_on_review.lineage[1][1]
    assert "alone, the filter would drop it (undecided)" in judged.reason and judged.score == 0.55
    assert kept_on_review.data["review_hold"]["proposed_kept"] is False
    assert dropped_on_review.data["review_hold"]["proposed_kept"] is True

    pairs = {p["item_id"]: p for p in Constitutional().rows(list(records.values()))["preferences"]}
    assert sorted(pairs) == ["p00000", "p00001", "p00002"]  # the person's keep is in; their drop is out
    assert pairs["p00001"]["source"] == "judged" and pairs["p00001"]["probability_chosen"] == 0.55
    assert pairs["p00001"]["chosen"][0]["content"].startswith("revised")

    # Outside the band, everything is as without a gate.
    tmp_path.joinpath("plain").mkdir()
    plain_summary, plain_store = run_recipe(
        tmp_path / "plain", {"critic": test_constitutional.CriticDouble()}, Constitutional(), constitutional_params()
    )
    plain = by_id(assert_lineage_agrees(plain_store, Constitutional(), plain_summary))
    for item_id in ("p00000", "p00002", "p00003"):
        assert comparable(records[item_id]) == comparable(plain[item_id])
    assert not plain["p00001"].kept and plain["p00004"].kept  # what the filter alone decided


@pytest.mark.usefixtures("constitutional_labels")
@pytest.mark.parametrize("keep", [False, True])
def test_constitutional_items_nobody_reviews_follow_the_deadline_policy(tmp_path, keep):
    gate = ReviewGate(0.1, 0.3, keep)
    started = time.monotonic()
    summary, store = run_reviewed(
        tmp_path, {"critic": test_constitutional.CriticDouble()}, Constitutional(), constitutional_params(), gate, None
    )
    assert time.monotonic() - started >= 0.3
    records = by_id(assert_lineage_agrees(store, Constitutional(), summary))
    for item_id in ("p00001", "p00004"):
        decision = reviewed(records[item_id])
        assert (decision.kept, decision.decided_by, decision.filter) == (keep, "deadline", "" if keep else "review_deadline")
        assert records[item_id].kept == keep
    pairs = [p["item_id"] for p in Constitutional().rows(list(records.values()))["preferences"]]
    assert pairs == (["p00000", "p00001", "p00002", "p00004"] if keep else ["p00000", "p00002"])
    assert summary == {"prompts": 5, "kept": 4 if keep else 2}


# --- Self-consistency: `vote` holds a winner's share near min_confidence ---

ALL_AGREE = "All four agree?"
SC_QUESTIONS = [
    "Sam had 76 marbles and lost 26. How many are left?",  # q00000: 0.75, held (kept by the person)
    "Two of three agree?",  # q00001: 0.667, held (low_confidence alone; kept by the person)
    "Three of four agree?",  # q00002: 0.75, held (dropped by the person)
    "A tie: 7 or 8?",  # q00003: no winner, dropped at the vote: never held
    ALL_AGREE,  # q00004: 1.0, kept: far from the band
]


def self_consistency_params(tmp_path: Path) -> Any:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in SC_QUESTIONS))
    spec = coordinator_pb2.SelfConsistencySpec(questions_path=str(path), paths_per_question=4, min_confidence=0.7)
    return SelfConsistency().resolve(spec, JOB)


def self_consistency_services() -> dict[str, Any]:
    return {"generator": test_self_consistency.DoubleGenerator(), "scorer": test_self_consistency.InProcessScorer()}


def test_self_consistency_holds_vote_shares_near_min_confidence_and_a_drop_ends_the_paths(tmp_path, monkeypatch):
    monkeypatch.setitem(test_self_consistency.PATHS, ALL_AGREE, ["The answer is 2."] * 4)
    person = Person("vote", {"q00000": True, "q00001": True, "q00002": False})
    gate = ReviewGate(0.06, 3600, False)
    summary, store = run_reviewed(
        tmp_path / "gated", self_consistency_services(), SelfConsistency(), self_consistency_params(tmp_path), gate, person
    )
    assert person.held_when_deciding == {"q00000", "q00001", "q00002"}
    assert summary == {"questions": 5, "kept_questions": 3, "paths": 20, "kept_paths": 9}
    records = by_id(assert_lineage_agrees(store, SelfConsistency(), summary))

    held_stages = [("paths", True, ""), ("vote", True, REVIEW_FILTER)]
    for item_id in ("q00000", "q00001"):
        assert stages(records[item_id]) == [*held_stages, ("review", True, ""), ("dataset", True, "")]
        assert_decided_by_the_person(records[item_id], True)
    assert stages(records["q00002"]) == [*held_stages, ("review", False, "human_review")]
    assert_decided_by_the_person(records["q00002"], False)
    assert "alone, the filter would keep it" in records["q00002"].lineage[1][1].reason
    # The question the person dropped takes its agreeing paths with it; the one that disagreed says so.
    assert [stages(records[f"q00002/p{n:03d}"]) for n in range(4)] == [
        [("agreement", False, "human_review")],
        [("agreement", False, "human_review")],
        [("agreement", False, "disagrees")],
        [("agreement", False, "human_review")],
    ]
    # The low-confidence question the person kept keeps its agreeing paths.
    assert [records[f"q00001/p{n:03d}"].kept for n in range(4)] == [True, True, False, False]

    paths = SelfConsistency().rows(list(records.values()))["paths"]
    assert [p["item_id"] for p in paths] == [
        *(f"q00000/p{n:03d}" for n in range(3)),
        *(f"q00001/p{n:03d}" for n in range(2)),
        *(f"q00004/p{n:03d}" for n in range(4)),
    ]

    tmp_path.joinpath("plain").mkdir()
    plain_summary, plain_store = run_recipe(
        tmp_path / "plain", self_consistency_services(), SelfConsistency(), self_consistency_params(tmp_path)
    )
    plain = by_id(assert_lineage_agrees(plain_store, SelfConsistency(), plain_summary))
    outside = [i for i in plain if i.startswith(("q00003", "q00004"))]
    assert len(outside) == 10
    for item_id in outside:
        assert comparable(records[item_id]) == comparable(plain[item_id])
    assert [plain[q].kept for q in ("q00000", "q00001", "q00002")] == [True, False, True]  # what the filter alone decided


# --- Toolformer: `filter` holds calls whose L⁻ − L⁺ is near τf ---

# L⁻ − L⁺ per (document, candidate); τf is the calculator's 0.5. In doc00000 both calls are held: c00 (0.58) would win
# the position, but the person drops it, so c01 (0.52, kept by the person) is spliced. doc00001 is outside the band.
GAINS = {("doc00000", "c00"): 0.58, ("doc00000", "c01"): 0.52, ("doc00001", "c00"): 1.0, ("doc00001", "c01"): 0.2}


class GainScorer(test_toolformer_errors.ScorerDouble):
    """The errors test's scorer DOUBLE, with each call's gain from `gains`."""

    def __init__(self, gains: dict[tuple[str, str], float] = GAINS) -> None:
        super().__init__("no document holds this")
        self.gains = gains

    async def FilterToolCalls(self, request, timeout=None):
        decisions = []
        for c in request.candidates:
            parts = c.id.split("/")
            gain = self.gains[(parts[0], parts[-1])]
            lost = 1.0 + gain
            decisions.append(
                scorer_pb2.ToolCallDecision(
                    id=c.id,
                    keep=gain >= request.threshold,
                    loss_with_result=1.0,
                    loss_without_call=lost,
                    loss_minus=lost,
                    loss_without_result=lost,
                )
            )
        return scorer_pb2.FilterToolCallsResponse(decisions=decisions)


def toolformer_services() -> dict[str, Any]:
    return {
        "tool_executor": test_toolformer_errors.ToolsDouble(""),
        "scorer": GainScorer(),
        "generator": test_toolformer_errors.GeneratorDouble(),
    }


def call_id(document: int, number: int) -> str:
    text = test_toolformer_errors.DOCUMENTS[document]
    return str(DocumentId(document).tool("Calculator").position(text.index(",") + 1).call(number))


def test_toolformer_holds_calls_near_tau_and_a_dropped_call_competes_for_no_position(tmp_path):
    dropped, kept = call_id(0, 0), call_id(0, 1)
    person = Person("filter", {dropped: False, kept: True})
    gate = ReviewGate(0.1, 3600, False)
    summary, store = run_reviewed(
        tmp_path / "gated", toolformer_services(), Toolformer(), test_toolformer_errors.params(tmp_path), gate, person
    )
    assert person.held_when_deciding == {dropped, kept}
    assert summary == {"documents": 2, "augmented": 2}
    records = by_id(assert_lineage_agrees(store, Toolformer(), summary))

    held_stages = [("sample_call", True, ""), ("execute", True, ""), ("filter", True, REVIEW_FILTER)]
    assert stages(records[dropped]) == [*held_stages, ("review", False, "human_review")]
    assert stages(records[kept]) == [*held_stages, ("review", True, ""), ("splice", True, "")]
    assert_decided_by_the_person(records[dropped], False)
    assert_decided_by_the_person(records[kept], True)
    assert records["doc00000"].kept and [c["call"] for c in records["doc00000"].data["calls"]] == ["[Calculator(3+4) -> 7]"]
    assert records["doc00000/Calculator"].kept

    rows = Toolformer().rows(list(records.values()))
    assert [(r["item_id"], r["kept"], r["dropped_by"]) for r in rows["calls"] if r["item_id"].startswith("doc00000/")] == [
        (dropped, False, "human_review"),
        (kept, True, ""),
    ]
    assert "[Calculator(3+4) -> 7]" in rows["documents"][0]["text"] and "Calculator(2+3)" not in rows["documents"][0]["text"]

    tmp_path.joinpath("plain").mkdir()
    plain_summary, plain_store = run_recipe(
        tmp_path / "plain", toolformer_services(), Toolformer(), test_toolformer_errors.params(tmp_path)
    )
    plain = by_id(assert_lineage_agrees(plain_store, Toolformer(), plain_summary))
    outside = [i for i in plain if i.startswith("doc00001")]
    assert len(outside) == 4  # the document, its (document, tool) item and its two calls
    for item_id in outside:
        assert comparable(records[item_id]) == comparable(plain[item_id])
    # Alone, the filter kept both doc00000 calls and c00 won the position.
    assert stages(plain[dropped])[-1] == ("splice", True, "") and stages(plain[kept])[-1] == ("splice", False, "same_position")


# --- Self-Instruct: `diversity` holds candidates whose similarity is near the threshold ---


class SimilarityDedup(test_self_instruct_lineage.DedupDouble):
    """The lineage test's dedup DOUBLE, with each candidate's cosine similarity from `similarity` (others 0.1)."""

    def __init__(self, similarity: dict[str, float]) -> None:
        super().__init__()
        self.similarity = similarity

    async def FilterBatch(self, request, timeout=None):
        response = await super().FilterBatch(request, timeout)
        if request.batch_id.startswith("seeds-"):
            return response
        verdicts = []
        for item in request.items:
            similarity = self.similarity.get(item.id.removeprefix(f"{JOB}/"), 0.1)
            verdicts.append(dedup_pb2.DedupVerdict(id=item.id, kept=similarity < request.threshold, similarity=similarity))
        return dedup_pb2.FilterBatchResponse(verdicts=verdicts)


def run_self_instruct(
    tmp_path: Path,
    similarity: dict[str, float],
    person: Person | None,
    generator: type[test_self_instruct_lineage.GeneratorDouble] | None = None,
) -> tuple[dict[str, Any], JobStore]:
    """Target 2, threshold 0.9, three rounds in flight (round 0 reaches the target; rounds 1 and 2 are not needed); band 0.05."""
    dedup = SimilarityDedup(similarity)
    services = {"generator": (generator or test_self_instruct_lineage.GeneratorDouble)(dedup), "dedup": dedup}
    params = test_self_instruct_lineage.small_params()
    gate = ReviewGate(0.05, 3600, False)
    return run_reviewed(tmp_path, services, SelfInstruct(), params, gate, person, max_in_flight=test_self_instruct_lineage.WINDOW)


def without_review(record: Record) -> list[tuple[str, bool, str]]:
    """The record's stages but `review` (where Self-Instruct lists it is not what these tests are about)."""
    return [s for s in stages(record) if s[0] != REVIEW_STAGE]


SI_HELD = [("generate_instructions", True, ""), ("heuristics", True, ""), ("diversity", True, REVIEW_FILTER)]
SI_MADE = [("classify", True, ""), ("instances", True, "")]


def test_self_instruct_reviews_a_held_near_duplicate_before_its_instances_and_a_keep_joins_the_dataset(tmp_path):
    # r00000-00 (0.93: a near duplicate alone) is held; it does not count towards the target, which r00000-01 and
    # r00000-02 reach; at the end of the run it waits for the person, who keeps it: then its instances are made.
    person = Person("diversity", {"r00000-00": True})
    summary, store = run_self_instruct(tmp_path, {"r00000-00": 0.93}, person)
    assert person.held_when_deciding == {"r00000-00"}
    assert summary == {"last_round": 0, "rounds": 1, "kept": 3, "target_reached": True, "held_for_review": 1, "kept_on_review": 1}
    records = by_id(assert_lineage_agrees(store, SelfInstruct(), summary))

    assert stages(records["r00000-00"]) == [*SI_HELD, ("review", True, ""), *SI_MADE, ("dataset", True, "")]
    assert_decided_by_the_person(records["r00000-00"], True)
    assert "alone, the filter would drop it (similarity)" in records["r00000-00"].lineage[2][1].reason
    assert all(records[f"r00000-0{i}"].kept for i in range(3))
    for r in range(3):
        assert stages(records[f"r0000{r}-03"]) == [("generate_instructions", True, ""), ("heuristics", False, "too_short")]
    for r in (1, 2):
        assert all(stages(records[f"r0000{r}-0{i}"])[-1] == ("dataset", False, "over_target") for i in range(3))
    rows = SelfInstruct().rows(list(records.values()))
    assert sorted({r["item_id"] for r in rows["instances"]}) == ["r00000-00", "r00000-01", "r00000-02"]
    # Nothing is left waiting for a review once the job is done.
    reviewed_items = {item_id for item_id, stage, _ in asyncio.run(store.results(JOB)) if stage == REVIEW_STAGE}
    assert asyncio.run(held_at(store, "diversity")) == reviewed_items == {"r00000-00"}


def test_self_instruct_a_review_drop_is_final_and_a_round_not_needed_closes_its_reviews(tmp_path):
    # Round 0 holds r00000-00 and r00000-01, so only r00000-02 counts: round 1 reaches the target; round 2
    # (started, not needed) holds r00002-01, whose review closes as over_target without a person. (Not
    # r00002-00: the generator double answers round 0's instances only once topic 2-0 is classified.)
    person = Person("diversity", {"r00000-00": True, "r00000-01": False})
    summary, store = run_self_instruct(tmp_path, {"r00000-00": 0.93, "r00000-01": 0.86, "r00002-01": 0.88}, person)
    assert summary == {"last_round": 1, "rounds": 2, "kept": 3, "target_reached": True, "held_for_review": 2, "kept_on_review": 1}
    records = by_id(assert_lineage_agrees(store, SelfInstruct(), summary))
    assert stages(records["r00000-01"]) == [*SI_HELD, ("review", False, "human_review")] and not records["r00000-01"].kept
    assert_decided_by_the_person(records["r00000-01"], False)
    closed = reviewed(records["r00002-01"])
    assert not records["r00002-01"].kept and (closed.filter, closed.decided_by) == ("over_target", "")
    rows = SelfInstruct().rows(list(records.values()))
    assert {r["item_id"] for r in rows["instances"]} == {"r00000-00", "r00000-02", "r00001-00"}
    reviewed_items = {item_id for item_id, stage, _ in asyncio.run(store.results(JOB)) if stage == REVIEW_STAGE}
    assert asyncio.run(held_at(store, "diversity")) == reviewed_items


class NoInstancesForTopic01(test_self_instruct_lineage.GeneratorDouble):
    """Gives "Explain topic 0-1 …" only an empty output, so its instances are dropped (no_valid_instances)."""

    async def Generate(self, request, timeout=None):
        prompt = request.prompt.text
        if (
            not prompt.startswith("Come up with")
            and not prompt.endswith("Classification:")
            and "topic 0-1 " in prompt.rsplit("Task:", 1)[1]
        ):
            sample = common_pb2.Sample(text="\nOutput: ", finish_reason=common_pb2.FINISH_REASON_STOP)
            return generator_pb2.GenerateResponse(samples=[sample], model=common_pb2.ModelInfo(model="double.gguf"))
        return await super().Generate(request, timeout)


def test_self_instruct_a_held_candidate_kept_on_review_can_still_lose_its_instances(tmp_path):
    """Review comes before instances: a candidate the person keeps whose instances are all dropped ends there
    (one drop, the last), and its review is not left open."""
    person = Person("diversity", {"r00000-01": True})
    summary, store = run_self_instruct(tmp_path, {"r00000-01": 0.86}, person, NoInstancesForTopic01)
    records = by_id(assert_lineage_agrees(store, SelfInstruct(), summary))
    assert stages(records["r00000-01"])[-2:] == [("classify", True, ""), ("instances", False, "no_valid_instances")]
    assert summary["kept_on_review"] == 0 and summary["kept"] == 2
    reviewed_items = {item_id for item_id, stage, _ in asyncio.run(store.results(JOB)) if stage == REVIEW_STAGE}
    assert asyncio.run(held_at(store, "diversity")) == reviewed_items == {"r00000-01"}


# --- Slots: an item waiting for reviews gives back the one each_item slot it holds ---


class ConcurrencyGenerator(test_toolformer_errors.GeneratorDouble):
    """Counts the documents sampling calls at once (sample_call runs under no stage limit, only under each_item's)."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0

    async def Generate(self, request, timeout=None):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.2)
            return await super().Generate(request, timeout)
        finally:
            self.in_flight -= 1


def test_toolformer_a_document_waiting_for_several_reviews_gives_back_only_its_one_slot(tmp_path, monkeypatch):
    """Every review an item waits for gives back the one each_item slot the item holds, once: with max_in_flight 1,
    doc00000 waiting for its two held calls lets one other document run, not two (JobContext.reviews)."""
    documents = [*test_toolformer_errors.DOCUMENTS, "Joe ran 2 miles and walked 3 miles more, 5 miles in all."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    spec = coordinator_pb2.ToolformerSpec(documents_path=str(path), tools=["Calculator"], positions_per_document=1, calls_per_position=2)
    params = Toolformer().resolve(spec, JOB)
    gains = {**GAINS, ("doc00002", "c00"): 1.0, ("doc00002", "c01"): 0.2}  # doc00000's two calls are held, no other
    generator = ConcurrencyGenerator()
    services = {"tool_executor": test_toolformer_errors.ToolsDouble(""), "scorer": GainScorer(gains), "generator": generator}
    person = Person("filter", {call_id(0, 0): True, call_id(0, 1): True})
    summary, store = run_reviewed(tmp_path / "gated", services, Toolformer(), params, ReviewGate(0.1, 3600, False), person, max_in_flight=1)
    assert_lineage_agrees(store, Toolformer(), summary)
    assert summary == {"documents": 3, "augmented": 3}
    assert generator.most == 1, f"{generator.most} documents sampled calls at once, with max_in_flight 1"


# --- Toolformer: a document that errors after its calls were filtered (or held) ---


class TwoTools(test_toolformer_errors.ToolsDouble):
    """The errors test's tool-executor DOUBLE, with a Calendar tool beside the calculator."""

    async def ListTools(self, request, timeout=None):
        listed = await super().ListTools(request, timeout)
        listed.tools.add(name="Calendar", few_shot_prompt="Calendar: {text}\nOutput:", prompt_version="v1", takes_input=False)
        return listed


class RefusesAnnsCalendar(GainScorer):
    """Refuses (INVALID_ARGUMENT) the Calendar positions of doc00001 ("Ann paid …"), after its Calculator calls were filtered."""

    async def MarkerProbabilities(self, request, timeout=None):
        if request.prompt.startswith("Calendar:") and "Ann" in request.text:
            raise test_toolformer_errors.refused("text: refused by the double")
        return await super().MarkerProbabilities(request, timeout)


def test_toolformer_calls_past_the_filter_of_a_document_that_errors_later_end_with_it_and_close_their_reviews(tmp_path):
    """When a later tool of a document is refused, the calls an earlier tool's filter kept or held end with the
    document (filter `error` at splice), a held one's review closed by the error: none is missing from lineage
    (c01 is kept outside the band) and none awaits review forever (c00 is held)."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in test_toolformer_errors.DOCUMENTS))
    spec = coordinator_pb2.ToolformerSpec(
        documents_path=str(path), tools=["Calculator", "Calendar"], positions_per_document=1, calls_per_position=2
    )
    params = Toolformer().resolve(spec, JOB)
    gains = {**GAINS, ("doc00001", "c00"): 0.55, ("doc00001", "c01"): 1.0}  # doc00001: c00 held, c01 kept
    services = {"tool_executor": TwoTools(""), "scorer": RefusesAnnsCalendar(gains), "generator": test_toolformer_errors.GeneratorDouble()}
    # doc00000's calls (0.58, 0.52) are held too: the person keeps them, so that its document finishes.
    person = Person("filter", {call_id(0, 0): True, call_id(0, 1): True})
    gate = ReviewGate(0.1, 3600, False)
    summary, store = run_reviewed(tmp_path / "gated", services, Toolformer(), params, gate, person, max_error_fraction=0.6)
    assert summary == {"documents": 2, "augmented": 1}
    records = by_id(assert_lineage_agrees(store, Toolformer(), summary))
    for number in range(2):
        assert stages(records[call_id(1, number)])[-1][2] == "error"
    reviewed_items = {item_id for item_id, stage, _ in asyncio.run(store.results(JOB)) if stage == REVIEW_STAGE}
    assert asyncio.run(held_at(store, "filter")) <= reviewed_items
