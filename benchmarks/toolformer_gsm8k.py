"""How well the Toolformer filter tells correct calculator calls from wrong ones.

GSM8K solutions carry their arithmetic as annotations ("48/2 = <<48/2=24>>24").
Each annotation becomes two candidate calls at the same position (just before
the result's token): one with the correct result and one with a corrupted
result (off by 10 to 50 %, at least 1, same number of decimals). The real
filter (scorer.toolformer.filter_calls on the embedded model, call as a
prefix, the paper's weights, every loss computed) scores them all; then, for a
range of τf, "keep" is compared with "correct":

    precision = correct kept / kept,  recall = correct kept / correct.

Also reported: how often the correct call's L⁺ is below the corrupted one's
(the filter's ranking, independent of τf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

from autodidact.backends.llm.base import ScoringSequence, SequenceScores
from autodidact.backends.llm.llamacpp import LlamaCppLLM, LlamaCppSettings
from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.scorer.service import PREFIX_SEPARATOR
from autodidact.scorer.toolformer import Candidate, filter_calls

ROOT = Path(__file__).resolve().parents[1]

THRESHOLDS = (-1.0, -0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def corrupt(result: str, rng: random.Random) -> str | None:
    try:
        value = float(result.replace(",", ""))
    except ValueError:
        return None
    decimals = len(result.split(".")[1]) if "." in result else 0
    shift = max(abs(value) * rng.uniform(0.1, 0.5), 1.0 if decimals == 0 else 10**-decimals)
    wrong = round(value + rng.choice((-1, 1)) * shift, decimals)
    text = f"{wrong:.{decimals}f}" if decimals else str(int(wrong))
    return None if text == result else text


async def score(documents: int, threads: int, seed: int) -> list[dict]:
    llm = await LlamaCppLLM.load(LlamaCppSettings(threads=threads))
    rng = random.Random(seed)
    rows = []
    lines = (ROOT.parent / "shared" / "data" / "gsm8k_train_1000.jsonl").read_text().splitlines()[:documents]
    try:
        for index, line in enumerate(lines):
            raw = json.loads(line)
            text, annotations = gsm8k_document(raw["question"], raw["answer"])
            tokens, offsets = await llm.tokenize_with_offsets(text)
            candidates, labels = [], []
            for number, annotation in enumerate(annotations):
                wrong = corrupt(annotation["result"], rng)
                if wrong is None:
                    continue
                position = max(i for i, o in enumerate(offsets) if i > 0 and o <= annotation["char_offset"])
                without, _ = await llm.tokenize_with_offsets(f"[Calculator({annotation['expression']})]{PREFIX_SEPARATOR}")
                for correct, result in ((True, annotation["result"]), (False, wrong)):
                    with_result, _ = await llm.tokenize_with_offsets(
                        f"[Calculator({annotation['expression']}) -> {result}]{PREFIX_SEPARATOR}"
                    )
                    candidates.append(Candidate(f"{index}/{number}/{correct}", position, tuple(without), tuple(with_result)))
                    labels.append(correct)
            if not candidates:
                continue

            async def scored(sequences: list[ScoringSequence]) -> SequenceScores:
                return await llm.score_sequences(sequences)

            decisions, _ = await filter_calls(tuple(tokens), candidates, scored, threshold=0.0, all_losses=True)
            for decision, correct in zip(decisions, labels, strict=True):
                assert decision.loss_minus is not None  # all_losses=True computes every loss
                rows.append(
                    {
                        "id": decision.id,
                        "correct": correct,
                        "gain": decision.loss_minus - decision.loss_with_result,
                        "loss_plus": decision.loss_with_result,
                    }
                )
    finally:
        await llm.close()
    return rows


def report(rows: list[dict]) -> dict:
    correct_total = sum(r["correct"] for r in rows)
    table = []
    for threshold in THRESHOLDS:
        kept = [r for r in rows if r["gain"] >= threshold]
        true_kept = sum(r["correct"] for r in kept)
        precision = true_kept / len(kept) if kept else float("nan")
        recall = true_kept / correct_total
        f1 = 2 * precision * recall / (precision + recall) if kept and precision + recall else 0.0
        wrong_dropped = sum(not r["correct"] for r in rows if r["gain"] < threshold) / (len(rows) - correct_total)
        table.append(
            {
                "threshold": threshold,
                "kept": len(kept),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "wrong_dropped": wrong_dropped,
                "balanced_accuracy": (recall + wrong_dropped) / 2,
            }
        )
    pairs: dict[str, dict[bool, float]] = {}
    for r in rows:
        pairs.setdefault(r["id"].rsplit("/", 1)[0], {})[r["correct"]] = r["loss_plus"]
    ranked = sum(p[True] < p[False] for p in pairs.values() if len(p) == 2)
    return {
        "candidates": len(rows),
        "annotations": len(pairs),
        "correct_ranked_first": ranked / len(pairs),
        "table": table,
        "best_threshold_by_f1": max(table, key=lambda t: t["f1"])["threshold"],
        "best_threshold_by_balanced_accuracy": max(table, key=lambda t: t["balanced_accuracy"])["threshold"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = asyncio.run(score(args.documents, args.threads, args.seed))
    result = report(rows) | {"documents": args.documents, "seconds": time.perf_counter() - started}
    print(
        f"{result['annotations']} annotations from {args.documents} GSM8K documents; "
        f"correct L⁺ below corrupted L⁺ in {result['correct_ranked_first']:.1%}"
    )
    print(f"{'τf':>6}  {'kept':>5}  {'precision':>9}  {'recall':>6}  {'F1':>5}  {'wrong dropped':>13}  {'balanced acc.':>13}")
    for t in result["table"]:
        print(
            f"{t['threshold']:>6g}  {t['kept']:>5}  {t['precision']:>9.3f}  {t['recall']:>6.3f}  {t['f1']:>5.3f}  "
            f"{t['wrong_dropped']:>13.3f}  {t['balanced_accuracy']:>13.3f}"
        )
    print(f"best τf by F1: {result['best_threshold_by_f1']:g}; by balanced accuracy: {result['best_threshold_by_balanced_accuracy']:g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
