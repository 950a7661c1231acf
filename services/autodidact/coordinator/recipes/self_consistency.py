"""Self-consistency and LMSI (Wang et al. 2022, arXiv 2203.11171; Huang et al.
2022, arXiv 2210.11610; ALGORITHMS.md §4).

For each unlabelled question: m reasoning paths sampled with a few-shot
chain-of-thought prompt; the scorer extracts every path's answer (the last
one it states) and votes; a question has a winner when one answer has more
votes than any other and at least min_votes of them. When the winner's share
also reaches the minimum confidence, every path that agrees is kept and
becomes LMSI's four training examples.

Item ids: "q00012" for a question, "q00012/p031" for its 32nd path. A
question is decided at "vote" (no_answer, no_majority) or "dataset"
(low_confidence or kept); each of its paths at "agreement", after its
question. Samples are seeded from (job seed, question), so a resumed job
repeats exactly.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from autodidact.coordinator.recipes.base import REVIEW_FILTER, Decision, JobContext, StageResult, derive_seed
from autodidact.coordinator.recipes.formats import check_item_count, json_lines, read_input
from autodidact.coordinator.recipes.ids import PathId, QuestionId
from autodidact.coordinator.recipes.recipe import DecidingScore, PromptCheck, Recipe
from autodidact.coordinator.records import Record
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2, scorer_pb2
from autodidact.validation import check_range

# A path's only (and final) stage is "agreement"; a question's final one is "dataset".
STAGES = ("paths", "vote", "review", "agreement", "dataset")
TEMPLATE_VERSION = "self_consistency/v1"
MAX_QUESTIONS = 100_000
SAMPLES_PER_CALL = 64  # the generator's default bound on n
CALL_SECONDS = 1800.0
DEFAULT_MIN_VOTES = 2
ANSWER_QUOTE_CHARS = 40  # answers are model text: reasons quote them shortened

PATH_SCHEMA = pa.schema(
    (
        ("item_id", pa.string()),
        ("question", pa.string()),
        ("path", pa.string()),
        ("answer", pa.string()),
        ("confidence", pa.float64()),
        ("seed", pa.int64()),
    )
)
LMSI_SCHEMA = pa.schema((("item_id", pa.string()), ("format", pa.string()), ("prompt", pa.string()), ("completion", pa.string())))


class SelfConsistency(Recipe["SelfConsistencyParams"]):
    """The declared task; the parts below are its input loading, prompts, run and export."""

    name = "self_consistency"
    stages = STAGES
    # A question is decided at "dataset" (or dropped at "vote"); each of its paths at "agreement".
    final_stages = ("dataset", "agreement")
    services = ("generator", "scorer")
    tables: ClassVar[dict[str, pa.Schema]] = {"paths": PATH_SCHEMA, "lmsi": LMSI_SCHEMA}
    inputs = ("questions_path",)

    def resolve(self, spec: coordinator_pb2.SelfConsistencySpec, job_id: str) -> SelfConsistencyParams:
        return resolve_params(spec, f"spec.{self.name}")

    def item_count(self, params: SelfConsistencyParams) -> int:
        return len(params.questions)

    def deciding_scores(self, spec: coordinator_pb2.SelfConsistencySpec) -> tuple[DecidingScore, ...]:
        return (DecidingScore("vote", "vote share of the winning answer", (spec.min_confidence,), "at or above"),)

    def prompts(self, params: SelfConsistencyParams) -> Iterable[PromptCheck]:
        """The longest question's chain-of-thought prompt: if it fits, every question's does."""
        if params.questions:
            number, longest = max(enumerate(params.questions, 1), key=lambda q: len(q[1].text))
            yield f"spec.{self.name}.questions_path (question {number})", cot_prompt(longest.text), params.sampling.max_tokens

    async def run(self, ctx: JobContext, params: SelfConsistencyParams) -> dict[str, Any]:
        return await SelfConsistencyRun(ctx, params).run()

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        return lambda item_id: QuestionId.matches(item_id) or PathId.matches(item_id)

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return export_rows(records)


# --- prompts ---


# Worked examples of our own, in the paper's "Q: ... A: ... The answer is N." shape.
EXAMPLES = (
    (
        "A baker made 24 muffins and sold 15 of them. How many muffins are left?",
        "The baker started with 24 muffins and sold 15, so 24 - 15 = 9 muffins are left.",
        "9",
    ),
    ("Each bag holds 6 oranges. How many oranges are in 7 bags?", "There are 7 bags with 6 oranges each, so 7 * 6 = 42 oranges.", "42"),
    (
        "Maria has 3 boxes of 12 pencils and gives away 10 pencils. How many pencils does she have now?",
        "She had 3 * 12 = 36 pencils. After giving away 10 she has 36 - 10 = 26.",
        "26",
    ),
    ("A rope 45 meters long is cut into 5 equal pieces. How long is each piece?", "Each piece is 45 / 5 = 9 meters long.", "9"),
)


def cot_prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: {reasoning} The answer is {answer}.\n\n" for q, reasoning, answer in EXAMPLES)
    return f"{shots}Q: {question}\nA:"


def direct_prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: The answer is {answer}.\n\n" for q, _, answer in EXAMPLES)
    return f"{shots}Q: {question}\nA:"


# --- input loading ---


@dataclass(frozen=True)
class Question:
    text: str
    reference: str  # the dataset's answer when it has one (never used to filter)


@dataclass(frozen=True)
class SelfConsistencyParams:
    questions: list[Question]
    paths: int
    method: scorer_pb2.VoteMethod.ValueType
    answer_pattern: str
    min_confidence: float
    sampling: common_pb2.SamplingParams
    min_votes: int = DEFAULT_MIN_VOTES


def load_questions(path: Path, field: str, limit: int = 0) -> list[Question]:
    """GSM8K JSONL ("question", "answer" ending "#### N"), SVAMP JSON ("Body",
    "Question", "Answer"), or JSONL with a "question" field."""
    lines = read_input(path, field)
    first = next((line for line in lines if line[1].strip()), None)
    if first is not None and first[1].lstrip().startswith("["):
        # SVAMP's one JSON document is parsed whole (bounded by the tenant's upload size); JSONL streams.
        text = first[1] + "".join(line for _, line in lines)
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(field, f"is not a valid JSON list: {str(exc)[:200]}") from None
        if not isinstance(document, list):
            raise InvalidArgument(field, "is not a JSON list")
        rows = list(enumerate(document, 1))
    else:
        rows = json_lines(itertools.chain([first] if first else [], lines), field)
    questions = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise InvalidArgument(field, f"item {number} is not an object")
        if "Body" in row and "Question" in row:  # SVAMP
            question = f"{row['Body'].strip()} {row['Question'].strip()}"
            reference = str(row.get("Answer", ""))
        elif "question" in row:  # GSM8K or plain
            question = str(row["question"]).strip()
            reference = str(row.get("answer", "")).rpartition("####")[2].strip()
        else:
            raise InvalidArgument(field, f'item {number} has neither "question" nor SVAMP\'s "Body" and "Question"')
        if not question:
            raise InvalidArgument(field, f"item {number}: the question is empty")
        questions.append(Question(question, reference))
        if limit and len(questions) == limit:
            break
    check_item_count(field, questions, "questions", MAX_QUESTIONS)
    return questions


def resolve_params(spec: coordinator_pb2.SelfConsistencySpec, field: str) -> SelfConsistencyParams:
    """The spec with every default filled in, validated; its questions read."""
    if not spec.questions_path:
        raise InvalidArgument(f"{field}.questions_path", "is required")
    check_range(f"{field}.max_questions", spec.max_questions, 0, MAX_QUESTIONS)
    questions = load_questions(Path(spec.questions_path), f"{field}.questions_path", spec.max_questions)
    paths = spec.paths_per_question if spec.HasField("paths_per_question") else 32
    check_range(f"{field}.paths_per_question", paths, 1, 256)
    check_range(f"{field}.min_confidence", spec.min_confidence, 0.0, 1.0)
    min_votes = spec.min_votes if spec.HasField("min_votes") else DEFAULT_MIN_VOTES
    if not 1 <= min_votes <= paths:
        default = "" if spec.HasField("min_votes") else " (the default)"
        raise InvalidArgument(f"{field}.min_votes", f"must be between 1 and paths_per_question ({paths:,}), got {min_votes:,}{default}")
    compile_pattern(spec.answer_pattern or DEFAULT_ANSWER_PATTERN, f"{field}.answer_pattern")
    sampling = sampling_with_defaults(
        spec.sampling, common_pb2.SamplingParams(temperature=0.7, top_k=40, max_tokens=256, stop=["\nQ:", "\n\n"]), f"{field}.sampling"
    )
    return SelfConsistencyParams(
        questions, int(paths), spec.vote_method, spec.answer_pattern, spec.min_confidence, sampling, int(min_votes)
    )


# --- orchestration ---


class SelfConsistencyRun:
    """One job's run: each question's paths sampled, voted on, and every path and question decided."""

    def __init__(self, ctx: JobContext, params: SelfConsistencyParams) -> None:
        self.ctx = ctx
        self.params = params
        self.paths = self.kept_paths = 0  # counted as each question is decided (or replayed), for the summary

    async def run(self) -> dict[str, Any]:
        kept = await self.ctx.each_item(len(self.params.questions), self._question)
        return {"questions": len(kept), "kept_questions": sum(kept), "paths": self.paths, "kept_paths": self.kept_paths}

    async def _question(self, index: int) -> bool:
        question_id = QuestionId(index)
        item = str(question_id)
        question = self.params.questions[index]
        sampled = await self.ctx.stage(item, "paths", lambda: self._paths(index, question))
        verdict = await self.ctx.stage(item, "vote", lambda: self._vote(question, sampled.data["paths"]))
        voted = verdict.decision
        assert voted is not None
        winner, confidence = verdict.data["winner"], verdict.data["confidence"]
        final = None  # the question's decision at "dataset"; none when the vote or a review dropped it
        ending = None  # what ended the question, for its paths: `final`, or a review's drop
        if voted.filter == REVIEW_FILTER:  # its vote share was within the review band of min_confidence
            reviewed = await self.ctx.review(item)
            if reviewed.kept:
                final = Decision(True, score=confidence, reason=f"{confidence:.2f} of answers agree on {_quote(winner)}; {reviewed.reason}")
            else:
                ending = reviewed
        elif voted.kept:
            if confidence < self.params.min_confidence:
                final = Decision(
                    False,
                    "low_confidence",
                    score=confidence,
                    reason=f"{confidence:.2f} of answers agree; minimum {self.params.min_confidence:g}",
                )
            else:
                final = Decision(True, score=confidence, reason=f"{confidence:.2f} of answers agree on {_quote(winner)}")
        # Paths first, then the question: a restart in between records the rest (each decision is a pure function of stored results).
        for number, (path, answer) in enumerate(zip(sampled.data["paths"], verdict.data["answers"], strict=True)):
            path_item = str(question_id.path(number))
            decision = self._path_decision(answer, winner, confidence, voted, final or ending)
            if await self.ctx.stored(path_item, "agreement") is None:
                data = {"question": question.text, "path": path["text"], "answer": answer, "seed": path["seed"], "confidence": confidence}
                await self.ctx.record(path_item, "agreement", StageResult(data, decision))
            self.paths += 1
            self.kept_paths += decision.kept
        if final is not None and await self.ctx.stored(item, "dataset") is None:
            await self.ctx.record(
                item,
                "dataset",
                StageResult(
                    {"question": question.text, "winner": winner, "confidence": confidence, "reference": question.reference}, final
                ),
            )
        return final is not None and final.kept

    @staticmethod
    def _path_decision(answer: str, winner: str, confidence: float, voted: Decision, final: Decision | None) -> Decision:
        """A path is kept when it states its question's winner and the question is kept."""
        if not answer:
            return Decision(False, "no_answer", reason="the path states no answer")
        if not voted.kept:  # no winner: every answer goes with its question, under the same filter
            return Decision(False, voted.filter, reason=f"answered {_quote(answer)}; {voted.reason}")
        if answer != winner:
            return Decision(False, "disagrees", reason=f"answered {_quote(answer)}; the winner is {_quote(winner)}")
        if final is not None and not final.kept:
            return Decision(False, final.filter, reason=f"agrees with the winner {_quote(winner)}, but {final.reason}")
        return Decision(True, score=confidence, reason=f"agrees with the winner {_quote(winner)}")

    async def _paths(self, index: int, question: Question) -> StageResult:
        base = derive_seed(self.ctx.seed, "paths", index)
        prompt = cot_prompt(question.text)
        paths, model = [], ""
        for start in range(0, self.params.paths, SAMPLES_PER_CALL):
            n = min(SAMPLES_PER_CALL, self.params.paths - start)
            request = generator_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=prompt), sampling=self.params.sampling, n=n, seed=(base + start) % 2**32
            )
            # partial binds this loop pass's request (a lambda would close over the loop variable).
            response = await self.ctx.call(
                partial(self.ctx.services.generator.Generate, request, timeout=CALL_SECONDS), "generator (paths)"
            )
            paths += [{"text": s.text.strip(), "seed": s.seed} for s in response.samples]
            model = response.model.model
        return StageResult({"paths": paths}, Decision(True, score=len(paths), model=model, template_version=TEMPLATE_VERSION, seed=base))

    async def _vote(self, question: Question, paths: list[dict[str, Any]]) -> StageResult:
        request = scorer_pb2.VoteRequest(
            prompt=cot_prompt(question.text),
            answer_pattern=self.params.answer_pattern,
            method=self.params.method,
            paths=[scorer_pb2.ReasoningPath(text=p["text"] or " ") for p in paths],
        )
        response = await self.ctx.call(lambda: self.ctx.services.scorer.Vote(request, timeout=CALL_SECONDS), "scorer (vote)")
        answered = sum(t.count for t in response.tallies)
        counts = ", ".join(f"{_quote(t.answer)}×{t.count}" for t in response.tallies[:5])
        winner_votes = next((t.count for t in response.tallies if t.answer == response.winner), 0)
        if not response.tallies:
            decision = Decision(False, "no_answer", score=0, reason="no path stated an answer")
        elif not response.winner:
            decision = Decision(False, "no_majority", score=0, reason=f"tie for the most votes: {counts}")
        elif winner_votes < self.params.min_votes:
            decision = Decision(
                False,
                "no_majority",
                score=response.confidence,
                reason=f"{winner_votes} of {answered} answers agree, fewer than min_votes {self.params.min_votes}: {counts}",
            )
        else:
            decision = Decision(True, score=response.confidence, reason=counts)
        result = StageResult(
            {
                "question": question.text,  # what a person reviewing the vote reads first
                "winner": response.winner if decision.kept else "",
                "confidence": response.confidence if decision.kept else 0.0,
                "answers": [v.answer for v in response.votes],
                "tallies": [{"answer": t.answer, "count": t.count} for t in response.tallies],
            },
            decision,
        )
        # Only a winner's share is measured against min_confidence (and so held for review near it).
        if not decision.kept:
            return result
        return self.ctx.held(result, response.confidence - self.params.min_confidence, self.params.min_confidence)


