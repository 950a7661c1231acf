"""Self-consistency and LMSI (Wang et al. 2022, arXiv 2203.11171; Huang et al.
2022, arXiv 2210.11610; ALGORITHMS.md §4).

For each unlabelled question: m reasoning paths sampled with a few-shot
chain-of-thought prompt; the scorer extracts every path's answer and votes;
when the winner's share reaches the minimum confidence, every path that
agrees is kept and becomes LMSI's four training examples.

Item ids: "q00012" for a question, "q00012/p031" for its 32nd path. Samples
are seeded from (job seed, question), so a resumed job repeats exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from autodidact.coordinator.recipes.base import Decision, JobContext, StageResult, derive_seed
from autodidact.coordinator.recipes.formats import check_item_count, json_lines, read_input
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2, scorer_pb2
from autodidact.validation import check_range

STAGES = ("paths", "vote", "dataset")
TEMPLATE_VERSION = "self_consistency/v1"
MAX_QUESTIONS = 100_000
SAMPLES_PER_CALL = 64  # the generator's default bound on n
CALL_SECONDS = 1800.0

# Worked examples of our own, in the paper's "Q: ... A: ... The answer is N." shape.
EXAMPLES = (
    ("A baker made 24 muffins and sold 15 of them. How many muffins are left?",
     "The baker started with 24 muffins and sold 15, so 24 - 15 = 9 muffins are left.", "9"),
    ("Each bag holds 6 oranges. How many oranges are in 7 bags?",
     "There are 7 bags with 6 oranges each, so 7 * 6 = 42 oranges.", "42"),
    ("Maria has 3 boxes of 12 pencils and gives away 10 pencils. How many pencils does she have now?",
     "She had 3 * 12 = 36 pencils. After giving away 10 she has 36 - 10 = 26.", "26"),
    ("A rope 45 meters long is cut into 5 equal pieces. How long is each piece?",
     "Each piece is 45 / 5 = 9 meters long.", "9"),
)


def cot_prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: {reasoning} The answer is {answer}.\n\n" for q, reasoning, answer in EXAMPLES)
    return f"{shots}Q: {question}\nA:"


def direct_prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: The answer is {answer}.\n\n" for q, _, answer in EXAMPLES)
    return f"{shots}Q: {question}\nA:"


@dataclass(frozen=True)
class Question:
    text: str
    reference: str  # the dataset's answer when it has one (never used to filter)


@dataclass(frozen=True)
class SelfConsistencyParams:
    questions: list[Question]
    paths: int
    method: int  # scorer_pb2.VoteMethod
    answer_pattern: str
    min_confidence: float
    sampling: common_pb2.SamplingParams


def load_questions(path: Path, field: str, limit: int = 0) -> list[Question]:
    """GSM8K JSONL ("question", "answer" ending "#### N"), SVAMP JSON ("Body",
    "Question", "Answer"), or JSONL with a "question" field."""
    text = read_input(path, field)
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(field, f"{path} is not a valid JSON list: {exc}") from None
    else:
        rows = json_lines(text, field)
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
            raise InvalidArgument(field, f"item {number} has neither \"question\" nor SVAMP's \"Body\" and \"Question\"")
        if not question:
            raise InvalidArgument(field, f"item {number}: the question is empty")
        questions.append(Question(question, reference))
        if limit and len(questions) == limit:
            break
    check_item_count(field, path, questions, "questions", MAX_QUESTIONS)
    return questions


def resolve_params(spec: coordinator_pb2.SelfConsistencySpec, job_id: str, field: str = "spec.self_consistency") -> SelfConsistencyParams:
    if not spec.questions_path:
        raise InvalidArgument(f"{field}.questions_path", "is required")
    check_range(f"{field}.max_questions", spec.max_questions, 0, MAX_QUESTIONS)
    questions = load_questions(Path(spec.questions_path), f"{field}.questions_path", spec.max_questions)
    paths = spec.paths_per_question if spec.HasField("paths_per_question") else 32
    check_range(f"{field}.paths_per_question", paths, 1, 256)
    check_range(f"{field}.min_confidence", spec.min_confidence, 0.0, 1.0)
    if len(spec.answer_pattern) > 512:
        raise InvalidArgument(f"{field}.answer_pattern", f"must have at most 512 characters, got {len(spec.answer_pattern):,}")
    compile_pattern(spec.answer_pattern or DEFAULT_ANSWER_PATTERN, f"{field}.answer_pattern")
    sampling = sampling_with_defaults(
        spec.sampling, common_pb2.SamplingParams(temperature=0.7, top_k=40, max_tokens=256, stop=["\nQ:", "\n\n"]), f"{field}.sampling"
    )
    return SelfConsistencyParams(questions, int(paths), spec.vote_method, spec.answer_pattern, spec.min_confidence, sampling)


class SelfConsistencyRecipe:
    def __init__(self, ctx: JobContext, params: SelfConsistencyParams) -> None:
        self.ctx = ctx
        self.params = params

    async def run(self) -> dict[str, Any]:
        kept = await self.ctx.each_item(len(self.params.questions), self._question)
        return {"questions": len(kept), "kept": sum(kept)}

    async def _question(self, index: int) -> bool:
        item = f"q{index:05d}"
        question = self.params.questions[index]
        sampled = await self.ctx.stage(item, "paths", lambda: self._paths(index, question))
        verdict = await self.ctx.stage(item, "vote", lambda: self._vote(question, sampled.data["paths"]))
        winner, confidence = verdict.data["winner"], verdict.data["confidence"]
        if self.ctx.stored(item, "dataset") is None:
            for number, (path, answer) in enumerate(zip(sampled.data["paths"], verdict.data["answers"])):
                agrees = bool(answer) and answer == winner
                decision = Decision(True) if agrees else Decision(False, "no_answer" if not answer else "disagrees", reason=f"answered {answer or 'nothing'}; winner {winner or 'none'}")
                data = {"question": question.text, "path": path["text"], "answer": answer, "seed": path["seed"], "confidence": confidence}
                self.ctx.record(f"{item}/p{number:03d}", "dataset", StageResult(data, decision))
            if not winner:
                decision = Decision(False, "no_answer", score=0, reason="no path stated an answer")
            elif confidence < self.params.min_confidence:
                decision = Decision(False, "low_confidence", score=confidence, reason=f"{confidence:.2f} of answers agree; minimum {self.params.min_confidence:g}")
            else:
                decision = Decision(True, score=confidence, reason=f"{confidence:.2f} of answers agree on {winner}")
            self.ctx.record(item, "dataset", StageResult({"question": question.text, "winner": winner, "confidence": confidence, "reference": question.reference}, decision))
        stored = self.ctx.stored(item, "dataset")
        return bool(stored and stored.decision and stored.decision.kept)

    async def _paths(self, index: int, question: Question) -> StageResult:
        base = derive_seed(self.ctx.seed, "paths", index)
        prompt = cot_prompt(question.text)
        paths, model = [], ""
        for start in range(0, self.params.paths, SAMPLES_PER_CALL):
            n = min(SAMPLES_PER_CALL, self.params.paths - start)
            request = generator_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=prompt), sampling=self.params.sampling, n=n, seed=(base + start) % 2**32
            )
            response = await self.ctx.call(lambda: self.ctx.services.generator.Generate(request, timeout=CALL_SECONDS), "generator (paths)")
            paths += [{"text": s.text.strip(), "seed": s.seed} for s in response.samples]
            model = response.model.model
        return StageResult(
            {"paths": paths}, Decision(True, score=len(paths), model=model, template_version=TEMPLATE_VERSION, seed=base)
        )

    async def _vote(self, question: Question, paths: list[dict[str, Any]]) -> StageResult:
        request = scorer_pb2.VoteRequest(
            prompt=cot_prompt(question.text), answer_pattern=self.params.answer_pattern, method=self.params.method,  # type: ignore[arg-type]
            paths=[scorer_pb2.ReasoningPath(text=p["text"] or " ") for p in paths],
        )
        response = await self.ctx.call(lambda: self.ctx.services.scorer.Vote(request, timeout=CALL_SECONDS), "scorer (vote)")
        return StageResult(
            {"winner": response.winner, "confidence": response.confidence, "answers": [v.answer for v in response.votes],
             "tallies": [{"answer": t.answer, "count": t.count} for t in response.tallies]},
            Decision(bool(response.winner), "" if response.winner else "no_answer", score=response.confidence,
                     reason=", ".join(f"{t.answer}×{t.count}" for t in response.tallies[:5]) or "no answers"),
        )



# --- how the coordinator presents this recipe's results ---


def belongs(summary: dict[str, Any]) -> Any:
    return lambda item_id: item_id.startswith("q")


PATH_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("question", pa.string()), ("path", pa.string()), ("answer", pa.string()),
    ("confidence", pa.float64()), ("seed", pa.int64()),
])
LMSI_SCHEMA = pa.schema([("item_id", pa.string()), ("format", pa.string()), ("prompt", pa.string()), ("completion", pa.string())])


def lmsi_examples(question: str, path: str, answer: str) -> list[tuple[str, str, str]]:
    """LMSI's four training formats of one kept path: (format, prompt, completion)."""
    stated = f" The answer is {answer}."
    return [
        ("cot", cot_prompt(question), " " + path),
        ("direct", direct_prompt(question), stated),
        ("zero_shot_cot", f"Q: {question}\nA: Let's think step by step.", " " + path),
        ("zero_shot", f"Q: {question}\nA:", stated),
    ]


def tables(records: list[Any]) -> dict[str, tuple[list[dict[str, Any]], pa.Schema]]:
    kept_questions = {r.item_id for r in records if "/" not in r.item_id and r.kept}
    paths, lmsi = [], []
    for record in records:
        if "/" not in record.item_id or not record.kept or record.item_id.split("/")[0] not in kept_questions:
            continue
        data = record.data
        paths.append({"item_id": record.item_id, **{k: data[k] for k in ("question", "path", "answer", "confidence", "seed")}})
        for kind, prompt, completion in lmsi_examples(data["question"], data["path"], data["answer"]):
            lmsi.append({"item_id": record.item_id, "format": kind, "prompt": prompt, "completion": completion})
    return {"paths": (paths, PATH_SCHEMA), "lmsi": (lmsi, LMSI_SCHEMA)}
