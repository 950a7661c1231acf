"""Self-Instruct (Wang et al. 2022, arXiv 2212.10560; ALGORITHMS.md §2).

Each round prompts the generator with 8 instructions (6 human seed tasks and,
once any exist, 2 machine ones), parses the numbered list it continues,
filters it with the paper's heuristics, keeps the diverse ones through the
dedup service, asks whether each is a classification task, and generates
instances (label first for classification, input first otherwise).

Determinism under crashes. A round's prompt only draws machine instructions
kept by rounds at least `max_in_flight` rounds earlier, which have always
finished when it starts, and the diversity filter runs strictly in round
order with an idempotent batch id per round. Every sample has a seed derived
from (job seed, stage, item). So the dataset depends only on the spec and the
models, never on timing: a job killed at any point and resumed produces what
an uninterrupted run produces. (Only how far the rounds started but not
needed got before the target was reached depends on timing; their
candidates all end as over_target.)

Differences from the original code, on purpose:
- The ROUGE-L > 0.7 test is replaced by embedding similarity (dedup service).
- A response cut off by max_tokens loses only its last, unfinished item; the
  original discarded the whole response, which wastes most of a small
  model's output when max_tokens is kept low for CPU budgets. The same holds
  for instances: a cut-off last output is dropped as "truncated".
- An output that only restates its input (whitespace, list markers,
  punctuation and case aside) is dropped, not just an identical one.

Lineage. Each listed instruction is a candidate ("r00003-02") from its first
decision ("generate_instructions": which sample it came from) to its last;
rounds and the seed pool store results that decide nothing. Rounds started
but not needed (the target was reached in an earlier one) are closed when the
job ends: each of their candidates that is not already dropped gets an
"over_target" drop, so everything sent to the dedup namespace is in lineage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from autodidact.coordinator.recipes.base import ERROR_FILTER, REVIEW_FILTER, Decision, JobContext, StageResult, derive_rng, derive_seed
from autodidact.coordinator.recipes.formats import check_item_count, json_lines, read_input
from autodidact.coordinator.recipes.ids import CandidateId, RoundId
from autodidact.coordinator.recipes.recipe import DecidingScore, Recipe
from autodidact.coordinator.recipes.replay import replay_batched
from autodidact.coordinator.records import Record
from autodidact.dedup.defaults import DEFAULT_THRESHOLD, is_namespace_reference
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.v1 import common_pb2, coordinator_pb2, dedup_pb2, generator_pb2
from autodidact.validation import check_range

TEMPLATE_VERSION = "self_instruct/v1"
STAGES = ("generate_instructions", "heuristics", "diversity", "review", "classify", "instances", "dataset")
# Stages where a candidate can be dropped before the dataset (at classify only
# by an error: a service refused it).
DROPPING_STAGES = ("generate_instructions", "heuristics", "diversity", "review", "classify", "instances")
SEED_POOL_KEY = "seed_pool"
# Where the job notes the round that reached the target, before closing later rounds.
CLOSED_KEY = "closed"
UNSUITABLE_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot", "go to")
UNSUITABLE_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, UNSUITABLE_WORDS)) + r")\b", re.IGNORECASE)
LIST_ITEM_SPLIT = re.compile(r"\n\d+\s?\. ")
GENERATION_TIMEOUT_SECONDS = 900.0
MAX_INSTANCES = 5
MAX_DEDUP_BATCH = 4096
QUOTE_CHARS = 80
LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\(?\w{1,2}[.)])\s+", re.MULTILINE)


INSTANCE_SCHEMA = pa.schema(
    (
        ("item_id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("is_classification", pa.bool_()),
    )
)
MESSAGES_SCHEMA = pa.schema(
    (("item_id", pa.string()), ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
)


class SelfInstruct(Recipe["SelfInstructParams"]):
    """The declared task; the parts below are its input loading, prompts and parsers, run and export."""

    name = "self_instruct"
    stages = STAGES
    services = ("generator", "dedup")
    tables: ClassVar[dict[str, pa.Schema]] = {"instances": INSTANCE_SCHEMA, "sft_messages": MESSAGES_SCHEMA}
    inputs = ("seed_tasks_path",)

    def resolve(self, spec: coordinator_pb2.SelfInstructSpec, job_id: str) -> SelfInstructParams:
        return resolve_params(spec, job_id, f"spec.{self.name}")

    def item_count(self, params: SelfInstructParams) -> int:
        return params.target

    def target(self, spec: coordinator_pb2.SelfInstructSpec) -> int | None:
        return spec.target_instructions

    def deciding_scores(self, spec: coordinator_pb2.SelfInstructSpec) -> tuple[DecidingScore, ...]:
        threshold = spec.similarity_threshold if spec.HasField("similarity_threshold") else DEFAULT_THRESHOLD
        return (DecidingScore("diversity", "cosine similarity to the nearest kept instruction", (threshold,), "below"),)

    async def run(self, ctx: JobContext, params: SelfInstructParams) -> dict[str, Any]:
        # Rounds in flight: the window a round's prompt looks back past (see the module's docstring).
        return await SelfInstructRun(ctx, params, ctx.max_in_flight).run()

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        """Candidates only ("r00003-02"), of every round: those of rounds started
        but not needed end as over_target, so lineage shows them too."""
        return CandidateId.matches

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return export_rows(records)


# --- input loading ---


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]
    is_classification: bool


def load_seed_tasks(path: Path, field: str) -> list[SeedTask]:
    """Seed tasks in the original seed_tasks.jsonl format."""
    tasks = []
    for number, raw in json_lines(read_input(path, field), field):
        try:
            tasks.append(
                SeedTask(
                    instruction=str(raw["instruction"]).strip(),
                    instances=tuple((str(i.get("input", "")), str(i["output"])) for i in raw["instances"]),
                    is_classification=bool(raw["is_classification"]),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(
                field, f"line {number} of {path} is not a seed task (instruction, instances, is_classification): {exc}"
            ) from exc
    check_item_count(field, tasks, "seed tasks")
    return tasks


@dataclass(frozen=True)
class SelfInstructParams:
    seed_tasks: list[SeedTask]
    target: int
    human_per_prompt: int
    machine_per_prompt: int
    threshold: float
    namespace: str
    instruction_sampling: common_pb2.SamplingParams
    instance_sampling: common_pb2.SamplingParams
    max_rounds: int


def resolve_params(spec: coordinator_pb2.SelfInstructSpec, job_id: str, field: str) -> SelfInstructParams:
    """The spec with every default filled in, validated."""
    if not spec.seed_tasks_path:
        raise InvalidArgument(f"{field}.seed_tasks_path", "is required")
    seed_tasks = load_seed_tasks(Path(spec.seed_tasks_path), f"{field}.seed_tasks_path")
    if spec.target_instructions == 0:
        raise InvalidArgument(f"{field}.target_instructions", "is required: a number from 1 to 1,000,000")
    check_range(f"{field}.target_instructions", spec.target_instructions, 1, 1_000_000)
    human = spec.human_per_prompt or 6
    check_range(f"{field}.human_per_prompt", human, 1, 16)
    machine = spec.machine_per_prompt if spec.HasField("machine_per_prompt") else 2
    check_range(f"{field}.machine_per_prompt", machine, 0, 16)
    if human > len(seed_tasks):
        raise InvalidArgument(f"{field}.human_per_prompt", f"is {human} but the seed file holds only {len(seed_tasks)} tasks")
    threshold = spec.similarity_threshold if spec.HasField("similarity_threshold") else DEFAULT_THRESHOLD
    check_range(f"{field}.similarity_threshold", threshold, 0.0, 1.0)
    namespace = spec.dedup_namespace or job_id
    if not is_namespace_reference(namespace):
        raise InvalidArgument(
            f"{field}.dedup_namespace",
            "must be 1 to 128 characters of A-Z a-z 0-9 _ . -, or <owner tenant>/<namespace> for one another tenant shared",
        )
    max_rounds = spec.max_rounds or max(20, 10 * spec.target_instructions)
    check_range(f"{field}.max_rounds", max_rounds, 1, 1_000_000)
    return SelfInstructParams(
        seed_tasks=seed_tasks,
        target=spec.target_instructions,
        human_per_prompt=human,
        machine_per_prompt=machine,
        threshold=threshold,
        namespace=namespace,
        instruction_sampling=sampling_with_defaults(
            spec.instruction_sampling,
            common_pb2.SamplingParams(
                temperature=0.7, top_p=0.5, presence_penalty=2.0, max_tokens=1024, stop=["\n\n", "\n16", "16.", "16 ."]
            ),
            f"{field}.instruction_sampling",
        ),
        instance_sampling=sampling_with_defaults(
            spec.instance_sampling,
            common_pb2.SamplingParams(temperature=0.0, presence_penalty=1.5, max_tokens=256, stop=["\n\nTask:"]),
            f"{field}.instance_sampling",
        ),
        max_rounds=max_rounds,
    )


# --- prompts and parsers (pure) ---


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """The model's raw text for a drop reason: JSON-quoted (newlines stay
    visible), cut to `limit` characters with an ellipsis."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


