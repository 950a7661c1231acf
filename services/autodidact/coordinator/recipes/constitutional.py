"""Constitutional AI (Bai et al. 2022, arXiv 2212.08073; ALGORITHMS.md §3).

For each prompt the critic samples a response and revises it over N
critique→revision rounds against a constitution. The job writes:
- SFT records: the prompt with the revision of every round (the paper trains
  on all of them);
- one preference pair per prompt, in TRL's conversational layout. Without
  judged pairs it is the cheap pair (source "revision": chosen = the final
  revision, rejected = the initial response, what the open llm-swarm recipe
  does). With judged pairs the critic's AI judge labels the same two answers
  and its label alone orients the pair (source "judged"): emitting the cheap
  pair beside it would contradict the judge whenever it prefers the initial
  response. A label within min_margin of 0.5 says nothing, so the prompt is
  dropped as "undecided".

Item ids: "p00012" for a prompt. Seeds come from (job seed, prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from autodidact.coordinator.recipes.base import REVIEW_FILTER, Decision, JobContext, StageResult, derive_seed, ready
from autodidact.coordinator.recipes.formats import check_item_count, json_lines, read_input
from autodidact.coordinator.recipes.ids import PromptId
from autodidact.coordinator.recipes.recipe import DecidingScore, Recipe
from autodidact.coordinator.records import Record
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.v1 import common_pb2, coordinator_pb2, critic_pb2
from autodidact.validation import check_range

STAGES = ("revise", "judge", "review", "dataset")
# One item per prompt, one critic call each: a million is the scale the
# control-plane benchmark (benchmarks/control_plane.py) runs a job at.
MAX_PROMPTS = 1_000_000
CALL_SECONDS = 3600.0
# A judged label this close to 0.5 orients no pair. Chain-of-thought labels
# are clamped to [0.4, 0.6], so their default margin is half of that room.
DEFAULT_MIN_MARGIN, DEFAULT_MIN_MARGIN_COT = 0.1, 0.05


CHAT = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
MESSAGES_SCHEMA = pa.schema((("item_id", pa.string()), ("round", pa.int64()), ("principle", pa.string()), ("messages", CHAT)))
# TRL's conversational preference layout: the prompt as messages, chosen and
# rejected as one assistant message each (so DPO applies the chat template).
PREFERENCE_SCHEMA = pa.schema(
    (
        ("item_id", pa.string()),
        ("source", pa.string()),
        ("prompt", CHAT),
        ("chosen", CHAT),
        ("rejected", CHAT),
        ("probability_chosen", pa.float64()),
    )
)


class Constitutional(Recipe["ConstitutionalParams"]):
    """The declared task; the parts below are its input loading, its run and its export."""

    name = "constitutional"
    stages = STAGES
    services = ("critic",)
    tables: ClassVar[dict[str, pa.Schema]] = {"sft_messages": MESSAGES_SCHEMA, "preferences": PREFERENCE_SCHEMA}
    inputs = ("prompts_path",)

    def resolve(self, spec: coordinator_pb2.ConstitutionalSpec, job_id: str) -> ConstitutionalParams:
        return resolve_params(spec, f"spec.{self.name}")

    async def run(self, ctx: JobContext, params: ConstitutionalParams) -> dict[str, Any]:
        return await ConstitutionalRun(ctx, params).run()

    def item_count(self, params: ConstitutionalParams) -> int:
        return len(params.prompts)

    def deciding_scores(self, spec: coordinator_pb2.ConstitutionalSpec) -> tuple[DecidingScore, ...]:
        if not spec.judged_pairs:
            return ()
        if spec.HasField("min_margin"):
            margin = round(spec.min_margin, 6)
        else:
            margin = DEFAULT_MIN_MARGIN_COT if spec.chain_of_thought else DEFAULT_MIN_MARGIN
        return (DecidingScore("judge", "judge's probability that the revision is better", (0.5 - margin, 0.5 + margin), "outside"),)

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        return PromptId.matches

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return export_rows(records)


# --- input loading ---


@dataclass(frozen=True)
class ConstitutionalParams:
    prompts: list[str]
    constitution: critic_pb2.ConstitutionRef
    rounds: int
    judged_pairs: bool
    chain_of_thought: bool
    sampling: common_pb2.SamplingParams
    min_margin: float = DEFAULT_MIN_MARGIN


def load_prompts(path: Path, field: str, limit: int = 0) -> list[str]:
    prompts = []
    for number, raw in json_lines(read_input(path, field), field, limit):
        try:
            prompt = raw["prompt"]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(field, f'line {number} is not a JSON object with a "prompt" field ({exc})') from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument(field, f'line {number}: "prompt" must be a non-empty string')
        prompts.append(prompt.strip())
    check_item_count(field, prompts, "prompts", MAX_PROMPTS)
    return prompts


def resolve_params(spec: coordinator_pb2.ConstitutionalSpec, field: str) -> ConstitutionalParams:
    """The spec with every default filled in, validated; its prompts read."""
    if not spec.prompts_path:
        raise InvalidArgument(f"{field}.prompts_path", "is required")
    check_range(f"{field}.max_prompts", spec.max_prompts, 0, MAX_PROMPTS)
    prompts = load_prompts(Path(spec.prompts_path), f"{field}.prompts_path", spec.max_prompts)
    rounds = spec.rounds or 4
    check_range(f"{field}.rounds", rounds, 1, 16)
    sampling = sampling_with_defaults(spec.sampling, common_pb2.SamplingParams(temperature=1.0, max_tokens=256), f"{field}.sampling")
    if spec.HasField("min_margin"):
        # The field is a float32: 0.1 arrives as 0.10000000149; round back to what was written.
        min_margin = round(spec.min_margin, 6)
        if min_margin != min_margin or not 0.0 <= min_margin < 0.5:
            raise InvalidArgument(f"{field}.min_margin", f"must be at least 0 and less than 0.5, got {min_margin:g}")
    else:
        min_margin = DEFAULT_MIN_MARGIN_COT if spec.chain_of_thought else DEFAULT_MIN_MARGIN
    return ConstitutionalParams(prompts, spec.constitution, int(rounds), spec.judged_pairs, spec.chain_of_thought, sampling, min_margin)


# --- orchestration ---


class ConstitutionalRun:
    """One job's run: each prompt revised, judged when asked, and decided."""

    def __init__(self, ctx: JobContext, params: ConstitutionalParams) -> None:
        self.ctx = ctx
        self.params = params

    async def run(self) -> dict[str, Any]:
        kept = await self.ctx.each_item(len(self.params.prompts), self._prompt)
        return {"prompts": len(kept), "kept": sum(kept)}

    async def _prompt(self, index: int) -> bool:
        item = str(PromptId(index))
        prompt = self.params.prompts[index]
        revised = await self.ctx.stage(item, "revise", lambda: self._revise(index, prompt))
        data = revised.data
        changed = data["final_revision"].strip() != data["initial_response"].strip()
        if self.params.judged_pairs and changed:
            judged = await self.ctx.stage(
                item, "judge", lambda: self._judge(index, prompt, data["initial_response"], data["final_revision"])
            )
            if judged.decision and not judged.decision.kept:
                return False  # undecided: its drop is the prompt's final decision
            if judged.decision and judged.decision.filter == REVIEW_FILTER and not (await self.ctx.review(item)).kept:
                return False  # a person (or the review deadline) dropped it: that is its final decision
        decision = Decision(True) if changed else Decision(False, "unrevised", reason="the revisions left the response as it was")
        stored = await self.ctx.stage(item, "dataset", ready(StageResult(decision=decision)))
        return bool(stored.decision and stored.decision.kept)

    async def _revise(self, index: int, prompt: str) -> StageResult:
        seed = derive_seed(self.ctx.seed, "revise", index)
        request = critic_pb2.ReviseRequest(
            prompt=common_pb2.Prompt(text=prompt),
            constitution=self.params.constitution,
            rounds=self.params.rounds,
            sampling=self.params.sampling,
            seed=seed,
        )
        response = await self.ctx.call(lambda: self.ctx.services.critic.Revise(request, timeout=CALL_SECONDS), "critic (revise)")
        version = f"{response.constitution.name}@{response.constitution.version}"
        return StageResult(
            {
                "prompt": prompt,
                "initial_response": response.initial_response,
                "final_revision": response.final_revision,
                "rounds": [
                    {"principle": r.principle, "critique": r.critique, "revision": r.revision, "seed": r.seed} for r in response.rounds
                ],
                "constitution": version,
            },
            Decision(
                True,
                score=len(response.rounds),
                reason=" → ".join(r.principle for r in response.rounds),
                model=response.model.model,
                template_version=version,
                seed=seed,
            ),
        )

    async def _judge(self, index: int, prompt: str, initial: str, final: str) -> StageResult:
        seed = derive_seed(self.ctx.seed, "judge", index)
        request = critic_pb2.JudgePreferenceRequest(
            prompt=common_pb2.Prompt(text=prompt),
            response_a=final,
            response_b=initial,
            constitution=self.params.constitution,
            chain_of_thought=self.params.chain_of_thought,
            seed=seed,
        )
        response = await self.ctx.call(lambda: self.ctx.services.critic.JudgePreference(request, timeout=CALL_SECONDS), "critic (judge)")
        p = response.probability_a
        label = f"P(revision better) = {p:.3f} ({response.principle})"
        if abs(p - 0.5) < self.params.min_margin:
            decision = Decision(False, "undecided", score=p, reason=f"{label}: within {self.params.min_margin:g} of 0.5", seed=seed)
        else:
            decision = Decision(True, score=p, reason=f"{label}: {'revision' if p >= 0.5 else 'initial response'} preferred", seed=seed)
        # The review band is measured from the nearer edge of the undecided zone, 0.5 ± min_margin.
        edge = 0.5 + self.params.min_margin if p >= 0.5 else 0.5 - self.params.min_margin
        result = StageResult({"probability_revision_better": p, "judge_principle": response.principle}, decision)
        return self.ctx.held(result, p - edge, edge)


