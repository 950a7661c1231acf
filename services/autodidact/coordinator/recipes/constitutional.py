"""Constitutional AI (Bai et al. 2022, arXiv 2212.08073; ALGORITHMS.md §3).

For each prompt the critic samples a response and revises it over N
critique→revision rounds against a constitution. The job writes:
- SFT records: the prompt with the revision of every round (the paper trains
  on all of them);
- cheap preference pairs: chosen = the final revision, rejected = the
  initial response (what the open llm-swarm recipe does);
- judged pairs (optional): the same two answers labelled by the critic's AI
  judge, chosen by the soft label, with the label kept.

Item ids: "p00012" for a prompt. Seeds come from (job seed, prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from autodidact.coordinator.recipes.base import Decision, JobContext, StageResult, derive_seed
from autodidact.coordinator.recipes.formats import check_item_count, json_lines, read_input
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.v1 import common_pb2, coordinator_pb2, critic_pb2
from autodidact.validation import check_range

STAGES = ("revise", "judge", "dataset")
MAX_PROMPTS = 100_000
CALL_SECONDS = 3600.0


@dataclass(frozen=True)
class ConstitutionalParams:
    prompts: list[str]
    constitution: critic_pb2.ConstitutionRef
    rounds: int
    judged_pairs: bool
    chain_of_thought: bool
    sampling: common_pb2.SamplingParams


def load_prompts(path: Path, field: str, limit: int = 0) -> list[str]:
    prompts = []
    for number, raw in json_lines(read_input(path, field), field, limit):
        try:
            prompt = raw["prompt"]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(field, f"line {number} is not a JSON object with a \"prompt\" field ({exc})") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument(field, f"line {number}: \"prompt\" must be a non-empty string")
        prompts.append(prompt.strip())
    check_item_count(field, path, prompts, "prompts", MAX_PROMPTS)
    return prompts


def resolve_params(spec: coordinator_pb2.ConstitutionalSpec, job_id: str, field: str = "spec.constitutional") -> ConstitutionalParams:
    if not spec.prompts_path:
        raise InvalidArgument(f"{field}.prompts_path", "is required")
    check_range(f"{field}.max_prompts", spec.max_prompts, 0, MAX_PROMPTS)
    prompts = load_prompts(Path(spec.prompts_path), f"{field}.prompts_path", spec.max_prompts)
    rounds = spec.rounds or 4
    check_range(f"{field}.rounds", rounds, 1, 16)
    sampling = sampling_with_defaults(spec.sampling, common_pb2.SamplingParams(temperature=1.0, max_tokens=256), f"{field}.sampling")
    return ConstitutionalParams(prompts, spec.constitution, int(rounds), spec.judged_pairs, spec.chain_of_thought, sampling)


class ConstitutionalRecipe:
    def __init__(self, ctx: JobContext, params: ConstitutionalParams) -> None:
        self.ctx = ctx
        self.params = params

    async def run(self) -> dict[str, Any]:
        kept = await self.ctx.each_item(len(self.params.prompts), self._prompt)
        return {"prompts": len(kept), "kept": sum(kept)}

    async def _prompt(self, index: int) -> bool:
        item = f"p{index:05d}"
        prompt = self.params.prompts[index]
        revised = await self.ctx.stage(item, "revise", lambda: self._revise(index, prompt))
        data = revised.data
        changed = data["final_revision"].strip() != data["initial_response"].strip()
        if self.params.judged_pairs and changed:
            await self.ctx.stage(item, "judge", lambda: self._judge(index, prompt, data["initial_response"], data["final_revision"]))
        if self.ctx.stored(item, "dataset") is None:
            decision = Decision(True) if changed else Decision(False, "unrevised", reason="the revisions left the response as it was")
            self.ctx.record(item, "dataset", StageResult(decision=decision))
        stored = self.ctx.stored(item, "dataset")
        return bool(stored and stored.decision and stored.decision.kept)

    async def _revise(self, index: int, prompt: str) -> StageResult:
        seed = derive_seed(self.ctx.seed, "revise", index)
        request = critic_pb2.ReviseRequest(
            prompt=common_pb2.Prompt(text=prompt), constitution=self.params.constitution,
            rounds=self.params.rounds, sampling=self.params.sampling, seed=seed,
        )
        response = await self.ctx.call(lambda: self.ctx.services.critic.Revise(request, timeout=CALL_SECONDS), "critic (revise)")
        version = f"{response.constitution.name}@{response.constitution.version}"
        return StageResult(
            {
                "prompt": prompt, "initial_response": response.initial_response, "final_revision": response.final_revision,
                "rounds": [{"principle": r.principle, "critique": r.critique, "revision": r.revision, "seed": r.seed} for r in response.rounds],
                "constitution": version,
            },
            Decision(True, score=len(response.rounds), reason=" → ".join(r.principle for r in response.rounds),
                     model=response.model.model, template_version=version, seed=seed),
        )

    async def _judge(self, index: int, prompt: str, initial: str, final: str) -> StageResult:
        seed = derive_seed(self.ctx.seed, "judge", index)
        request = critic_pb2.JudgePreferenceRequest(
            prompt=common_pb2.Prompt(text=prompt), response_a=final, response_b=initial,
            constitution=self.params.constitution, chain_of_thought=self.params.chain_of_thought, seed=seed,
        )
        response = await self.ctx.call(lambda: self.ctx.services.critic.JudgePreference(request, timeout=CALL_SECONDS), "critic (judge)")
        return StageResult(
            {"probability_revision_better": response.probability_a, "judge_principle": response.principle},
            Decision(True, score=response.probability_a, reason=f"P(revision better) = {response.probability_a:.3f} ({response.principle})", seed=seed),
        )



# --- how the coordinator presents this recipe's results ---


def belongs(summary: dict[str, Any]) -> Any:
    return lambda item_id: item_id.startswith("p")


MESSAGES_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("round", pa.int64()), ("principle", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
])
PREFERENCE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.string()), ("probability_chosen", pa.float64()),
])


def tables(records: list[Any]) -> dict[str, tuple[list[dict[str, Any]], pa.Schema]]:
    """SFT chat messages (one per round's revision) and preference pairs in the prompt/chosen/rejected layout."""
    messages, preferences = [], []
    for record in records:
        if not record.kept:
            continue
        data = record.data
        prompt = data["prompt"]
        for number, round_ in enumerate(data["rounds"], 1):
            if round_["revision"]:
                messages.append({
                    "item_id": record.item_id, "round": number, "principle": round_["principle"],
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": round_["revision"]}],
                })
        initial, final = data["initial_response"], data["final_revision"]
        preferences.append({"item_id": record.item_id, "kind": "revision", "prompt": prompt, "chosen": final, "rejected": initial, "probability_chosen": None})
        if "probability_revision_better" in data:
            p = data["probability_revision_better"]
            chosen, rejected = (final, initial) if p >= 0.5 else (initial, final)
            preferences.append({"item_id": record.item_id, "kind": "judged", "prompt": prompt, "chosen": chosen, "rejected": rejected, "probability_chosen": max(p, 1 - p)})
    return {"sft_messages": (messages, MESSAGES_SCHEMA), "preferences": (preferences, PREFERENCE_SCHEMA)}
