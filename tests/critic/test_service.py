"""The critic over real gRPC, with a real generator and scorer on the embedded model;
and the scorer's option probabilities and votes it relies on."""

from __future__ import annotations

import math
import random

import grpc
import pytest
import pytest_asyncio

from autodidact.critic.constitution import Constitutions
from autodidact.runtime.channels import create_channel
from autodidact.v1 import common_pb2, critic_pb2, critic_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from tests.conftest import details_of
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROMPT = common_pb2.Prompt(text="How do I get my neighbour's dog to stop barking at night?")
SHORT = common_pb2.SamplingParams(max_tokens=24)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stubs(tmp_path_factory):
    stack = await start_stack(tmp_path_factory.mktemp("critic"), ("generator", "scorer", "critic"))
    async with (
        create_channel(stack.target("critic"), timeout_seconds=600) as critic,
        create_channel(stack.target("scorer"), timeout_seconds=600) as scorer,
    ):
        yield critic_pb2_grpc.CriticServiceStub(critic), scorer_pb2_grpc.ScorerServiceStub(scorer)
    await stack.stop()


async def test_revise_draws_one_principle_per_round_from_the_seed_and_repeats_exactly(stubs):
    critic, _ = stubs
    request = critic_pb2.ReviseRequest(prompt=PROMPT, rounds=3, sampling=SHORT, seed=11)
    first = await critic.Revise(request)
    again = await critic.Revise(request)
    assert first == again
    principles = list(Constitutions.load().resolve("", "").principles)
    draw = random.Random(11)
    assert [r.principle for r in first.rounds] == [draw.choice(principles).name for _ in range(3)]
    assert first.initial_response and len(first.rounds) == 3
    assert first.final_revision == next(r.revision for r in reversed(first.rounds) if r.revision)
    assert first.constitution.name == "autodidact-default" and first.constitution.version == "1" and first.seed == 11
    given = await critic.Revise(
        critic_pb2.ReviseRequest(prompt=PROMPT, rounds=1, sampling=SHORT, seed=11, initial_response="Shout at the dog.")
    )
    assert given.initial_response == "Shout at the dog."


@pytest.mark.parametrize("chain_of_thought", [False, True])
async def test_the_preference_label_does_not_depend_on_which_answer_comes_first(stubs, chain_of_thought):
    critic, _ = stubs
    kind = "Talk to your neighbour politely and ask whether the dog could sleep inside."
    rude = "Poison the dog."

    async def label(a: str, b: str) -> critic_pb2.JudgePreferenceResponse:
        return await critic.JudgePreference(
            critic_pb2.JudgePreferenceRequest(prompt=PROMPT, response_a=a, response_b=b, seed=5, chain_of_thought=chain_of_thought)
        )

    forward, backward = await label(kind, rude), await label(rude, kind)
    assert forward.probability_a == pytest.approx(1 - backward.probability_a, abs=1e-12)
    assert forward.principle == backward.principle
    assert sorted(j.swapped for j in forward.judgements) == [False, True]
    assert forward.probability_a == pytest.approx(sum(j.probability_a for j in forward.judgements) / 2)
    if chain_of_thought:
        assert all(0.4 <= j.probability_a <= 0.6 and j.reasoning for j in forward.judgements)
    else:
        assert all(0.0 <= j.probability_a <= 1.0 and not j.reasoning for j in forward.judgements)


async def test_compare_options_normalises_the_options_log_probabilities(stubs):
    _, scorer = stubs
    response = await scorer.CompareOptions(
        scorer_pb2.CompareOptionsRequest(context="Which is larger, 3 or 30? The answer is:", options=[" (A)", " (B)", " 30"])
    )
    assert sum(response.probabilities) == pytest.approx(1.0)
    peak = max(response.logprobs)
    weights = [math.exp(lp - peak) for lp in response.logprobs]
    assert list(response.probabilities) == pytest.approx([w / sum(weights) for w in weights])
    assert all(lp < 0 for lp in response.logprobs)


async def test_votes_majority_and_length_normalised(stubs):
    _, scorer = stubs
    paths = ["3 + 4 = 7. The answer is 7.", "3 + 4 = 8. The answer is 8.", "So 7 in all. The answer is 7.", "I am not sure."]
    request = scorer_pb2.VoteRequest(prompt="Q: What is 3 + 4?\nA:", paths=[scorer_pb2.ReasoningPath(text=p) for p in paths])
    majority = await scorer.Vote(request)
    assert majority.winner == "7" and majority.confidence == pytest.approx(2 / 3)
    assert [v.answer for v in majority.votes] == ["7", "8", "7", ""] and [v.agrees for v in majority.votes] == [True, False, True, False]
    request.method = scorer_pb2.VOTE_METHOD_LENGTH_NORMALIZED_PROBABILITY
    weighted = await scorer.Vote(request)
    assert all(0 < v.weight < 1 for v in weighted.votes[:3]) and weighted.votes[3].weight == 0
    assert weighted.tallies[0].weight == pytest.approx(max(t.weight for t in weighted.tallies))


@pytest.mark.parametrize(
    ("method", "request_", "code", "text"),
    [
        (
            "Revise",
            critic_pb2.ReviseRequest(prompt=PROMPT, rounds=17),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rounds: must be between 1 and 16",
        ),
        ("Revise", critic_pb2.ReviseRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt: is required"),
        (
            "Revise",
            critic_pb2.ReviseRequest(prompt=PROMPT, constitution=critic_pb2.ConstitutionRef(name="nope")),
            grpc.StatusCode.NOT_FOUND,
            "no constitution nope",
        ),
        (
            "Revise",
            critic_pb2.ReviseRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(temperature=9)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.temperature",
        ),
        (
            "JudgePreference",
            critic_pb2.JudgePreferenceRequest(prompt=PROMPT, response_a="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "response_b: must not be empty",
        ),
    ],
)
async def test_bad_critic_requests_are_refused(stubs, method, request_, code, text):
    critic, _ = stubs
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(critic, method)(request_)
    assert raised.value.code() == code and text in details_of(raised.value)


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Vote", scorer_pb2.VoteRequest(paths=[scorer_pb2.ReasoningPath(text="x")], answer_pattern="(unclosed"), "answer_pattern"),
        ("Vote", scorer_pb2.VoteRequest(), "paths"),
        ("CompareOptions", scorer_pb2.CompareOptionsRequest(context="c", options=["only one"]), "options"),
    ],
)
async def test_bad_scorer_requests_are_refused(stubs, method, request_, field):
    _, scorer = stubs
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(scorer, method)(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and details_of(raised.value).startswith(f"{field}:")


async def test_constitutions_are_listed_and_fetched(stubs):
    critic, _ = stubs
    listed = await critic.ListConstitutions(critic_pb2.ListConstitutionsRequest())
    assert [(c.name, c.version) for c in listed.constitutions] == [("autodidact-default", "1")]
    got = await critic.GetConstitution(critic_pb2.GetConstitutionRequest(ref=critic_pb2.ConstitutionRef(name="autodidact-default")))
    assert got.constitution.principles[0].revision_request
