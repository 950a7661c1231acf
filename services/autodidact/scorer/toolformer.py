"""Toolformer's two scoring steps (Schick et al. 2023; ALGORITHMS.md §1).

Position sampling: the probability that the next token opens a call, at every
position of a document, given the tool's prompt P(x).

Filtering: a candidate call z at position i is kept when
    L⁻ − L⁺ ≥ τf,  L⁺ = L_i(z with result),  L⁻ = min(L_i(no call), L_i(z without result)),
    L_i(z) = −Σ_t w_t · log p(x_{i+t} | z, x_1..x_{i+t−1}),  w normalised to sum 1.

The work is done once (exact; the decisions equal a pass-per-loss
implementation of the formula, tested):
- Only len(w) tokens after i carry weight, so no sequence goes further.
- L(no call) at every position comes from one sequence over the document.
- With the call as a prefix, one sequence per distinct call text serves every
  position that call is proposed at: positions differ only in which rows are
  read.
- Sequences are scored in sorted order, so shared prefixes ("[Calculator(")
  are evaluated once (the backend's KV-cache reuse).
- L(call without result) is needed only when L(no call) − L⁺ ≥ τf: otherwise
  L⁻ ≤ L(no call) already decides "drop". Those candidates are scored only
  when every loss is asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from autodidact.backends.llm.base import ScoringSequence, SequenceScores

Placement = Literal["prefix", "inline"]
DEFAULT_WEIGHTS = (1.0, 0.8, 0.6, 0.4, 0.2)  # max(0, 1 − 0.2t)
Score = Callable[[list[ScoringSequence]], Awaitable[SequenceScores]]


@dataclass(frozen=True)
class Candidate:
    id: str
    position: int  # index of the document token the call precedes (at least 1)
    without_result: tuple[int, ...]  # call tokens, as placed (a prefix call ends with its separator)
    with_result: tuple[int, ...]


@dataclass(frozen=True)
class CallDecision:
    id: str
    loss_with_result: float
    loss_without_call: float
    loss_without_result: float | None  # None when not needed for the decision
    loss_minus: float | None
    keep: bool


def normalise_weights(weights: tuple[float, ...]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()


def weighted_loss(logprobs: np.ndarray, weights: np.ndarray) -> float:
    """−Σ w_t log p_t over the tokens there are (a document may end first)."""
    return float(-(weights[: len(logprobs)] * logprobs[: len(weights)]).sum())


class _Plan:
    """The sequences one round of scoring needs, and where each loss is read."""

    def __init__(self, document: tuple[int, ...], span: int, placement: Placement) -> None:
        self.document, self.span, self.placement = document, span, placement
        self.sequences: list[ScoringSequence] = []
        self._reads: list[tuple[int, int]] = []  # (sequence, offset of the position in it)

    def end(self, position: int) -> int:
        return min(len(self.document), position + self.span)

    def add(self, items: list[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Adds (position, call tokens) items; returns a read handle for each."""
        handles = []
        if self.placement == "prefix":
            by_call: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for position, call in items:
                by_call[call].append(position)
            sequence_of: dict[tuple[int, ...], int] = {}
            for call, positions in by_call.items():
                sequence_of[call] = len(self.sequences)
                self.sequences.append(ScoringSequence(call + self.document[: self.end(max(positions))], len(call) + min(positions)))
            for position, call in items:
                handles.append(self._read(sequence_of[call], len(call) + position))
        else:
            for position, call in items:
                tokens = self.document[:position] + call + self.document[position : self.end(position)]
                self.sequences.append(ScoringSequence(tokens, position + len(call)))
                handles.append(self._read(len(self.sequences) - 1, position + len(call)))
        return handles

    def add_document(self, positions: list[int]) -> list[int]:
        self.sequences.append(ScoringSequence(self.document[: self.end(max(positions))], min(positions)))
        return [self._read(len(self.sequences) - 1, p) for p in positions]

    def _read(self, sequence: int, offset: int) -> int:
        self._reads.append((sequence, offset))
        return len(self._reads) - 1

    def losses(self, scores: SequenceScores, handles: list[int], weights: np.ndarray) -> list[float]:
        out = []
        for handle in handles:
            sequence, offset = self._reads[handle]
            start = offset - self.sequences[sequence].first_scored
            out.append(weighted_loss(scores.logprobs[sequence][start : start + len(weights)], weights))
        return out


async def filter_calls(
    document: tuple[int, ...],
    candidates: list[Candidate],
    score: Score,
    *,
    threshold: float,
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    placement: Placement = "prefix",
    all_losses: bool = False,
) -> tuple[list[CallDecision], int]:
    """The keep/drop decision of every candidate, and the tokens evaluated."""
    w = normalise_weights(weights)
    first = _Plan(document, len(w), placement)
    no_call = first.add_document([c.position for c in candidates])
    with_result = first.add([(c.position, c.with_result) for c in candidates])
    scores = await score(first.sequences)
    evaluated = scores.tokens_evaluated
    loss_no_call = first.losses(scores, no_call, w)
    loss_plus = first.losses(scores, with_result, w)

    needed = [k for k, c in enumerate(candidates) if all_losses or loss_no_call[k] - loss_plus[k] >= threshold]
    loss_without_result: dict[int, float] = {}
    if needed:
        second = _Plan(document, len(w), placement)
        handles = second.add([(candidates[k].position, candidates[k].without_result) for k in needed])
        second_scores = await score(second.sequences)
        evaluated += second_scores.tokens_evaluated
        loss_without_result = dict(zip(needed, second.losses(second_scores, handles, w), strict=True))

    decisions = []
    for k, candidate in enumerate(candidates):
        without = loss_without_result.get(k)
        minus = None if without is None else min(loss_no_call[k], without)
        decisions.append(
            CallDecision(
                id=candidate.id,
                loss_with_result=loss_plus[k],
                loss_without_call=loss_no_call[k],
                loss_without_result=without,
                loss_minus=minus,
                keep=minus is not None and minus - loss_plus[k] >= threshold,
            )
        )
    return decisions, evaluated


@dataclass(frozen=True)
class MarkerPosition:
    token_index: int
    char_offset: int
    probability: float


def best_positions(marker_logprobs: np.ndarray, offsets: list[int], *, threshold: float, top_k: int) -> list[MarkerPosition]:
    """Positions whose summed marker probability exceeds τs, the k most probable first.

    marker_logprobs has one row per document token from index 1 on (the
    probability that a call opens just before that token) and one column per
    marker token.
    """
    probability = np.exp(marker_logprobs).sum(axis=1)
    order = np.argsort(-probability, kind="stable")
    kept = [int(r) for r in order if probability[r] > threshold][:top_k]
    return [MarkerPosition(token_index=r + 1, char_offset=offsets[r + 1], probability=float(probability[r])) for r in kept]
