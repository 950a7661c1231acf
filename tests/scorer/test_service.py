"""The scorer over real gRPC with the embedded model, checked against the
paper's formulas computed independently with llama-cpp-python itself: one
full forward pass per loss, log-softmax by hand."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
import pytest_asyncio

from autodidact.backends.llm.llamacpp import bundled_model_path
from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.runtime.channels import create_channel
from autodidact.scorer import votes
from autodidact.v1 import scorer_pb2, scorer_pb2_grpc
from tests.conftest import GSM8K, details_of
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")
WEIGHTS = np.array([1.0, 0.8, 0.6, 0.4, 0.2]) / 3.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scorer(tmp_path_factory):
    stack = await start_stack(tmp_path_factory.mktemp("scorer"), ("scorer",))
    async with create_channel(stack.target("scorer"), timeout_seconds=300) as channel:
        yield scorer_pb2_grpc.ScorerServiceStub(channel)
    await stack.stop()


@pytest.fixture(scope="module")
def llama():
    from llama_cpp import Llama

    return Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=2, logits_all=True, verbose=False)


def tokenize(llama, text: str) -> list[int]:
    return list(llama.tokenize(text.encode(), add_bos=False, special=False))


def full_pass_logprobs(llama, tokens: list[int]) -> np.ndarray:
    """Row p: log-softmax of the logits after tokens[:p + 1]."""
    llama.reset()
    llama.eval(tokens)
    logits = np.asarray(llama.scores[: len(tokens)], dtype=np.float64)
    return logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)


def loss(llama, prefix: list[int], document: list[int], position: int, inline: bool) -> float:
    tokens = document[:position] + prefix + document[position:] if inline else prefix + document
    start = position + len(prefix)
    rows = full_pass_logprobs(llama, tokens)
    following = tokens[start : start + len(WEIGHTS)]
    # Near the document's end fewer tokens follow than there are weights: the loss weighs those that do.
    return float(-sum(w * rows[start + t - 1, token] for t, (w, token) in enumerate(zip(WEIGHTS, following, strict=False))))


def gsm8k_candidates(llama, count: int) -> list[tuple[str, list[scorer_pb2.CandidateCall]]]:
    """GSM8K documents whose annotations become calls with the correct result and with a wrong one."""
    out = []
    for line in (GSM8K).read_text().splitlines()[:count]:
        raw = json.loads(line)
        text, annotations = gsm8k_document(raw["question"], raw["answer"])
        starts = [o for _, o in _offsets(llama, text)]
        candidates = []
        for k, a in enumerate(annotations):
            boundary = max(s for s in starts[1:] if s <= a["char_offset"])
            for label, result in (("right", a["result"]), ("wrong", str(int(float(a["result"])) + 7))):
                candidates.append(
                    scorer_pb2.CandidateCall(
                        id=f"a{k}-{label}",
                        char_offset=boundary,
                        call_without_result=f"[Calculator({a['expression']})]",
                        call_with_result=f"[Calculator({a['expression']}) -> {result}]",
                    )
                )
        out.append((text, candidates))
    return out


def _offsets(llama, text: str) -> list[tuple[int, int]]:
    tokens = tokenize(llama, text)
    out, chars = [], 0
    for token in tokens:
        out.append((token, chars))
        chars += len(llama.detokenize([token]).decode("utf-8", errors="replace"))
    return out


@pytest.mark.parametrize("placement", [scorer_pb2.CALL_PLACEMENT_PREFIX, scorer_pb2.CALL_PLACEMENT_INLINE])
async def test_filter_decisions_and_losses_equal_the_paper_formula_computed_pass_by_pass(scorer, llama, placement):
    inline = placement == scorer_pb2.CALL_PLACEMENT_INLINE
    separator = "" if inline else "\n"
    for text, candidates in gsm8k_candidates(llama, 2):
        response = await scorer.FilterToolCalls(
            scorer_pb2.FilterToolCallsRequest(
                text=text,
                candidates=candidates,
                threshold=0.5,
                placement=placement,
                all_losses=True,
            )
        )
        document = tokenize(llama, text)
        position_of = {o: i for i, (_, o) in enumerate(_offsets(llama, text))}
        naive_tokens = 0
        for candidate, decision in zip(candidates, response.decisions, strict=True):
            position = position_of[candidate.char_offset]
            plus = loss(llama, tokenize(llama, candidate.call_with_result + separator), document, position, inline)
            without = loss(llama, tokenize(llama, candidate.call_without_result + separator), document, position, inline)
            none = loss(llama, [], document, position, inline)
            naive_tokens += 3 * len(document) + len(tokenize(llama, candidate.call_with_result + separator)) * 2
            assert decision.id == candidate.id
            assert decision.loss_with_result == pytest.approx(plus, abs=1e-6)
            assert decision.loss_without_result == pytest.approx(without, abs=1e-6)
            assert decision.loss_without_call == pytest.approx(none, abs=1e-6)
            assert decision.loss_minus == pytest.approx(min(none, without), abs=1e-6)
            assert decision.keep == (min(none, without) - plus >= 0.5)
        assert 0 < response.tokens_evaluated < naive_tokens / 2


async def test_without_all_losses_the_decisions_are_the_same_and_fewer_tokens_are_evaluated(scorer, llama):
    for text, candidates in gsm8k_candidates(llama, 3):
        for threshold in (-1.0, 0.5, 2.0):
            request = scorer_pb2.FilterToolCallsRequest(text=text, candidates=candidates, threshold=threshold, all_losses=True)
            full = await scorer.FilterToolCalls(request)
            request.all_losses = False
            lazy = await scorer.FilterToolCalls(request)
            assert [d.keep for d in lazy.decisions] == [d.keep for d in full.decisions]
            assert lazy.tokens_evaluated <= full.tokens_evaluated
            for a, b in zip(lazy.decisions, full.decisions, strict=True):
                assert a.loss_with_result == b.loss_with_result and a.loss_without_call == b.loss_without_call
                if a.HasField("loss_minus"):
                    assert a.loss_minus == b.loss_minus
                else:  # skipped only where L(no call) − L⁺ < τf already decides "drop"
                    assert a.loss_without_call - a.loss_with_result < threshold and not a.keep


async def test_marker_probabilities_are_the_models_next_token_probabilities(scorer, llama):
    prompt = "Add calls.\nInput:\nTwo plus two is four.\nOutput:\n"
    text = "Two plus two is four. Three times three is nine."
    response = await scorer.MarkerProbabilities(scorer_pb2.MarkerProbabilitiesRequest(prompt=prompt, text=text, threshold=0.0, top_k=1024))
    prompt_tokens, document = tokenize(llama, prompt), tokenize(llama, text)
    rows = full_pass_logprobs(llama, prompt_tokens + document)
    markers = [tokenize(llama, m)[0] for m in ("[", " [")]
    offsets = [o for _, o in _offsets(llama, text)]
    expected = {i: float(np.exp(rows[len(prompt_tokens) + i - 1, markers]).sum()) for i in range(1, len(document))}
    assert response.positions_considered == len(document) - 1
    assert len(response.positions) == len(expected)
    got = [p.probability for p in response.positions]
    assert got == sorted(got, reverse=True)
    for position in response.positions:
        assert position.probability == pytest.approx(expected[position.token_index], rel=1e-9)
        assert position.char_offset == offsets[position.token_index]
    top = await scorer.MarkerProbabilities(
        scorer_pb2.MarkerProbabilitiesRequest(prompt=prompt, text=text, threshold=(got[1] + got[2]) / 2, top_k=5)
    )
    assert [p.token_index for p in top.positions] == [p.token_index for p in response.positions[:2]]


async def test_score_text_matches_a_full_pass(scorer, llama):
    response = await scorer.ScoreText(scorer_pb2.ScoreTextRequest(items=[scorer_pb2.ScoredText(context="The answer is", text=" 42.")]))
    context, text = tokenize(llama, "The answer is"), tokenize(llama, " 42.")
    rows = full_pass_logprobs(llama, context + text)
    expected = [rows[len(context) + i - 1, token] for i, token in enumerate(text)]
    got = [t.logprob for t in response.scores[0].tokens]
    assert got == pytest.approx(expected, abs=1e-6)
    assert response.scores[0].logprob_sum == pytest.approx(sum(expected), abs=1e-6)


def _filter(**fields) -> scorer_pb2.FilterToolCallsRequest:
    candidates = fields.pop(
        "candidates", [scorer_pb2.CandidateCall(id="a", char_offset=3, call_without_result="[C(1)]", call_with_result="[C(1) -> 1]")]
    )
    return scorer_pb2.FilterToolCallsRequest(text=fields.pop("text", "She sold 48 clips in May."), candidates=candidates, **fields)


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("FilterToolCalls", _filter(candidates=[]), "candidates"),
        ("FilterToolCalls", _filter(threshold=101), "threshold"),
        ("FilterToolCalls", _filter(weights=[1.0, -0.5]), "weights"),
        ("FilterToolCalls", _filter(weights=[0.0]), "weights"),
        (
            "FilterToolCalls",
            _filter(
                candidates=[scorer_pb2.CandidateCall(id="a", char_offset=4, call_without_result="[C(1)]", call_with_result="[C(1) -> 1]")]
            ),
            "candidates[0].char_offset",
        ),
        (
            "FilterToolCalls",
            _filter(
                candidates=[scorer_pb2.CandidateCall(id="a", char_offset=0, call_without_result="[C(1)]", call_with_result="[C(1) -> 1]")]
            ),
            "candidates[0].char_offset",
        ),
        (
            "FilterToolCalls",
            _filter(candidates=[scorer_pb2.CandidateCall(id="a", char_offset=3, call_with_result="[C(1) -> 1]")]),
            "candidates[0].call_without_result",
        ),
        (
            "FilterToolCalls",
            _filter(candidates=[scorer_pb2.CandidateCall(id="a", char_offset=3, call_without_result="x", call_with_result="y")] * 2),
            "candidates[1].id",
        ),
        (
            "MarkerProbabilities",
            scorer_pb2.MarkerProbabilitiesRequest(text="Some text here.", marker_tokens=["[Calculator("]),
            "marker_tokens[0]",
        ),
        ("MarkerProbabilities", scorer_pb2.MarkerProbabilitiesRequest(text="Some text here.", threshold=1.5), "threshold"),
        ("MarkerProbabilities", scorer_pb2.MarkerProbabilitiesRequest(text="Some text here.", top_k=5000), "top_k"),
        ("MarkerProbabilities", scorer_pb2.MarkerProbabilitiesRequest(text=""), "text"),
        ("ScoreText", scorer_pb2.ScoreTextRequest(items=[scorer_pb2.ScoredText(text="")]), "items[0].text"),
    ],
)
async def test_malformed_requests_are_refused_naming_the_field(scorer, method, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(scorer, method)(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(raised.value).startswith(f"{field}:"), details_of(raised.value)


# --- Vote (issue 10, items 1, 13 and 14) ---

QUESTION = "Q: Sam had 76 marbles and lost 26. How many are left?\nA:"
DEADLINE = 20.0  # seconds; every Vote below must answer well within it
NUMBER_PATTERN = r"The answer is (\S+)"


def _vote(paths: list[str], **fields) -> scorer_pb2.VoteRequest:
    return scorer_pb2.VoteRequest(prompt=QUESTION, paths=[scorer_pb2.ReasoningPath(text=p) for p in paths], **fields)


async def test_vote_counts_the_answer_each_path_states_last_and_a_tie_has_no_winner(scorer):
    paths = [
        "He had 76. The answer is 76. But he lost 26, so 76 - 26 = 50. The answer is 50.",
        "76 - 26 = 50. The answer is 50.",
        "The answer is 76.",
    ]
    majority = await scorer.Vote(_vote(paths), timeout=DEADLINE)
    assert [v.answer for v in majority.votes] == ["50", "50", "76"]
    assert majority.winner == "50" and majority.confidence == pytest.approx(2 / 3)
    weighted = await scorer.Vote(_vote(paths, method=scorer_pb2.VOTE_METHOD_LENGTH_NORMALIZED_PROBABILITY), timeout=DEADLINE)
    assert [v.answer for v in weighted.votes] == ["50", "50", "76"] and all(0 < v.weight < 1 for v in weighted.votes)
    assert weighted.winner == weighted.tallies[0].answer and weighted.tallies[0].weight > weighted.tallies[1].weight
    tie = await scorer.Vote(_vote(["The answer is 7.", "The answer is 8.", "I am not sure."]), timeout=DEADLINE)
    assert tie.winner == "" and tie.confidence == 0 and not any(v.agrees for v in tie.votes)
    assert [(t.answer, t.count) for t in tie.tallies] == [("7", 1), ("8", 1)]


@pytest.mark.parametrize(
    ("request_", "answers"),
    [
        # Each of these reached INTERNAL, or held the scorer past the caller's deadline, before the bounds.
        (_vote(["The answer is 1e999999999"] * 3, answer_pattern=NUMBER_PATTERN), ["1e999999999"] * 3),
        (
            _vote(["The answer is -1E+999999999", "The answer is 1e-999999999"], answer_pattern=NUMBER_PATTERN),
            ["-1E+999999999", "1e-999999999"],
        ),
        (
            _vote(["The answer is 1e99999999999999999999999", "The answer is NaN"], answer_pattern=NUMBER_PATTERN),
            ["1e99999999999999999999999", "NaN"],
        ),
        (_vote(["The answer is " + "9" * 5000, "The answer is " + "9" * 900]), ["", "9" * 900]),
        (_vote(["The answer is " + "7" * 60_000] * 100), [""] * 100),
    ],
    ids=["huge-exponent", "signed-exponents", "unparsable-exponent", "thousands-of-digits", "6-MB-of-digits"],
)
async def test_adversarial_numbers_are_answered_at_once_as_text(scorer, request_, answers):
    response = await scorer.Vote(request_, timeout=DEADLINE)
    assert [v.answer for v in response.votes] == answers


@pytest.mark.parametrize(
    ("request_", "rule"),
    [
        (_vote(["The answer is 5."], answer_pattern="((((a{100}){100}){100}){100})"), "counted repeats"),
        (_vote(["x" * 5000], answer_pattern=r"(x+x+)+y"), "took longer than 50 ms on a path"),
        # Milliseconds a path, seconds in all: the vote's total budget (0.3 s here, see below) stops it.
        (_vote(["1 " * 4000] * 600, answer_pattern=r"([0-9]+)"), "took longer than 0.3 s over 600 paths"),
    ],
    ids=["compile-bomb", "catastrophic-backtracking", "slow-over-all-paths"],
)
async def test_patterns_that_would_hold_the_scorer_are_refused_in_time_naming_the_field(scorer, request_, rule, monkeypatch):
    # The server runs in this process: a smaller total budget than the default 2 s keeps the
    # case well past it on a fast machine and each path well under its 50 ms on a busy one.
    monkeypatch.setattr(votes, "VOTE_MATCH_SECONDS", 0.3)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await scorer.Vote(request_, timeout=DEADLINE)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details_of(raised.value)
    assert details_of(raised.value).startswith("answer_pattern:") and rule in details_of(raised.value)
    # ...and the scorer answers the next call at once.
    after = await scorer.Vote(_vote(["The answer is 3.", "The answer is 3."]), timeout=5)
    assert after.winner == "3"


async def test_a_slow_vote_does_not_hold_other_calls(scorer):
    slow = asyncio.ensure_future(scorer.Vote(_vote(["1 " * 10_000] * 300, answer_pattern=r"([0-9]+)"), timeout=DEADLINE))
    await asyncio.sleep(0.3)  # the slow vote is now matching (for about 2 s)
    quick = await scorer.Vote(_vote(["The answer is 4.", "The answer is 4."]), timeout=DEADLINE)
    assert quick.winner == "4"
    assert not slow.done(), "the quick vote waited for the slow one: matching held the event loop"
    try:
        await slow  # all paths matched within the 2 s budget (a fast machine), or refused past it
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and details_of(exc).startswith("answer_pattern: took longer")
