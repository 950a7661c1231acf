"""The scorer servicer: validate, score with the backend, map the result.

Toolformer's methods need token-level scoring (the TokenScorer port, which
the embedded llama.cpp backend has); ScoreText works on every backend.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

from autodidact.backends.llm import LLM
from autodidact.backends.llm.base import ScoringSequence, SequenceScores, TokenScorer
from autodidact.errors import FailedPrecondition, InvalidArgument
from autodidact.generator.requests import model_info
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.metrics import SCORED_TOKENS, TOOL_CALL_DECISIONS
from autodidact.scorer.toolformer import DEFAULT_WEIGHTS, Candidate, Placement, best_positions, filter_calls
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern, extract_answers, vote
from autodidact.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from autodidact.validation import check_count, check_length, check_range

SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name
MAX_TEXT_CHARS = 65_536
MAX_CALL_CHARS = 4096
DEFAULT_MARKERS = ("[", " [")
DEFAULT_MARKER_THRESHOLD = 0.05
DEFAULT_TOP_K = 5
DEFAULT_FILTER_THRESHOLD = 1.0
PREFIX_SEPARATOR = "\n"  # between a prefix call and the document


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    def __init__(self, backend: Resource[LLM]) -> None:
        self._backend = backend

    def _token_scorer(self) -> TokenScorer:
        backend = self._backend.get()
        if not hasattr(backend, "score_sequences"):
            raise FailedPrecondition(
                f"backend {backend.description.backend} cannot score token sequences; Toolformer scoring needs the llamacpp backend"
            )
        return cast(TokenScorer, backend)

    async def ScoreText(self, request: scorer_pb2.ScoreTextRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreTextResponse:
        backend = self._backend.get()
        check_count("items", request.items, 1, 256)
        for i, item in enumerate(request.items):
            check_length(f"items[{i}].context", item.context, 0, MAX_TEXT_CHARS)
            check_length(f"items[{i}].text", item.text, 1, MAX_TEXT_CHARS)
        scores = []
        for item in request.items:
            tokens = await backend.logprobs(item.text, item.context)
            SCORED_TOKENS.labels("ScoreText").inc(len(tokens))
            scores.append(
                scorer_pb2.TextScore(
                    tokens=[_token_proto(t) for t in tokens],
                    logprob_sum=sum(t.logprob for t in tokens if t.logprob is not None),
                )
            )
        return scorer_pb2.ScoreTextResponse(scores=scores, model=model_info(backend.description))

    async def MarkerProbabilities(
        self, request: scorer_pb2.MarkerProbabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.MarkerProbabilitiesResponse:
        scorer = self._token_scorer()
        check_length("prompt", request.prompt, 0, MAX_TEXT_CHARS)
        check_length("text", request.text, 1, MAX_TEXT_CHARS)
        check_count("marker_tokens", request.marker_tokens, 0, 8)
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_MARKER_THRESHOLD
        check_range("threshold", threshold, 0.0, 1.0)
        top_k = request.top_k or DEFAULT_TOP_K
        check_range("top_k", top_k, 1, 1024)
        markers = []
        for i, marker in enumerate(request.marker_tokens or DEFAULT_MARKERS):
            ids, _ = await scorer.tokenize_with_offsets(marker)
            if len(ids) != 1:
                raise InvalidArgument(f"marker_tokens[{i}]", f"{marker!r} is {len(ids)} tokens of this model, not one")
            markers.append(ids[0])
        prompt_tokens, _ = await scorer.tokenize_with_offsets(request.prompt) if request.prompt else ([], [])
        document, offsets = await scorer.tokenize_with_offsets(request.text)
        if len(document) < 2:
            raise InvalidArgument("text", "must be at least 2 tokens: a call goes between two tokens")
        sequence = ScoringSequence(tuple(prompt_tokens + document), len(prompt_tokens) + 1)
        scores = await _scored(scorer, [sequence], "MarkerProbabilities", tuple(markers))
        positions = best_positions(scores.alternatives[0], offsets, threshold=threshold, top_k=int(top_k))
        return scorer_pb2.MarkerProbabilitiesResponse(
            positions=[
                scorer_pb2.MarkerPosition(token_index=p.token_index, char_offset=p.char_offset, probability=p.probability)
                for p in positions
            ],
            positions_considered=len(document) - 1,
            model=model_info(self._backend.get().description),
        )

    async def FilterToolCalls(
        self, request: scorer_pb2.FilterToolCallsRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.FilterToolCallsResponse:
        scorer = self._token_scorer()
        check_length("text", request.text, 1, MAX_TEXT_CHARS)
        check_count("candidates", request.candidates, 1, 1024)
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_FILTER_THRESHOLD
        check_range("threshold", threshold, -100.0, 100.0)
        weights = tuple(request.weights) or DEFAULT_WEIGHTS
        check_count("weights", weights, 1, 64)
        if min(weights) < 0 or not sum(weights) > 0:
            raise InvalidArgument("weights", "must be non-negative with a positive sum")
        placement: Placement = "inline" if request.placement == scorer_pb2.CALL_PLACEMENT_INLINE else "prefix"

        document, offsets = await scorer.tokenize_with_offsets(request.text)
        position_of = {offset: index for index, offset in enumerate(offsets) if index > 0}
        seen: set[str] = set()
        candidates = []
        separator = PREFIX_SEPARATOR if placement == "prefix" else ""
        call_tokens: dict[str, tuple[int, ...]] = {}  # sampled calls repeat: tokenize each text once

        async def tokens_of(call: str) -> tuple[int, ...]:
            if call not in call_tokens:
                call_tokens[call] = tuple((await scorer.tokenize_with_offsets(call + separator))[0])
            return call_tokens[call]

        for i, call in enumerate(request.candidates):
            field = f"candidates[{i}]"
            check_length(f"{field}.id", call.id, 1, 256)
            if call.id in seen:
                raise InvalidArgument(f"{field}.id", f"{call.id!r} appears twice in the request")
            seen.add(call.id)
            check_length(f"{field}.call_without_result", call.call_without_result, 1, MAX_CALL_CHARS)
            check_length(f"{field}.call_with_result", call.call_with_result, 1, MAX_CALL_CHARS)
            if call.char_offset not in position_of:
                raise InvalidArgument(
                    f"{field}.char_offset",
                    f"{call.char_offset} is not the start of a document token after the first (use MarkerPosition.char_offset)",
                )
            without, with_result = await tokens_of(call.call_without_result), await tokens_of(call.call_with_result)
            candidates.append(Candidate(call.id, position_of[call.char_offset], without, with_result))

        async def score(sequences: list[ScoringSequence]) -> SequenceScores:
            return await _scored(scorer, sequences, "FilterToolCalls")

        decisions, evaluated = await filter_calls(
            tuple(document),
            candidates,
            score,
            threshold=threshold,
            weights=weights,
            placement=placement,
            all_losses=request.all_losses,
        )
        response = scorer_pb2.FilterToolCallsResponse(tokens_evaluated=evaluated, model=model_info(self._backend.get().description))
        for decision in decisions:
            TOOL_CALL_DECISIONS.labels("kept" if decision.keep else "dropped").inc()
            proto = response.decisions.add(
                id=decision.id,
                loss_with_result=decision.loss_with_result,
                loss_without_call=decision.loss_without_call,
                keep=decision.keep,
            )
            if decision.loss_without_result is not None and decision.loss_minus is not None:
                proto.loss_without_result = decision.loss_without_result
                proto.loss_minus = decision.loss_minus
        return response

    async def CompareOptions(
        self, request: scorer_pb2.CompareOptionsRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.CompareOptionsResponse:
        backend = self._backend.get()
        check_length("context", request.context, 1, MAX_TEXT_CHARS)
        check_count("options", request.options, 2, 16)
        for i, option in enumerate(request.options):
            check_length(f"options[{i}]", option, 1, 256)
        logprobs = []
        for option in request.options:
            tokens = await backend.logprobs(option, request.context)
            SCORED_TOKENS.labels("CompareOptions").inc(len(tokens))
            logprobs.append(sum(t.logprob for t in tokens if t.logprob is not None))
        peak = max(logprobs)
        weights = [math.exp(lp - peak) for lp in logprobs]
        return scorer_pb2.CompareOptionsResponse(
            logprobs=logprobs, probabilities=[w / sum(weights) for w in weights], model=model_info(backend.description)
        )

    async def Vote(self, request: scorer_pb2.VoteRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.VoteResponse:
        check_length("prompt", request.prompt, 0, MAX_TEXT_CHARS)
        check_count("paths", request.paths, 1, 1024)
        for i, path in enumerate(request.paths):
            check_length(f"paths[{i}].text", path.text, 1, MAX_TEXT_CHARS)
        # Compiling and matching client patterns over up to 64 MiB of paths is CPU
        # work: it runs off the event loop (bounded in time), so health checks and
        # other calls are answered meanwhile.
        answers = await asyncio.to_thread(_answers, request.answer_pattern, [path.text for path in request.paths])
        weights = [1.0] * len(answers)
        if request.method == scorer_pb2.VOTE_METHOD_LENGTH_NORMALIZED_PROBABILITY:
            backend = self._backend.get()
            for i, path in enumerate(request.paths):
                if answers[i]:
                    tokens = [t.logprob for t in await backend.logprobs(path.text, request.prompt) if t.logprob is not None]
                    SCORED_TOKENS.labels("Vote").inc(len(tokens))
                    weights[i] = math.exp(sum(tokens) / len(tokens)) if tokens else 0.0
        result = vote(answers, weights)
        return scorer_pb2.VoteResponse(
            winner=result.winner,
            confidence=result.confidence,
            votes=[
                scorer_pb2.PathVote(answer=a, agrees=bool(a) and a == result.winner, weight=w if a else 0.0)
                for a, w in zip(answers, weights, strict=True)
            ],
            tallies=[scorer_pb2.AnswerTally(answer=t.answer, count=t.count, weight=t.weight) for t in result.tallies],
        )


def _answers(pattern: str, paths: list[str]) -> list[str]:
    return extract_answers(paths, compile_pattern(pattern or DEFAULT_ANSWER_PATTERN))


async def _scored(scorer: TokenScorer, sequences: list[ScoringSequence], method: str, alternatives: tuple[int, ...] = ()) -> SequenceScores:
    scores = await scorer.score_sequences(sequences, alternatives)
    SCORED_TOKENS.labels(method).inc(scores.tokens_evaluated)
    return scores


def _token_proto(token: Any) -> common_pb2.TokenLogprob:
    proto = common_pb2.TokenLogprob(token=token.token, token_id=token.token_id, char_offset=token.char_offset)
    if token.logprob is not None:
        proto.logprob = token.logprob
    return proto


def scorer_component(load_backend: Callable[[], Awaitable[LLM]]) -> Component:
    async def load_warm() -> LLM:
        backend = await load_backend()
        # The first score creates the backend's scoring context (llama.cpp keeps logits for every
        # position there); doing it now keeps that cost and its silenced stderr out of the first request.
        await backend.logprobs("ready", "")
        return backend

    backend = Resource("the model", load_warm)
    return Component(SERVICE_NAME, ScorerServicer(backend), scorer_pb2_grpc.add_ScorerServiceServicer_to_server, backend)
