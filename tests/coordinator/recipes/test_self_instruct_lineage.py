"""Self-Instruct's lineage is complete, against deterministic DOUBLES of the
generator and the dedup service (the real ones run in the integration and e2e
tests): candidates of rounds started but not needed end as over_target,
instead of vanishing while sitting in the dedup namespace."""

from __future__ import annotations

import asyncio
import re

import grpc

from autodidact.coordinator.recipes.base import derive_seed
from autodidact.coordinator.recipes.self_instruct import SeedTask, SelfInstruct, SelfInstructParams
from autodidact.v1 import common_pb2, dedup_pb2, generator_pb2
from tests.coordinator.recipes.harness import assert_lineage_agrees, job_context, run_recipe

WINDOW = 3
ROUND_OF_SEED = {derive_seed(7, "instructions", r): r for r in range(20)}


class DedupDouble:
    """Keeps every new text; remembers every id it was sent, as the namespace would."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.batches = 0
        self.three_batches = asyncio.Event()

    async def FilterBatch(self, request, timeout=None):
        self.ids += [item.id for item in request.items]
        if not request.batch_id.startswith("seeds-"):
            self.batches += 1
            if self.batches == 3:
                self.three_batches.set()
        verdicts = [dedup_pb2.DedupVerdict(id=item.id, kept=True, similarity=0.1) for item in request.items]
        return dedup_pb2.FilterBatchResponse(verdicts=verdicts)


class GeneratorDouble:
    """Round r lists "Explain topic r-i ..." (i = 0..2) and "Sing" (too short).
    Round 0's instances wait until rounds 1 and 2 have been through dedup and
    topic 2-0's classification was asked for, so those rounds are under way when
    the target is reached (the classification is stored before round 0's
    instances: the store writes in order); round 2's instances never come (it is
    cancelled mid-round)."""

    def __init__(self, dedup: DedupDouble) -> None:
        self.dedup = dedup
        self.topic_2_0_classifying = asyncio.Event()

    async def Generate(self, request, timeout=None):
        prompt = request.prompt.text
        if prompt.startswith("Come up with a series of tasks"):
            r = ROUND_OF_SEED[request.seed]
            text = "\n".join(f"{n}. Explain topic {r}-{i} to a child in simple words" for n, i in ((9, 0), (10, 1), (11, 2)))
            text = text.removeprefix("9.") + "\n12. Sing"
        elif prompt.endswith("Classification:"):
            if "Explain topic 2-0 " in prompt:
                self.topic_2_0_classifying.set()
            text = " No"
        else:
            topic = re.search(r"topic (\d+)-(\d+)", prompt.rsplit("Task:", 1)[1])
            assert topic
            if topic.group(1) == "0":
                await self.dedup.three_batches.wait()
                await self.topic_2_0_classifying.wait()
            elif topic.group(1) == "2":
                await asyncio.Event().wait()  # never answers: cancelled when the target is reached
            text = f"\nOutput: an answer about topic {topic.group(1)}-{topic.group(2)}"
        sample = common_pb2.Sample(text=text, finish_reason=common_pb2.FINISH_REASON_STOP)
        return generator_pb2.GenerateResponse(samples=[sample], model=common_pb2.ModelInfo(model="double.gguf"))


def small_params() -> SelfInstructParams:
    """Target 2, four seeds, up to 20 rounds."""
    seeds = [SeedTask(f"Seed task number {i} for testing", (("in", "out"),), i % 2 == 0) for i in range(4)]
    return SelfInstructParams(
        seed_tasks=seeds,
        target=2,
        human_per_prompt=2,
        machine_per_prompt=0,
        threshold=0.9,
        namespace="ns",
        instruction_sampling=common_pb2.SamplingParams(),
        instance_sampling=common_pb2.SamplingParams(),
        max_rounds=20,
    )


def test_every_candidate_of_every_started_round_has_one_final_decision(tmp_path):
    params = small_params()
    dedup = DedupDouble()
    summary, store = run_recipe(
        tmp_path,
        {"generator": GeneratorDouble(dedup), "dedup": dedup},
        SelfInstruct(),
        params,
        max_in_flight=WINDOW,
    )
    assert summary["last_round"] == 0 and summary["kept"] == 2
    records = assert_lineage_agrees(store, SelfInstruct(), summary)
    by_id = {r.item_id: r for r in records}
    # Rounds 0..2 were started (the window), 3 was not; each listed 4 candidates.
    assert sorted(by_id) == [f"r{r:05d}-{i:02d}" for r in range(3) for i in range(4)]
    # Everything sent to the dedup namespace is in lineage.
    assert {i.removeprefix("job/") for i in dedup.ids if not i.startswith("seed-")} <= set(by_id)
    assert [r.item_id for r in records if r.kept] == ["r00000-00", "r00000-01"]
    final = {r.item_id: r.lineage[-1] for r in records if not r.kept}
    assert {item: (stage, d.filter) for item, (stage, d) in final.items()} == {
        "r00000-02": ("dataset", "over_target"),  # past the target in the round that reached it
        **{f"r0000{r}-0{i}": ("dataset", "over_target") for r in (1, 2) for i in range(3)},  # rounds not needed
        **{f"r0000{r}-03": ("heuristics", "too_short") for r in range(3)},
    }
    assert final["r00001-00"][1].reason == 'target of 2 reached: "Explain topic 1-0 to a child in simple words"'
    assert final["r00000-03"][1].reason == '1 words (needs more than 3): "Sing"'
    # Round 2 was cut mid-round: classified, never given instances.
    assert [stage for stage, _ in by_id["r00002-00"].lineage] == ["generate_instructions", "heuristics", "diversity", "classify", "dataset"]
    origin = by_id["r00000-00"].lineage[0][1]
    assert (
        origin.model == "double.gguf" and origin.seed == derive_seed(7, "instructions", 0) and origin.template_version == "self_instruct/v1"
    )


class CountingGenerator(GeneratorDouble):
    def __init__(self, dedup: DedupDouble) -> None:
        super().__init__(dedup)
        self.calls = 0

    async def Generate(self, request, timeout=None):
        self.calls += 1
        return await super().Generate(request, timeout)


def test_a_restarted_job_does_not_take_closed_rounds_further(tmp_path):
    """Resuming after the rounds were closed (a crash before SUCCEEDED) replays the
    stored job: rounds past the target stay as they were closed, nothing is generated."""
    params = small_params()
    dedup = DedupDouble()
    first, store = run_recipe(tmp_path, {"generator": GeneratorDouble(dedup), "dedup": dedup}, SelfInstruct(), params, WINDOW)
    before = asyncio.run(store.results("job"))
    again = DedupDouble()
    again.three_batches.set()
    generator = CountingGenerator(again)
    second = asyncio.run(SelfInstruct().run(job_context(store, {"generator": generator, "dedup": again}, WINDOW), params))
    assert second == first and generator.calls == 0
    assert asyncio.run(store.results("job")) == before
    assert_lineage_agrees(store, SelfInstruct(), second)


class RefusingGenerator(GeneratorDouble):
    """Refuses (INVALID_ARGUMENT) to classify one candidate: "Explain topic 0-1"."""

    async def Generate(self, request, timeout=None):
        if request.prompt.text.endswith("Classification:") and "topic 0-1 " in request.prompt.text:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "prompt: refused")
        return await super().Generate(request, timeout)


def test_a_candidate_a_service_refuses_is_dropped_with_filter_error_and_the_job_goes_on(tmp_path):
    params = small_params()
    dedup = DedupDouble()
    summary, store = run_recipe(
        tmp_path,
        {"generator": RefusingGenerator(dedup), "dedup": dedup},
        SelfInstruct(),
        params,
        max_in_flight=WINDOW,
    )
    assert summary["kept"] == 2  # before: the refusal failed the whole job
    records = assert_lineage_agrees(store, SelfInstruct(), summary)
    by_id = {r.item_id: r for r in records}
    assert [r.item_id for r in records if r.kept] == ["r00000-00", "r00000-02"]
    stage, decision = by_id["r00000-01"].lineage[-1]
    assert (stage, decision.filter) == ("classify", "error") and "INVALID_ARGUMENT: prompt: refused" in decision.reason