# --- export ---


def preference_row(item_id: str, prompt: str, chosen: str, rejected: str, source: str, probability_chosen: float | None) -> dict[str, Any]:
    return {
        "item_id": item_id,
        "source": source,
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "probability_chosen": probability_chosen,
    }


def export_rows(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """SFT chat messages (one per round's revision) and one preference pair per kept prompt."""
    messages, preferences = [], []
    for record in records:
        if not record.kept:
            continue
        data = record.data
        prompt = data["prompt"]
        for number, round_ in enumerate(data["rounds"], 1):
            if round_["revision"]:
                messages.append(
                    {
                        "item_id": record.item_id,
                        "round": number,
                        "principle": round_["principle"],
                        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": round_["revision"]}],
                    }
                )
        initial, final = data["initial_response"], data["final_revision"]
        if "probability_revision_better" in data:
            # The judge's label orients the pair; no cheap pair beside it to contradict it.
            p = data["probability_revision_better"]
            chosen, rejected = (final, initial) if p >= 0.5 else (initial, final)
            preferences.append(preference_row(record.item_id, prompt, chosen, rejected, "judged", max(p, 1 - p)))
        else:
            preferences.append(preference_row(record.item_id, prompt, final, initial, "revision", None))
    return {"sft_messages": messages, "preferences": preferences}