def normalized(text: str) -> str:
    """Text without list markers, punctuation, case or spacing, to compare an output with its input."""
    text = LIST_MARKER.sub("", text)
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.casefold().split())


def instruction_prompt(instructions: list[str]) -> str:
    lines = ["Come up with a series of tasks:"]
    for number, instruction in enumerate(instructions, 1):
        one_line = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        lines.append(f"{number}. {one_line}")
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def heuristic_verdict(instruction: str) -> Decision:
    """The paper's filters, in its order; the first that fails names the drop."""
    words = len(instruction.split())
    if not instruction:
        return Decision(False, "empty", reason="no text")
    if words <= 3:
        return Decision(False, "too_short", score=words, reason=f"{words} words (needs more than 3)")
    if words > 150:
        return Decision(False, "too_long", score=words, reason=f"{words} words (at most 150)")
    if match := UNSUITABLE_PATTERN.search(instruction):
        return Decision(False, "unsuitable_keyword", reason=f"mentions {match.group(0)!r}, which a text model cannot do")
    if instruction.startswith("Write a program"):
        return Decision(False, "write_a_program", reason="starts with 'Write a program'")
    if instruction[0] in string.punctuation:
        return Decision(False, "starts_with_punctuation", reason=f"starts with {instruction[0]!r}")
    if not instruction[0].isascii():
        return Decision(False, "starts_non_ascii", reason=f"starts with {instruction[0]!r}")
    return Decision(True, template_version=TEMPLATE_VERSION)