def _quote(answer: str) -> str:
    return answer if len(answer) <= ANSWER_QUOTE_CHARS else answer[: ANSWER_QUOTE_CHARS - 1] + "…"


# --- export ---


def lmsi_examples(question: str, path: str, answer: str) -> list[tuple[str, str, str]]:
    """LMSI's four training formats of one kept path: (format, prompt, completion)."""
    stated = f" The answer is {answer}."
    return [
        ("cot", cot_prompt(question), " " + path),
        ("direct", direct_prompt(question), stated),
        ("zero_shot_cot", f"Q: {question}\nA: Let's think step by step.", " " + path),
        ("zero_shot", f"Q: {question}\nA:", stated),
    ]


def export_rows(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """Kept reasoning paths, and LMSI's four training examples of each."""
    paths, lmsi = [], []
    for record in records:
        if not PathId.matches(record.item_id) or not record.kept:  # a path is kept only when its question is
            continue
        data = record.data
        paths.append({"item_id": record.item_id, **{k: data[k] for k in ("question", "path", "answer", "confidence", "seed")}})
        for kind, prompt, completion in lmsi_examples(data["question"], data["path"], data["answer"]):
            lmsi.append({"item_id": record.item_id, "format": kind, "prompt": prompt, "completion": completion})
    return {"paths": paths, "lmsi": lmsi}
