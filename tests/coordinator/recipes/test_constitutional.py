"""Constitutional AI preference pairs, against a deterministic DOUBLE of the
critic (the real critic runs in the integration and e2e tests): the judge
orients the pair, undecided labels are dropped, rows are TRL-conversational."""

from __future__ import annotations

import asyncio
import json
from typing import NoReturn

import pyarrow as pa

from autodidact.coordinator.recipes.constitutional import Constitutional, ConstitutionalParams
from autodidact.v1 import common_pb2, critic_pb2
from tests.coordinator.recipes.harness import assert_lineage_agrees, job_context, run_recipe

# The double's judge: P(revision better) per prompt.
LABELS = {"Prefers the initial answer?": 0.2, "Cannot tell?": 0.55, "Prefers the revision?": 0.9, "Left unchanged?": 0.9}


class CriticDouble:
    """Revises every prompt deterministically; judges by LABELS."""

    async def Revise(self, request, timeout=None):
        prompt = request.prompt.text
        final = "initial" if prompt == "Left unchanged?" else f"revised {prompt}"
        return critic_pb2.ReviseResponse(
            initial_response="initial",
            final_revision=final,
            rounds=[critic_pb2.RevisionRound(principle="harmless", critique="c", revision=final, seed=1)],
            constitution=critic_pb2.ConstitutionRef(name="test", version="1"),
        )

    async def JudgePreference(self, request, timeout=None):
        assert request.response_a.startswith("revised") and request.response_b == "initial"
        return critic_pb2.JudgePreferenceResponse(probability_a=LABELS[request.prompt.text], principle="harmless")


def _run(tmp_path, judged: bool):
    params = ConstitutionalParams(
        prompts=list(LABELS),
        constitution=critic_pb2.ConstitutionRef(),
        rounds=1,
        judged_pairs=judged,
        chain_of_thought=False,
        sampling=common_pb2.SamplingParams(),
        min_margin=0.1,
    )
    summary, store = run_recipe(tmp_path, {"critic": CriticDouble()}, Constitutional(), params)
    records = assert_lineage_agrees(store, Constitutional(), summary)
    return records, {c.stage: c for c in asyncio.run(store.stage_counts("job"))}


def test_the_judge_orients_the_only_pair_and_undecided_pairs_are_dropped(tmp_path):
    records, counts = _run(tmp_path, judged=True)
    pairs = Constitutional().rows(records)["preferences"]
    # One pair per kept prompt: no cheap pair beside the judged one to contradict it.
    assert [(p["item_id"], p["source"]) for p in pairs] == [("p00000", "judged"), ("p00002", "judged")]
    initial_better, revision_better = pairs
    assert initial_better["chosen"][0]["content"] == "initial" and initial_better["rejected"][0]["content"].startswith("revised")
    assert revision_better["chosen"][0]["content"].startswith("revised") and revision_better["rejected"][0]["content"] == "initial"
    assert [p["probability_chosen"] for p in pairs] == [0.8, 0.9]
    undecided = next(r for r in records if r.item_id == "p00001")
    assert not undecided.kept and undecided.lineage[-1][0] == "judge" and undecided.lineage[-1][1].filter == "undecided"
    assert "within 0.1 of 0.5" in undecided.lineage[-1][1].reason
    assert counts["judge"].dropped_by_filter == {"undecided": 1} and counts["dataset"].dropped_by_filter == {"unrevised": 1}


def test_without_the_judge_each_prompt_gets_one_cheap_revision_pair(tmp_path):
    records, _ = _run(tmp_path, judged=False)
    pairs = Constitutional().rows(records)["preferences"]
    assert [p["source"] for p in pairs] == ["revision"] * 3
    assert all(p["chosen"][0]["content"].startswith("revised") and p["probability_chosen"] is None for p in pairs)


def test_preference_rows_are_trl_conversational_in_jsonl_and_parquet(tmp_path):
    records, _ = _run(tmp_path, judged=True)
    rows, schema = Constitutional().dataset_tables(records)["preferences"]
    for row in rows:
        # TRL's is_conversational looks at the first message of prompt/chosen/rejected for role and content.
        assert row["prompt"] == [{"role": "user", "content": list(LABELS)[int(row["item_id"][1:])]}]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] and [m["role"] for m in row["rejected"]] == ["assistant"]
    table = pa.Table.from_pylist(rows, schema=schema)  # the Parquet writer's schema accepts the JSONL rows as they are
    assert table.to_pylist() == json.loads(json.dumps(rows))


def test_a_resumed_job_replays_every_stored_step_and_calls_the_critic_no_more(tmp_path):
    params = ConstitutionalParams(
        prompts=list(LABELS),
        constitution=critic_pb2.ConstitutionRef(),
        rounds=1,
        judged_pairs=True,
        chain_of_thought=False,
        sampling=common_pb2.SamplingParams(),
        min_margin=0.1,
    )
    summary, store = run_recipe(tmp_path, {"critic": CriticDouble()}, Constitutional(), params)
    before = asyncio.run(store.results("job"))

    class SilentCritic:
        """A DOUBLE that fails the test if the replay asks the critic anything."""

        def __getattr__(self, name: str) -> NoReturn:
            raise AssertionError(f"the replay called the critic's {name}")

    again = asyncio.run(Constitutional().run(job_context(store, {"critic": SilentCritic()}), params))
    assert again == summary and asyncio.run(store.results("job")) == before
