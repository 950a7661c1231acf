"""The critic servicer: validate, run critique→revision rounds or the
preference judge over the generator and the scorer, map the result."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from autodidact.critic.constitution import Constitutions
from autodidact.critic.judge import judge, revise
from autodidact.errors import FailedPrecondition, InvalidArgument
from autodidact.generator.requests import sampling_with_defaults
from autodidact.runtime.channels import create_channel
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.neighbours import neighbour_error
from autodidact.v1 import common_pb2, critic_pb2, critic_pb2_grpc, generator_pb2, generator_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from autodidact.validation import check_length, check_range

SERVICE_NAME = critic_pb2.DESCRIPTOR.services_by_name["CriticService"].full_name
MAX_TEXT_CHARS = 65_536
DEFAULT_SAMPLING = common_pb2.SamplingParams(temperature=1.0, max_tokens=256)
REASONING_TOKENS = 128
CALL_SECONDS = 600.0
UINT32 = 2**32


@dataclass(frozen=True)
class CriticSettings:
    generator_target: str = "localhost:50051"
    scorer_target: str = "localhost:50052"
    # Constitution files (*.yaml) added to the built-in ones.
    constitutions_dir: Path | None = None


def _prompt_text(prompt: common_pb2.Prompt, field: str = "prompt") -> str:
    """The conversation to answer, as the user's text (a chat prompt's turns joined)."""
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(field, "is required")
    text = prompt.text if kind == "text" else "\n".join(m.content for m in prompt.chat.messages)
    check_length(field, text.strip(), 1, MAX_TEXT_CHARS)
    return text


class Neighbours:
    """The critic's channels to the generator and the scorer."""

    def __init__(self, settings: CriticSettings) -> None:
        self._channels = (
            create_channel(settings.generator_target, timeout_seconds=CALL_SECONDS),
            create_channel(settings.scorer_target, timeout_seconds=CALL_SECONDS),
        )
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self._channels[0])
        self.scorer = scorer_pb2_grpc.ScorerServiceStub(self._channels[1])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class CriticServicer(critic_pb2_grpc.CriticServiceServicer):
    def __init__(self, constitutions: Constitutions, neighbours: Resource[Neighbours]) -> None:
        self.constitutions = constitutions
        self._neighbours = neighbours

    def _stubs(self) -> tuple[generator_pb2_grpc.GeneratorServiceStub, scorer_pb2_grpc.ScorerServiceStub]:
        neighbours = self._neighbours.get()
        return neighbours.generator, neighbours.scorer

    async def ListConstitutions(self, request, context) -> critic_pb2.ListConstitutionsResponse:  # noqa: ANN001
        return critic_pb2.ListConstitutionsResponse(
            constitutions=[critic_pb2.ConstitutionRef(name=n, version=v) for n, v in self.constitutions.refs()]
        )

    async def GetConstitution(self, request, context) -> critic_pb2.GetConstitutionResponse:  # noqa: ANN001
        if not request.ref.name:
            raise InvalidArgument("ref.name", "is required")
        return critic_pb2.GetConstitutionResponse(constitution=self.constitutions.resolve(request.ref.name, request.ref.version, "ref"))

    async def Revise(self, request: critic_pb2.ReviseRequest, context: grpc.aio.ServicerContext) -> critic_pb2.ReviseResponse:
        generator, _ = self._stubs()
        prompt = _prompt_text(request.prompt)
        check_length("initial_response", request.initial_response, 0, MAX_TEXT_CHARS)
        rounds = request.rounds or 4
        check_range("rounds", rounds, 1, 16)
        sampling = sampling_with_defaults(request.sampling, DEFAULT_SAMPLING, "sampling")
        constitution = self.constitutions.resolve(request.constitution.name, request.constitution.version)
        seed = request.seed if request.HasField("seed") else random.randrange(UINT32)
        model = common_pb2.ModelInfo()

        async def chat(turns: list[tuple[str, str]], sample_seed: int) -> str:
            messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]
            response = await _call(
                generator.Generate(
                    generator_pb2.GenerateRequest(
                        prompt=common_pb2.Prompt(chat=common_pb2.Chat(messages=messages)),
                        sampling=sampling,
                        n=1,
                        seed=sample_seed,
                    ),
                    timeout=CALL_SECONDS,
                ),
                "generator",
            )
            model.CopyFrom(response.model)
            return response.samples[0].text

        initial = request.initial_response or (await chat([("user", prompt)], seed)).strip()
        if not initial:
            raise FailedPrecondition("the generator gave an empty initial response; pass initial_response or another seed")
        done = await revise(chat, constitution, prompt, initial, int(rounds), seed)
        return critic_pb2.ReviseResponse(
            initial_response=initial,
            rounds=[critic_pb2.RevisionRound(principle=r.principle, critique=r.critique, revision=r.revision, seed=r.seed) for r in done],
            final_revision=next((r.revision for r in reversed(done) if r.revision), initial),
            constitution=critic_pb2.ConstitutionRef(name=constitution.name, version=constitution.version),
            seed=seed,
            model=model,
        )

    async def JudgePreference(
        self, request: critic_pb2.JudgePreferenceRequest, context: grpc.aio.ServicerContext
    ) -> critic_pb2.JudgePreferenceResponse:
        generator, scorer = self._stubs()
        prompt = _prompt_text(request.prompt)
        check_length("response_a", request.response_a, 1, MAX_TEXT_CHARS)
        check_length("response_b", request.response_b, 1, MAX_TEXT_CHARS)
        constitution = self.constitutions.resolve(request.constitution.name, request.constitution.version)
        seed = request.seed if request.HasField("seed") else random.randrange(UINT32)

        async def compare(text: str, options: list[str]) -> list[float]:
            response = await _call(
                scorer.CompareOptions(scorer_pb2.CompareOptionsRequest(context=text, options=options), timeout=CALL_SECONDS), "scorer"
            )
            return list(response.probabilities)

        async def reason(text: str, sample_seed: int) -> str:
            response = await _call(
                generator.Generate(
                    generator_pb2.GenerateRequest(
                        prompt=common_pb2.Prompt(text=text),
                        n=1,
                        seed=sample_seed,
                        sampling=common_pb2.SamplingParams(
                            temperature=1.0, max_tokens=REASONING_TOKENS, stop=["So the answer is", "\nOptions:", "\nPerson:"]
                        ),
                    ),
                    timeout=CALL_SECONDS,
                ),
                "generator",
            )
            return response.samples[0].text

        label, judgements, principle = await judge(
            compare,
            reason if request.chain_of_thought else None,
            constitution,
            prompt,
            request.response_a,
            request.response_b,
            seed,
        )
        return critic_pb2.JudgePreferenceResponse(
            probability_a=label,
            judgements=[
                critic_pb2.OrderedJudgement(swapped=j.swapped, probability_a=j.probability_a, reasoning=j.reasoning) for j in judgements
            ],
            principle=principle,
            constitution=critic_pb2.ConstitutionRef(name=constitution.name, version=constitution.version),
            seed=seed,
        )


async def _call(call: Any, what: str) -> Any:  # Any: the generated stubs type async calls as their responses
    """Awaits a call to a neighbour; its failure reaches the client as UNAVAILABLE or FAILED_PRECONDITION naming it."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise neighbour_error(exc, what) from None


def critic_component(settings: CriticSettings) -> Component:
    constitutions = Constitutions.load(settings.constitutions_dir)  # a bad file stops the start here

    async def connect() -> Neighbours:
        return Neighbours(settings)

    neighbours = Resource("the critic", connect)
    servicer = CriticServicer(constitutions, neighbours)
    return Component(SERVICE_NAME, servicer, critic_pb2_grpc.add_CriticServiceServicer_to_server, neighbours)
