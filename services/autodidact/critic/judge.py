"""Constitutional AI's two model-facing steps, over two ports (a chat
generator and the scorer's option probabilities), so this module never talks
to the network itself.

Revision: per round one principle is drawn from random.Random(seed), then the
model critiques the current answer with the principle's critique request and
revises it with its revision request. The few-shot examples come first as
earlier turns of the same conversation (small models mix up the roles without
them). Each round starts from the prompt and the latest answer only, so the
conversation stays the same size however many rounds run.

Preference: the feedback prompt shows the conversation, the principle's
question and the two answers as options (A) and (B); the label is the
normalised probability of " (A)" against " (B)". Both orders are asked and
combined (P(first better) from one order, 1 − P(A) from the other), so the
label of a pair is the same whichever answer is passed first. With chain of
thought, each order's probability is clamped to [0.4, 0.6], as the paper
does, since reasoning pushes them to 0 or 1.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from autodidact.v1 import critic_pb2

# (chat turns as (role, content), seed) -> the assistant's next message.
Chat = Callable[[list[tuple[str, str]], int], Awaitable[str]]
# (context, options) -> normalised probabilities of the options.
CompareOptions = Callable[[str, list[str]], Awaitable[list[float]]]
# (prompt, seed) -> a plain-text continuation (chain-of-thought reasoning).
Continue = Callable[[str, int], Awaitable[str]]
OPTIONS = [" (A)", " (B)"]
COT_CLAMP = (0.4, 0.6)


@dataclass(frozen=True)
class Round:
    principle: str
    critique: str
    revision: str
    seed: int


def _example_turns(constitution: critic_pb2.Constitution) -> list[tuple[str, str]]:
    by_name = {p.name: p for p in constitution.principles}
    turns: list[tuple[str, str]] = []
    for example in constitution.examples:
        principle = by_name[example.principle]
        turns += [
            ("user", example.prompt),
            ("assistant", example.response),
            ("user", principle.critique_request),
            ("assistant", example.critique),
            ("user", principle.revision_request),
            ("assistant", example.revision),
        ]
    return turns


async def revise(chat: Chat, constitution: critic_pb2.Constitution, prompt: str, initial: str, rounds: int, seed: int) -> list[Round]:
    draw = random.Random(seed)
    examples = _example_turns(constitution)
    answer = initial
    out = []
    for number in range(rounds):
        principle = draw.choice(list(constitution.principles))
        round_seed = (seed + 2 * (number + 1)) % 2**32
        conversation = [*examples, ("user", prompt), ("assistant", answer), ("user", principle.critique_request)]
        critique = (await chat(conversation, round_seed)).strip()
        conversation += [("assistant", critique), ("user", principle.revision_request)]
        revision = (await chat(conversation, (round_seed + 1) % 2**32)).strip()
        answer = revision or answer  # an empty revision keeps the answer it was meant to improve
        out.append(Round(principle.name, critique, revision, round_seed))
    return out


def pick_principle(constitution: critic_pb2.Constitution, seed: int) -> critic_pb2.Principle:
    return random.Random(seed).choice(list(constitution.principles))


def feedback_prompt(prompt: str, first: str, second: str, question: str) -> str:
    return (
        "Consider the following conversation between a person and an assistant:\n\n"
        f"Person: {prompt}\n\n"
        f"{question}\n"
        "Options:\n"
        f"(A) {first}\n"
        f"(B) {second}\n"
    )


@dataclass(frozen=True)
class OrderedJudgement:
    swapped: bool
    probability_a: float  # that response_a is better, read from this order
    reasoning: str


async def judge(
    compare: CompareOptions,
    cont: Continue | None,
    constitution: critic_pb2.Constitution,
    prompt: str,
    response_a: str,
    response_b: str,
    seed: int,
) -> tuple[float, list[OrderedJudgement], str]:
    """(probability that response_a is better, both orders' judgements, the principle's name)."""
    principle = pick_principle(constitution, seed)
    question = principle.preference_question or constitution.preference_question
    judgements = []
    for swapped in (False, True):
        first, second = (response_b, response_a) if swapped else (response_a, response_b)
        context = feedback_prompt(prompt, first, second, question)
        reasoning = ""
        if cont is not None:
            # The seed depends on what is shown, not on which call showed it: swapping the
            # request's responses then reproduces the same two reasoning samples.
            order_seed = int.from_bytes(hashlib.blake2b(f"{seed}\0{first}\0{second}".encode(), digest_size=4).digest(), "big")
            reasoning = (await cont(context + "Let's think step by step:", order_seed)).strip()
            context += f"Let's think step by step: {reasoning}\nSo the answer is:"
        else:
            context += "The answer is:"
        p_first = (await compare(context, OPTIONS))[0]
        if cont is not None:
            p_first = min(max(p_first, COT_CLAMP[0]), COT_CLAMP[1])
        judgements.append(OrderedJudgement(swapped, 1.0 - p_first if swapped else p_first, reasoning))
    return sum(j.probability_a for j in judgements) / 2, judgements, principle.name
