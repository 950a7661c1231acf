"""Tokens the Toolformer filter processes per candidate decision, against the
public strategies, on the same candidates in the same process.

Candidates are real: the Toolformer recipe runs with the calculator on GSM8K
documents (coordinator/recipes/formats.py) on the embedded model, and every call
it sampled, parsed and executed is a candidate (calls.jsonl). Every strategy
then scores those candidates with the same llama.cpp model:

- autodidact: scorer.toolformer.filter_calls (one pass over the document for
  every L(no call), one sequence per distinct call text, shared prefixes
  evaluated once, L(call without result) only where it can matter);
- straightforward: the paper's formula computed the plain way, three full
  passes per candidate (call with result + document, call without result +
  document, document), call as a prefix, weights normalised. autodidact's
  decisions must equal these;
- lucidrains/toolformer-pytorch: three full forward passes per candidate, the
  call inline (as it does);
- conceptofmind/toolformer: the document in 128-token windows; per position
  one pass over its window, per candidate two (call with and without result
  in front of the window).

Tokens are what the model evaluated (the backend's count; a pass over n
tokens evaluates n − 1: the last token's logits predict nothing wanted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from autodidact.backends.llm.base import ScoringSequence, SequenceScores
from autodidact.backends.llm.llamacpp import LlamaCppLLM, LlamaCppSettings
from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.coordinator.recipes.toolformer import render_call
from autodidact.scorer.service import PREFIX_SEPARATOR
from autodidact.scorer.toolformer import DEFAULT_WEIGHTS, CallDecision, Candidate, filter_calls, normalise_weights, weighted_loss

ROOT = Path(__file__).resolve().parents[1]

WINDOW = 128
# τf values at which autodidact's decisions are compared with the reference
# (the paper's 0.5 keeps few calls with a 135M model; lower ones keep many).
CHECKED = (-1.0, 0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Doc:
    text: str
    tokens: tuple[int, ...]
    offsets: list[int]


async def straightforward_decisions(
    llm: LlamaCppLLM,
    document: tuple[int, ...],
    candidates: list[Candidate],
    threshold: float,
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    placement: str = "prefix",
) -> tuple[list[CallDecision], int]:
    """The paper's formula, one full pass per loss: the reference decisions."""
    w = normalise_weights(weights)
    evaluated = 0

    async def loss(call: tuple[int, ...], position: int) -> float:
        nonlocal evaluated
        if placement == "prefix":
            tokens, at = call + document, len(call) + position
        else:
            tokens, at = document[:position] + call + document[position:], position + len(call)
        scores = await llm.score_sequences([ScoringSequence(tokens, at)])
        evaluated += scores.tokens_evaluated
        return weighted_loss(scores.logprobs[0], w)

    decisions = []
    for c in candidates:
        plus, without, none = await loss(c.with_result, c.position), await loss(c.without_result, c.position), await loss((), c.position)
        minus = min(none, without)
        decisions.append(CallDecision(c.id, plus, none, without, minus, minus - plus >= threshold))
    return decisions, evaluated


async def lucidrains_tokens(llm: LlamaCppLLM, document: tuple[int, ...], candidates: list[Candidate]) -> int:
    """Three full forward passes per candidate, the call inline."""
    evaluated = 0
    for c in candidates:
        for call in (c.with_result, c.without_result, ()):
            tokens = document[: c.position] + call + document[c.position :]
            evaluated += (await llm.score_sequences([ScoringSequence(tokens, 1)])).tokens_evaluated
    return evaluated


