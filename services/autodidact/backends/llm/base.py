"""The LLM port: what model-serving services need from a language model.

Adapters (llamacpp here; tgi and openai_compat later) implement LLM. Requests
arrive already validated against static bounds; an adapter still raises
InvalidArgument for what only it can check (a prompt that does not fit its
context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


# A plain-text prompt, or chat turns rendered with the model's chat template.
Prompt = str | tuple[ChatTurn, ...]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Constrained sampling, at most one: a llama.cpp GBNF grammar, or a JSON
    # schema (JSON text). A backend that cannot honour one refuses the request
    # (InvalidArgument naming the field and the backend) rather than sample free text.
    grammar: str = ""
    json_schema: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    sampling: Sampling
    # One sample per seed; a sample depends only on (prompt, sampling, seed).
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class GeneratedSample:
    text: str
    finish_reason: FinishReason
    seed: int
    completion_tokens: int


@dataclass(frozen=True)
class Generation:
    samples: tuple[GeneratedSample, ...]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)


@dataclass(frozen=True)
class TokenScore:
    token: str
    token_id: int
    # None for a first token that nothing conditions.
    logprob: float | None
    char_offset: int


@dataclass(frozen=True)
class ModelDescription:
    backend: str
    model: str
    context_length: int


class LLM(Protocol):
    """A language model behind a model-serving service."""

    @property
    def description(self) -> ModelDescription: ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Draws one sample per seed of the request."""
        ...

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        """Log-probability of every token of `text`, conditioned on `context` (not scored)."""
        ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ScoringSequence:
    """Token ids to score, without any beginning-of-sequence token (the
    backend adds its model's). Log-probabilities are wanted for
    tokens[first_scored:], each given every token before it."""

    tokens: tuple[int, ...]
    first_scored: int


@dataclass(frozen=True)
class SequenceScores:
    # Per sequence: log-probabilities of tokens[first_scored:].
    logprobs: list[np.ndarray]
    # Per sequence: for each scored position, the log-probabilities that the
    # token there is each of the requested alternative token ids instead
    # (shape [scored tokens, alternatives]).
    alternatives: list[np.ndarray]
    # Tokens the model evaluated (prefixes shared between sequences count once).
    tokens_evaluated: int


class TokenScorer(Protocol):
    """Token-level scoring, for Toolformer's position sampling and filter.

    The embedded backend has it. TGI scores text only through its prefill
    details, without the next-token distribution at every position, so the
    scorer refuses those methods there (FAILED_PRECONDITION).
    """

    async def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no beginning-of-sequence token) and each one's offset in code points."""
        ...

    async def score_sequences(self, sequences: list[ScoringSequence], alternatives: tuple[int, ...] = ()) -> SequenceScores: ...
