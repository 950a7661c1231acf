"""Self-consistency on SVAMP with the embedded model: accuracy of the majority
answer of m sampled reasoning paths against the greedy path's answer.

Same prompt (the recipe's few-shot chain-of-thought prompt), same answer
extraction and vote (scorer.votes) as the self_consistency recipe; the model
is the embedded SmolLM2-135M through the llama.cpp backend. A question counts
as right when the normalised answer equals SVAMP's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from autodidact.backends.llm.base import GenerationRequest, Sampling
from autodidact.backends.llm.llamacpp import LlamaCppLLM, LlamaCppSettings
from autodidact.coordinator.recipes.self_consistency import cot_prompt, load_questions
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern, extract_answer, normalise_answer, vote

ROOT = Path(__file__).resolve().parents[1]


async def measure(questions: int, paths: int, temperature: float, max_tokens: int, threads: int, seed: int) -> dict:
    llm = await LlamaCppLLM.load(LlamaCppSettings(threads=threads))
    pattern = compile_pattern(DEFAULT_ANSWER_PATTERN)
    stop = ("\nQ:", "\n\n")
    rows: list[dict[str, Any]] = []
    try:
        for index, question in enumerate(load_questions(ROOT.parent / "shared" / "data" / "svamp.json", "svamp", questions)):
            prompt = cot_prompt(question.text)
            greedy = await llm.generate(GenerationRequest(prompt, Sampling(temperature=0.0, max_tokens=max_tokens, stop=stop), (seed,)))
            sampled = await llm.generate(
                GenerationRequest(
                    prompt,
                    Sampling(temperature=temperature, top_k=40, max_tokens=max_tokens, stop=stop),
                    tuple(seed + 1000 * index + i for i in range(paths)),
                )
            )
            answers = [extract_answer(s.text, pattern) for s in sampled.samples]
            result = vote(answers, [1.0] * len(answers))
            reference = normalise_answer(question.reference)
            rows.append(
                {
                    "greedy": extract_answer(greedy.samples[0].text, pattern),
                    "majority": result.winner,
                    "reference": reference,
                    "answered": sum(bool(a) for a in answers),
                    "confidence": result.confidence,
                }
            )
            print(
                f"{index}: reference {reference}, greedy {rows[-1]['greedy'] or '-'}, "
                f"majority {result.winner or '-'} ({result.confidence:.2f})",
                flush=True,
            )
    finally:
        await llm.close()
    n = len(rows)
    return {
        "questions": n,
        "paths": paths,
        "temperature": temperature,
        "top_k": 40,
        "max_tokens": max_tokens,
        "greedy_accuracy": sum(r["greedy"] == r["reference"] for r in rows) / n,
        "majority_accuracy": sum(r["majority"] == r["reference"] for r in rows) / n,
        "greedy_answered": sum(bool(r["greedy"]) for r in rows) / n,
        "paths_answered": sum(r["answered"] for r in rows) / (n * paths),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--paths", type=int, default=8, help="m")
    parser.add_argument("--temperature", type=float, default=0.7, help="T")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    result = asyncio.run(measure(args.questions, args.paths, args.temperature, args.max_tokens, args.threads, args.seed))
    result["seconds"] = time.perf_counter() - started
    print(
        f"SVAMP, first {result['questions']} problems, m = {args.paths}, T = {args.temperature}: "
        f"greedy {result['greedy_accuracy']:.1%}, majority {result['majority_accuracy']:.1%} "
        f"(greedy stated an answer in {result['greedy_answered']:.0%}, sampled paths in {result['paths_answered']:.0%})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