async def conceptofmind_tokens(llm: LlamaCppLLM, document: tuple[int, ...], candidates: list[Candidate]) -> int:
    """128-token windows: one pass per position, two per candidate."""
    evaluated = 0

    def window(position: int) -> tuple[int, ...]:
        start = (position // WINDOW) * WINDOW
        return document[start : start + WINDOW]

    for position in sorted({c.position for c in candidates}):
        evaluated += (await llm.score_sequences([ScoringSequence(window(position), 1)])).tokens_evaluated
    for c in candidates:
        for call in (c.with_result, c.without_result):
            evaluated += (await llm.score_sequences([ScoringSequence(call + window(c.position), len(call))])).tokens_evaluated
    return evaluated


def recipe_candidates(documents_path: Path, positions: int, calls: int, threads: int, data_dir: Path) -> list[dict]:
    """Runs the Toolformer recipe (calculator) and returns its executed calls."""
    from autodidact.backends.embed.local import LocalEmbedderSettings
    from autodidact.runner import prepare, run_in_process
    from autodidact.stack import StackOptions
    from autodidact.v1 import coordinator_pb2

    spec = coordinator_pb2.JobSpec(seed=7, max_in_flight=1)
    spec.toolformer.documents_path = str(documents_path)
    spec.toolformer.tools.append("Calculator")
    spec.toolformer.positions_per_document = positions
    spec.toolformer.calls_per_position = calls
    options = StackOptions(llamacpp=LlamaCppSettings(threads=threads), embedder=LocalEmbedderSettings(threads=threads))
    code = asyncio.run(run_in_process(prepare(spec), "toolformer-bench", data_dir, options, data_dir / "out", show_progress=False))
    if code != 0:
        raise SystemExit("the recipe failed")
    rows = [json.loads(line) for line in (data_dir / "out" / "calls.jsonl").read_text().splitlines()]
    return [r for r in rows if r["result"] is not None]


async def measure(documents: list[str], calls: list[dict], threshold: float, threads: int) -> dict:
    """Tokens and seconds of every strategy at τf = threshold; autodidact's
    decisions are also compared with the reference at every τf of CHECKED."""
    llm = await LlamaCppLLM.load(LlamaCppSettings(threads=threads))
    totals = {"autodidact": 0, "straightforward": 0, "lucidrains": 0, "conceptofmind": 0}
    seconds = dict.fromkeys(totals, 0.0)
    decided = 0
    mismatched = dict.fromkeys(CHECKED, 0)
    kept = dict.fromkeys(CHECKED, 0)
    max_loss_difference = 0.0
    try:
        for index, text in enumerate(documents):
            tokens, offsets = await llm.tokenize_with_offsets(text)
            position_of = {o: i for i, o in enumerate(offsets) if i > 0}
            mine = [c for c in calls if c["item_id"].startswith(f"doc{index:05d}/")]
            candidates = []
            for c in mine:
                without, _ = await llm.tokenize_with_offsets(render_call(c["tool"], c["input"]) + PREFIX_SEPARATOR)
                with_result, _ = await llm.tokenize_with_offsets(render_call(c["tool"], c["input"], c["result"]) + PREFIX_SEPARATOR)
                candidates.append(Candidate(c["item_id"], position_of[c["char_offset"]], tuple(without), tuple(with_result)))
            if not candidates:
                continue
            document = tuple(tokens)

            async def ours(batch: list[ScoringSequence], document: tuple[int, ...] = document) -> SequenceScores:
                return await llm.score_sequences(batch)

            started = time.perf_counter()
            reference, evaluated = await straightforward_decisions(llm, document, candidates, threshold)
            seconds["straightforward"] += time.perf_counter() - started
            totals["straightforward"] += evaluated
            for checked in CHECKED:
                started = time.perf_counter()
                decisions, evaluated = await filter_calls(document, candidates, ours, threshold=checked)
                if checked == threshold:
                    seconds["autodidact"] += time.perf_counter() - started
                    totals["autodidact"] += evaluated
                for a, b in zip(decisions, reference, strict=True):
                    assert b.loss_minus is not None  # the straightforward reference computes every loss
                    expected = b.loss_minus - b.loss_with_result >= checked
                    mismatched[checked] += a.keep != expected
                    kept[checked] += a.keep
                    differences = [a.loss_with_result - b.loss_with_result, a.loss_without_call - b.loss_without_call]
                    if a.loss_minus is not None:
                        differences.append(a.loss_minus - b.loss_minus)
                    max_loss_difference = max(max_loss_difference, *map(abs, differences))
            decided += len(candidates)
            for name, strategy in (("lucidrains", lucidrains_tokens), ("conceptofmind", conceptofmind_tokens)):
                started = time.perf_counter()
                totals[name] += await strategy(llm, document, candidates)
                seconds[name] += time.perf_counter() - started
            print(f"document {index}: {len(candidates)} candidates; tokens so far {totals}", flush=True)
    finally:
        await llm.close()
    per_decision = {name: total / decided for name, total in totals.items()}
    cheaper = min(per_decision["lucidrains"], per_decision["conceptofmind"])
    return {
        "candidates": decided,
        "kept_by_threshold": kept,
        "decisions_differing_from_straightforward_by_threshold": mismatched,
        "max_loss_difference": max_loss_difference,
        "tokens_per_decision": per_decision,
        "seconds": seconds,
        "ratio_vs_cheaper_public": cheaper / per_decision["autodidact"],
        "ratio_vs_lucidrains": per_decision["lucidrains"] / per_decision["autodidact"],
        "ratio_vs_conceptofmind": per_decision["conceptofmind"] / per_decision["autodidact"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k_train_1000.jsonl")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--positions", type=int, default=20, help="k (paper: 20 for the calculator)")
    parser.add_argument("--calls", type=int, default=10, help="m (paper: 10 for the calculator)")
    parser.add_argument(
        "--threshold", type=float, default=0.5, choices=CHECKED, help="τf whose tokens are reported (paper: 0.5 for the calculator)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    lines = args.gsm8k.read_text(encoding="utf-8").splitlines()[: args.documents]
    documents = [gsm8k_document(**{k: json.loads(line)[k] for k in ("question", "answer")})[0] for line in lines]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "documents.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
        started = time.perf_counter()
        calls = recipe_candidates(path, args.positions, args.calls, args.threads, Path(tmp))
        print(f"recipe: {len(calls)} executed candidate calls in {time.perf_counter() - started:.0f}s", flush=True)
    distinct_texts = len({(c["item_id"].split("/")[0], c["input"], c["result"]) for c in calls})
    result = asyncio.run(measure(documents, calls, args.threshold, args.threads))
    result |= {
        "documents": args.documents,
        "positions": args.positions,
        "calls_per_position": args.calls,
        "threshold": args.threshold,
        "distinct_call_texts": distinct_texts,
        "weights": list(DEFAULT_WEIGHTS),
        "window": WINDOW,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