def parse_instructions(text: str, truncated: bool) -> list[tuple[str, Decision]]:
    """Splits the continued list into instructions, each with its heuristic
    verdict; a drop's reason quotes the model's text."""
    raw_pieces = LIST_ITEM_SPLIT.split(text)
    parsed = []
    for position, raw in enumerate(raw_pieces):
        piece = re.sub(r"\s+", " ", raw).strip()
        instruction = piece[:1].upper() + piece[1:].lower() if piece else ""  # str.capitalize(), as the original
        if truncated and position == len(raw_pieces) - 1:
            decision = Decision(False, "truncated", reason="cut off by max_tokens")
        else:
            decision = heuristic_verdict(instruction)
        if not decision.kept:
            decision = replace(decision, reason=f"{decision.reason}: {quote(raw)}")
        parsed.append((instruction, decision))
    return [(instruction, decision) for instruction, decision in parsed if instruction or not decision.kept]


def classification_prompt(seed_tasks: list[SeedTask], instruction: str) -> str:
    examples = [t for t in seed_tasks if t.is_classification][:4] + [t for t in seed_tasks if not t.is_classification][:4]
    examples.sort(key=lambda t: t.instruction)  # interleave yes and no, deterministically
    lines = ["Is each task a classification task, whose answer is one of a small fixed set of labels?", ""]
    for task in examples:
        lines += [f"Task: {task.instruction}", f"Classification: {'Yes' if task.is_classification else 'No'}", ""]
    lines += [f"Task: {instruction}", "Classification:"]
    return "\n".join(lines)


def instance_prompt(seed_tasks: list[SeedTask], instruction: str, classification: bool) -> str:
    examples = [t for t in seed_tasks if t.is_classification == classification][:3]
    if classification:
        lines = ["For each classification task, write a class label and then an input that belongs to it.", ""]
        for task in examples:
            lines.append(f"Task: {task.instruction}")
            for task_input, output in task.instances[:2]:
                lines += [f"Class label: {output}", f"Input: {task_input}"]
            lines.append("")
        lines += [f"Task: {instruction}", "Class label:"]
    else:
        lines = ["Write examples for each task. When a task needs no input, write only the output.", ""]
        for task in examples:
            lines.append(f"Task: {task.instruction}")
            for task_input, output in task.instances[:2]:
                lines += ([f"Input: {task_input}"] if task_input else []) + [f"Output: {output}"]
            lines.append("")
        lines += [f"Task: {instruction}"]
    return "\n".join(lines)


def parse_instances(text: str, classification: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from the model's continuation of instance_prompt."""
    if classification:
        # The prompt ends with "Class label:", so the text starts inside the first label.
        pairs = re.findall(r"(.*?)\nInput:(.*?)(?:\nClass label:|$)", text, flags=re.DOTALL)
        return [(i.strip(), label.strip()) for label, i in pairs][:MAX_INSTANCES]
    instances = []
    for match in re.finditer(r"(?:Input:(?P<input>.*?)\n)?Output:(?P<output>.*?)(?=\nInput:|\nOutput:|\n\n|$)", text, flags=re.DOTALL):
        instances.append(((match.group("input") or "").strip(), match.group("output").strip()))
    return instances[:MAX_INSTANCES]


def instances_cut_off(text: str, instances: list[tuple[str, str]], classification: bool) -> bool:
    """Whether the last parsed instance ran into the end of a response cut by
    max_tokens (its last field ends the text), so its text is unfinished."""
    if not instances:
        return False
    task_input, output = instances[-1]
    last_field = task_input if classification else output  # classification instances end with their input
    return bool(last_field) and text.rstrip().endswith(last_field)


def filter_instances(instances: list[tuple[str, str]], truncated: bool = False) -> tuple[list[tuple[str, str]], Counter[str], list[str]]:
    """The paper's instance filters, plus copies_input and truncated (the
    last instance of a response cut by max_tokens); returns the survivors,
    what dropped the rest, and each drop with the model's text quoted."""
    dropped: Counter[str] = Counter()
    why: list[str] = []
    outputs_by_input: dict[str, set[str]] = {}
    for task_input, output in instances[:-1] if truncated else instances:  # an unfinished output conflicts with nothing
        outputs_by_input.setdefault(task_input, set()).add(output)
    kept, seen = [], set()
    for position, (task_input, output) in enumerate(instances):
        if truncated and position == len(instances) - 1:
            reason = "truncated"
        elif not output:
            reason = "empty_output"
        elif task_input and normalized(output) == normalized(task_input):
            reason = "copies_input"
        elif (task_input, output) in seen:
            reason = "repeated"
        elif len(outputs_by_input[task_input]) > 1:
            reason = "conflicting_outputs"
        else:
            seen.add((task_input, output))
            kept.append((task_input, output))
            continue
        dropped[reason] += 1
        why.append(f"{reason} {quote(output)}")
    return kept, dropped, why


# --- orchestration ---


class SelfInstructRun:
    """One job's run: rounds of prompts, candidates filtered in round order, instances for the diverse ones."""

    def __init__(self, ctx: JobContext, params: SelfInstructParams, rounds_in_flight: int) -> None:
        self.ctx = ctx
        self.params = params
        self.window = rounds_in_flight
        self._kept_by_diversity: dict[int, list[str]] = {}
        # Each round's candidates held for review (candidate, instruction): they wait at the end of the run.
        self._held_by_round: dict[int, list[tuple[str, str]]] = {}
        self._diversity_turn: dict[int, asyncio.Event] = {}
        self._human = [t.instruction for t in params.seed_tasks]

    async def run(self) -> dict[str, Any]:
        await self.ctx.job_value(SEED_POOL_KEY, self._seed_pool)
        tasks: dict[int, asyncio.Task[list[str]]] = {}

        def start(round_: int) -> None:
            self._diversity_turn[round_] = asyncio.Event()
            tasks[round_] = asyncio.create_task(self._round(round_))

        for round_ in range(min(self.window, self.params.max_rounds)):
            start(round_)
        finished: list[str] = []
        last_round = -1
        try:
            for round_ in range(self.params.max_rounds):
                finished += await tasks[round_]
                last_round = round_
                if len(finished) >= self.params.target:
                    break
                if round_ + self.window < self.params.max_rounds:
                    start(round_ + self.window)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        # A restarted job must not take the rounds closed below any further (a candidate
        # ended as over_target would gain later decisions), so the close is noted first.
        await self.ctx.store.put_value(self.ctx.key, CLOSED_KEY, {"last_round": last_round})
        for position, item_id in enumerate(finished):
            decision = Decision(True) if position < self.params.target else await self._over_target(item_id)
            await self.ctx.record(item_id, "dataset", StageResult(decision=decision))
        # Candidates held for review (in the rounds that counted) wait for it now, all at once. They
        # did not count towards the target: one a person keeps gets its instances and joins the dataset.
        held = [pair for round_ in range(last_round + 1) for pair in self._held_by_round.get(round_, [])]
        kept_on_review = sum(await asyncio.gather(*(self._conclude_held(candidate, instruction) for candidate, instruction in held)))
        # Rounds started but not needed (the rounds started are always 0 .. last_round + window - 1,
        # also across a restart): every candidate they produced ends here, dropped unless it already was.
        for round_ in range(last_round + 1, min(last_round + self.window, self.params.max_rounds)):
            await self._end_open_candidates(round_, self._over_target)
        return {
            "last_round": last_round,
            "rounds": last_round + 1,
            "kept": min(len(finished), self.params.target) + kept_on_review,
            "target_reached": len(finished) >= self.params.target,
            "held_for_review": len(held),
            "kept_on_review": kept_on_review,
        }

    async def _round(self, round_: int) -> list[str]:
        """One prompt → its candidates' fates; returns the ids that reached the end, in order.
        A round a service refused (its generation, or its dedup batch) is one errored item
        of the job's error budget: its open candidates end with filter `error`, and the
        rounds after it go on."""
        finished: list[str] = []

        async def work() -> bool:
            finished.extend(await self._round_candidates(round_))
            return True

        try:
            if not await self.ctx.item(work()):
                error = Decision(False, ERROR_FILTER, reason=self.ctx.errors[-1])

                async def errored(_: str) -> Decision:
                    return error

                await self._end_open_candidates(round_, errored)
        finally:
            # Later rounds wait for this one's diversity decisions and build their prompts from them.
            self._kept_by_diversity.setdefault(round_, [])
            self._diversity_turn[round_].set()
        return finished

    async def _round_candidates(self, round_: int) -> list[str]:
        item = str(RoundId(round_))
        closed = await self.ctx.store.get_value(self.ctx.key, CLOSED_KEY)
        if closed is not None and round_ > closed["last_round"]:
            return []  # not needed: closed when the job first reached its target
        generated = await self.ctx.stage(item, "generate_instructions", lambda: self._generate_instructions(round_))
        # Each candidate's first decisions are recorded when missing: a cancel or crash
        # part way through is completed by the replay or by _end_open_candidates.
        survivors = [(candidate, instruction) for candidate, instruction, kept in await self._candidates(round_, generated) if kept]
        if round_ > 0:
            await self._diversity_turn[round_ - 1].wait()
        diverse = await self._diversity(item, survivors)
        self._kept_by_diversity[round_] = [instruction for _, instruction, _ in diverse]
        self._diversity_turn[round_].set()
        # A held candidate waits for its review at the end of the run, before its instances: the
        # round, and the count towards the target, go on without it.
        self._held_by_round[round_] = [(candidate, instruction) for candidate, instruction, held in diverse if held]
        ready = [(candidate, instruction) for candidate, instruction, held in diverse if not held]
        outcomes = await asyncio.gather(*(self.ctx.item(self._instances(candidate, instruction)) for candidate, instruction in ready))
        return [candidate for (candidate, _), kept in zip(ready, outcomes, strict=True) if kept]

    async def _held(self, candidate: str) -> bool:
        """Whether the diversity filter held the candidate for review (its similarity was within the band)."""
        diversity = await self.ctx.stored(candidate, "diversity")
        return diversity is not None and diversity.decision is not None and diversity.decision.filter == REVIEW_FILTER

    async def _conclude_held(self, candidate: str, instruction: str) -> bool:
        """A held candidate after its review: a drop is its final decision; kept, it gets its
        instances (which may still drop it) and joins the dataset. True when it did."""
        if not (await self.ctx.review(candidate)).kept:
            return False
        if not await self.ctx.item(self._instances(candidate, instruction)):
            return False
        if await self.ctx.stored(candidate, "dataset") is None:
            await self.ctx.record(candidate, "dataset", StageResult(decision=Decision(True, reason="kept on review")))
        return True

    async def _end_open_candidates(self, round_: int, decision: Callable[[str], Awaitable[Decision]]) -> None:
        """Gives every candidate of the round still without a final decision its
        `dataset` drop, so each candidate has exactly one final decision."""
        generated = await self.ctx.stored(str(RoundId(round_)), "generate_instructions")
        if generated is None or generated.decision is not None:
            return  # never sampled, or the generation itself errored (that row is the round's)
        for candidate, _, _ in await self._candidates(round_, generated):
            if await self.ctx.stored(candidate, "dataset") is None and not await self._dropped(candidate):
                ending = await decision(candidate)
                # A held candidate's open review closes with the same drop (a decision made first stands).
                if await self._held(candidate) and not (await self.ctx.close_review(candidate, ending)).kept:
                    continue
                await self.ctx.record(candidate, "dataset", StageResult(decision=ending))

    async def _candidates(self, round_: int, generated: StageResult) -> list[tuple[str, str, bool]]:
        """Each instruction the round's sample listed, as a candidate: its first
        decisions (the sample it came from, the heuristics) recorded once.
        Returns (candidate, instruction, kept by the heuristics)."""
        sample = generated.data
        parsed = parse_instructions(sample["text"], sample["finish_reason"] == "length")
        candidates = []
        for position, (instruction, verdict) in enumerate(parsed):
            candidate = str(CandidateId(round_, position))
            if await self.ctx.stored(candidate, "generate_instructions") is None:
                origin = Decision(
                    True,
                    reason=f"item {position + 1} of {len(parsed)} listed by round {round_} ({sample['finish_reason']})",
                    model=sample["model"],
                    template_version=TEMPLATE_VERSION,
                    seed=sample["seed"],
                )
                await self.ctx.record(candidate, "generate_instructions", StageResult({"round": round_}, origin))
            if await self.ctx.stored(candidate, "heuristics") is None:
                await self.ctx.record(candidate, "heuristics", StageResult({"instruction": instruction}, verdict))
            candidates.append((candidate, instruction, verdict.kept))
        return candidates

    async def _dropped(self, candidate: str) -> bool:
        results = [await self.ctx.stored(candidate, stage) for stage in DROPPING_STAGES]
        return any(r is not None and r.decision is not None and not r.decision.kept for r in results)

    async def _over_target(self, candidate: str) -> Decision:
        heuristics = await self.ctx.stored(candidate, "heuristics")
        instruction = heuristics.data["instruction"] if heuristics else ""
        return Decision(False, "over_target", reason=f"target of {self.params.target} reached: {quote(instruction)}")

    async def _seed_pool(self) -> dict[str, Any]:
        """Puts the human seed instructions into the namespace first: the paper
        compares each candidate with seed and machine instructions alike, and
        small models copy seeds from their prompt. Ids and batch ids are named
        by the seed file's content, so jobs sharing a namespace add them once."""
        digest = hashlib.sha256("\n".join(self._human).encode()).hexdigest()[:16]
        kept = 0
        for start in range(0, len(self._human), MAX_DEDUP_BATCH):
            chunk = self._human[start : start + MAX_DEDUP_BATCH]
            request = dedup_pb2.FilterBatchRequest(
                namespace=self.params.namespace,
                items=[dedup_pb2.DedupItem(id=f"seed-{digest}/{start + i}", text=t) for i, t in enumerate(chunk)],
                threshold=1.0,  # every seed joins, bar exact duplicates
                batch_id=f"seeds-{digest}/{start}",
            )
            # partial binds this loop pass's request (a lambda would close over the loop variable).
            response = await self.ctx.call(partial(self.ctx.services.dedup.FilterBatch, request, timeout=300), "dedup (seed pool)")
            kept += sum(v.kept for v in response.verdicts)
        # Decides nothing about a candidate: the seeds are context, not dataset rows.
        return {"seed_instructions": len(self._human), "in_namespace": kept, "namespace": self.params.namespace}

    def _prompt_instructions(self, round_: int) -> list[str]:
        # Machine instructions of rounds that finished before this one could start.
        pool = [i for earlier in range(round_ - self.window + 1) for i in self._kept_by_diversity[earlier]]
        rng = derive_rng(self.ctx.seed, "prompt", round_)
        chosen = rng.sample(pool, min(self.params.machine_per_prompt, len(pool)))
        chosen += rng.sample(self._human, self.params.human_per_prompt + self.params.machine_per_prompt - len(chosen))
        rng.shuffle(chosen)
        return chosen

    async def _generate(self, prompt: str, sampling: common_pb2.SamplingParams, seed: int, what: str) -> generator_pb2.GenerateResponse:
        request = generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt), sampling=sampling, n=1, seed=seed)
        return await self.ctx.call(lambda: self.ctx.services.generator.Generate(request, timeout=GENERATION_TIMEOUT_SECONDS), what)

    async def _generate_instructions(self, round_: int) -> StageResult:
        instructions = self._prompt_instructions(round_)
        seed = derive_seed(self.ctx.seed, "instructions", round_)
        response = await self._generate(
            instruction_prompt(instructions), self.params.instruction_sampling, seed, "generator (instructions)"
        )
        sample = response.samples[0]
        finish = "length" if sample.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop"
        # The raw sample decides nothing; each instruction it lists is a candidate with its own lineage.
        return StageResult(
            {"prompt_instructions": instructions, "text": sample.text, "finish_reason": finish, "model": response.model.model, "seed": seed}
        )

    async def _diversity(self, item: str, survivors: list[tuple[str, str]]) -> list[tuple[str, str, bool]]:
        """The round's survivors through the dedup service, as one idempotent batch:
        a resumed round sends the whole batch again (same batch id), so the
        namespace holds what an uninterrupted run put there. A refusal is the
        round's: it propagates to `_round`, which ends the round's candidates."""

        async def dedup(batch: list[tuple[str, str]]) -> list[StageResult]:
            request = dedup_pb2.FilterBatchRequest(
                namespace=self.params.namespace,
                items=[dedup_pb2.DedupItem(id=f"{self.ctx.job_id}/{candidate}", text=instruction) for candidate, instruction in batch],
                threshold=self.params.threshold,
                batch_id=f"{self.ctx.job_id}/{item}",
            )
            response = await self.ctx.call(lambda: self.ctx.services.dedup.FilterBatch(request, timeout=300), "dedup")
            return [
                self._diversity_outcome(instruction, verdict) for (_, instruction), verdict in zip(batch, response.verdicts, strict=True)
            ]

        decided = await replay_batched(self.ctx, "diversity", survivors, lambda pair: pair[0], dedup, whole_batch=True, drop_refused=False)
        # (candidate, instruction, held for review) of each one the filter kept.
        return [(*pair, result.decision.filter == REVIEW_FILTER) for pair, result in decided if result.decision and result.decision.kept]

    def _diversity_outcome(self, instruction: str, verdict: dedup_pb2.DedupVerdict) -> StageResult:
        nearest = _readable_id(verdict.nearest_id, self.ctx.job_id)
        reason = f"cosine {verdict.similarity:.3f} to {nearest or 'nothing'} ({'<' if verdict.kept else '≥'} {self.params.threshold:g})"
        decision = Decision(
            verdict.kept,
            "" if verdict.kept else "similarity",
            score=round(verdict.similarity, 6),
            reason=reason if verdict.kept else f"{reason}: {quote(instruction)}",
        )
        # A similarity within the review band of the threshold is held for a person.
        return self.ctx.held(StageResult({"nearest": nearest}, decision), verdict.similarity - self.params.threshold, self.params.threshold)

    async def _instances(self, candidate: str, instruction: str) -> bool:
        classified = await self.ctx.stage(candidate, "classify", lambda: self._classify(candidate, instruction))
        made = await self.ctx.stage(
            candidate, "instances", lambda: self._make_instances(candidate, instruction, classified.data["is_classification"])
        )
        return bool(made.decision and made.decision.kept)

    async def _classify(self, candidate: str, instruction: str) -> StageResult:
        seed = derive_seed(self.ctx.seed, "classify", candidate)
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=3)
        response = await self._generate(classification_prompt(self.params.seed_tasks, instruction), sampling, seed, "generator (classify)")
        answer = response.samples[0].text.strip().lower()
        is_classification = answer.startswith("yes")
        return StageResult(
            {"is_classification": is_classification, "answer": answer},
            Decision(
                True,
                reason=f"classification: {'yes' if is_classification else 'no'}",
                model=response.model.model,
                template_version=TEMPLATE_VERSION,
                seed=seed,
            ),
        )

    async def _make_instances(self, candidate: str, instruction: str, classification: bool) -> StageResult:
        seed = derive_seed(self.ctx.seed, "instances", candidate)
        prompt = instance_prompt(self.params.seed_tasks, instruction, classification)
        response = await self._generate(prompt, self.params.instance_sampling, seed, "generator (instances)")
        sample = response.samples[0]
        parsed = parse_instances(sample.text, classification)
        cut = sample.finish_reason == common_pb2.FINISH_REASON_LENGTH and instances_cut_off(sample.text, parsed, classification)
        instances, dropped, why = filter_instances(parsed, truncated=cut)
        data = {
            "instruction": instruction,
            "is_classification": classification,
            "instances": [{"input": i, "output": o} for i, o in instances],
            "raw": sample.text,
            "dropped_instances": dict(dropped),
        }
        decide = partial(Decision, model=response.model.model, template_version=TEMPLATE_VERSION, seed=seed)
        if instances:
            dropped_note = f"; dropped {', '.join(why)}" if why else ""
            return StageResult(data, decide(True, score=len(instances), reason=f"{len(instances)} valid instances{dropped_note}"))
        counts = ", ".join(f"{n} {name}" for name, n in sorted(dropped.items())) or "none parsed"
        return StageResult(data, decide(False, "no_valid_instances", score=0, reason=f"no valid instance ({counts}): {quote(sample.text)}"))


def _readable_id(dedup_id: str, job_id: str) -> str:
    if dedup_id.startswith("seed-"):
        return f"seed task {dedup_id.rsplit('/', 1)[1]}"
    return dedup_id.removeprefix(f"{job_id}/")


# --- export ---


def export_rows(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """The dataset's rows: instruction/input/output instances and SFT chat messages."""
    instances, messages = [], []
    for record in records:
        if not record.kept:
            continue
        for instance in record.data["instances"]:
            row = {
                "item_id": record.item_id,
                "instruction": record.data["instruction"],
                "input": instance["input"],
                "output": instance["output"],
                "is_classification": record.data["is_classification"],
            }
            instances.append(row)
            user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            messages.append(
                {
                    "item_id": record.item_id,
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
                }
            )
    return {"instances": instances, "sft_messages": messages}
