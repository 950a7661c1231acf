"""The diversity filter against the original Self-Instruct ROUGE-L filter.

1. Speed. Grow a pool to 50,000 instructions with autodidact's filter (the
   real DiversityFilter: bundled MiniLM embeddings, FAISS namespace, SQLite
   log), timed end to end. The original procedure (for every candidate: a
   new Pool(4), ROUGE-L of the candidate against every pooled instruction,
   keep when no score exceeds 0.7) is timed on candidates at several pool
   sizes, fitted as a + b·pool, and extrapolated over the same growth
   (pool sizes as the diversity run's pool grew). It is not run to 50,000:
   that is hours on 2 cores.
   The embedder is the service default (LocalEmbedderSettings(): OpenVINO
   where it is installed); `--runtime torch` measures the torch path.
2. Decisions. The cheaper numeric paths are accepted only if their keep/drop
   decisions agree with the fp32 embedder's on at least 99.5% of the growth
   run. The fp32 torch embedder embeds the same texts; the growth is then
   replayed through the real DiversityFilter on precomputed vectors: (a) the
   fp32 growth against the timed run's decisions, candidate by candidate
   (the pools diverge after a differing decision), and (b) each candidate
   judged with the timed run's vectors against the pool the fp32 run built
   (a dry run before the fp32 commit of the same batch).
3. Agreement with ROUGE-L. On every pair of a set of real texts (Self-Instruct seed
   instructions, SVAMP problems, whose many template variants are genuine
   near-duplicates, and GSM8K questions), compare "ROUGE-L > 0.7" with
   "cosine >= t" for a range of t, and report the t that agrees best.

Texts: the real ones first; the rest of the 50,000 are compositions of real
fragments (a seed instruction followed by a GSM8K question sentence), longer
than typical instructions, which makes the embedding side slower, not faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import tempfile
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # rouge-score is a dev dependency, imported where it is used
    from rouge_score.rouge_scorer import RougeScorer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AUTODIDACT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def real_texts() -> dict[str, list[str]]:
    seeds = [json.loads(line)["instruction"] for line in (DATA / "self_instruct_seed_tasks.jsonl").read_text().splitlines() if line.strip()]
    svamp = [f"{p['Body'].strip()} {p['Question'].strip()}" for p in json.loads((DATA / "svamp.json").read_text())]
    gsm8k = [json.loads(line)["question"] for line in (DATA / "gsm8k_train_1000.jsonl").read_text().splitlines() if line.strip()]
    return {"seed": seeds, "svamp": svamp, "gsm8k": gsm8k}


def candidate_stream(texts: dict[str, list[str]], total: int, seed: int = 0) -> list[str]:
    real = texts["svamp"] + texts["gsm8k"]
    sentences = [s.strip() for q in texts["gsm8k"] for s in re.split(r"(?<=[.?!])\s+", q) if len(s.split()) >= 4]
    rng = random.Random(seed)
    composed: set[str] = set()
    while len(real) + len(composed) < total:
        composed.add(f"{rng.choice(texts['seed'])} {rng.choice(sentences)}")
    stream = real + sorted(composed)
    rng.shuffle(stream)
    return stream[:total]


class RecordingEmbedder:
    """Passes calls through to an embedder and keeps each text's vector (for the decision replay)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.vectors: dict[str, np.ndarray] = {}

    @property
    def description(self) -> Any:
        return self._inner.description

    async def embed(self, texts: list[str]) -> np.ndarray:
        vectors = await self._inner.embed(texts)
        self.vectors.update(zip(texts, vectors, strict=True))
        return vectors

    async def close(self) -> None:
        await self._inner.close()


class ReplayEmbedder:
    """Serves precomputed vectors by text."""

    def __init__(self, description: Any, vectors: dict[str, np.ndarray]) -> None:
        self.description = description
        self._vectors = vectors

    async def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._vectors[t] for t in texts])

    async def close(self) -> None:
        pass


async def grow_with_diversity(seeds: list[str], stream: list[str], threshold: float, batch: int, threads: int, runtime: str) -> dict:
    from autodidact.backends.embed.local import LocalEmbedder, LocalEmbedderSettings
    from autodidact.dedup.diversity import DiversityFilter
    from autodidact.dedup.namespaces import NamespaceRegistry

    loaded = await LocalEmbedder.load(LocalEmbedderSettings(threads=threads, runtime=runtime))  # type: ignore[arg-type]
    embedder = RecordingEmbedder(loaded)
    kept: list[bool] = []
    with tempfile.TemporaryDirectory() as folder:
        diversity = DiversityFilter(embedder, NamespaceRegistry(Path(folder), embedder.description.dimension))
        await diversity.filter_batch("pool", [f"s{i}" for i in range(len(seeds))], seeds, 1.0)
        pool_sizes = []  # pool size seen by each candidate, for the ROUGE-L extrapolation
        started = time.perf_counter()
        size = len(seeds)
        for start in range(0, len(stream), batch):
            chunk = stream[start : start + batch]
            result = await diversity.filter_batch("pool", [f"c{start + i}" for i in range(len(chunk))], chunk, threshold)
            for verdict in result.verdicts:
                pool_sizes.append(size)
                size += verdict.kept
                kept.append(verdict.kept)
        seconds = time.perf_counter() - started
        kind = diversity.describe("pool")[1]
    await embedder.close()
    return {
        "runtime": loaded.runtime,
        "seconds": seconds,
        "texts_per_s": round((len(seeds) + len(stream)) / seconds, 1),
        "candidates": len(stream),
        "kept": size - len(seeds),
        "final_pool": size,
        "index": kind,
        "pool_sizes": pool_sizes,
        "kept_flags": kept,
        "vectors": embedder.vectors,
    }


async def embed_all(texts: list[str], threads: int, runtime: str, precision: str, batch: int) -> tuple[dict[str, np.ndarray], float, str]:
    """Every text's vector from one embedder configuration, in calls of `batch` texts; and texts/s."""
    from autodidact.backends.embed.local import LocalEmbedder, LocalEmbedderSettings

    embedder = await LocalEmbedder.load(LocalEmbedderSettings(threads=threads, runtime=runtime, precision=precision))  # type: ignore[arg-type]
    started = time.perf_counter()
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        vectors.update(zip(chunk, await embedder.embed(chunk), strict=True))
    rate = len(texts) / (time.perf_counter() - started)
    await embedder.close()
    return vectors, rate, embedder.runtime


PATHS = {  # name: (runtime, precision)
    "torch fp32": ("torch", "fp32"),
    "torch bf16 autocast": ("torch", "bf16"),
    "openvino fp32": ("openvino", "fp32"),
    "openvino auto (bf16 here)": ("openvino", "auto"),
}


async def runtime_rates(texts: list[str], threads: int, batch: int, rounds: int) -> dict[str, float]:
    """texts/s of each embedder path on the same texts, in calls of `batch`, loaded side by side and
    measured interleaved (best of `rounds`), so a busy machine slows them alike."""
    from autodidact.backends.embed.local import LocalEmbedder, LocalEmbedderSettings

    embedders = {
        name: await LocalEmbedder.load(LocalEmbedderSettings(threads=threads, runtime=runtime, precision=precision))  # type: ignore[arg-type]
        for name, (runtime, precision) in PATHS.items()
    }
    best = dict.fromkeys(embedders, 0.0)
    for _ in range(rounds):
        for name, embedder in embedders.items():
            await embedder.embed(texts[:64])
            started = time.perf_counter()
            for start in range(0, len(texts), batch):
                await embedder.embed(texts[start : start + batch])
            best[name] = max(best[name], len(texts) / (time.perf_counter() - started))
    for embedder in embedders.values():
        await embedder.close()
    return {name: round(rate, 1) for name, rate in best.items()}


async def decision_agreement(
    seeds: list[str],
    stream: list[str],
    threshold: float,
    batch: int,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    candidate_kept: list[bool],
) -> dict:
    """Replays the growth on the reference (fp32) vectors; compares decisions (see the module docstring)."""
    from autodidact.backends.embed.base import EmbedderDescription
    from autodidact.dedup.diversity import DiversityFilter
    from autodidact.dedup.namespaces import NamespaceRegistry

    description = EmbedderDescription("replay", "all-MiniLM-L6-v2", len(next(iter(reference.values()))))
    ref_embedder, cand_embedder = ReplayEmbedder(description, reference), ReplayEmbedder(description, candidate)
    ref_kept: list[bool] = []
    against_ref_pool: list[bool] = []
    with tempfile.TemporaryDirectory() as folder:
        registry = NamespaceRegistry(Path(folder), description.dimension)
        ref, cand = DiversityFilter(ref_embedder, registry), DiversityFilter(cand_embedder, registry)
        await ref.filter_batch("pool", [f"s{i}" for i in range(len(seeds))], seeds, 1.0)
        for start in range(0, len(stream), batch):
            chunk = stream[start : start + batch]
            ids = [f"c{start + i}" for i in range(len(chunk))]
            dry = await cand.filter_batch("pool", ids, chunk, threshold, dry_run=True)
            against_ref_pool.extend(v.kept for v in dry.verdicts)
            ref_kept.extend(v.kept for v in (await ref.filter_batch("pool", ids, chunk, threshold)).verdicts)
    reference_flags, candidate_flags, pooled_flags = np.array(ref_kept), np.array(candidate_kept), np.array(against_ref_pool)
    return {
        "candidates": len(stream),
        "reference_kept": int(reference_flags.sum()),
        "candidate_kept": int(candidate_flags.sum()),
        "replayed_agreement": round(float((reference_flags == candidate_flags).mean()), 6),
        "replayed_differing": int((reference_flags != candidate_flags).sum()),
        "against_reference_pool_agreement": round(float((reference_flags == pooled_flags).mean()), 6),
        "against_reference_pool_differing": int((reference_flags != pooled_flags).sum()),
        "mean_cosine_to_reference": round(float(np.mean([float(reference[t] @ candidate[t]) for t in seeds + stream])), 6),
    }


def rouge_filter_one(scorer: RougeScorer, candidate: str, pool: list[str]) -> bool:
    """The original procedure for one candidate: a fresh Pool(4), ROUGE-L against every pooled instruction."""
    with Pool(4) as workers:
        scores = workers.map(partial(scorer.score, candidate), pool)
    fmeasures = [s["rougeL"].fmeasure for s in scores]
    np.argsort(fmeasures)[-10:]  # the original also ranks the 10 most similar and averages
    np.mean(fmeasures)
    return max(fmeasures) <= 0.7


def time_rouge(stream: list[str], pool_sizes: list[int], per_size: int) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    points = []
    for size in pool_sizes:
        pool = stream[:size]
        candidates = stream[size : size + per_size]
        started = time.perf_counter()
        for candidate in candidates:
            rouge_filter_one(scorer, candidate, pool)
        points.append((size, (time.perf_counter() - started) / len(candidates)))
    sizes, seconds = np.array(points).T
    slope, intercept = np.polyfit(sizes, seconds, 1)
    return {
        "points": [{"pool": int(p), "seconds_per_candidate": round(s, 4)} for p, s in points],
        "intercept_s": intercept,
        "per_pooled_s": slope,
    }


def agreement(texts: list[str], vectors: np.ndarray, thresholds: list[float]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokens = [scorer._tokenizer.tokenize(t) for t in texts]
    rouge_pairs, cosine_pairs = [], []
    similarity = vectors @ vectors.T
    for i in range(len(texts)):
        for j in range(i):
            rouge_pairs.append(rouge_scorer._score_lcs(tokens[i], tokens[j]).fmeasure)
            cosine_pairs.append(similarity[i, j])
    rouge_dup = np.array(rouge_pairs) > 0.7
    cosine = np.array(cosine_pairs)
    rows = []
    for t in thresholds:
        cos_dup = cosine >= t
        tp, fp, fn = int((rouge_dup & cos_dup).sum()), int((~rouge_dup & cos_dup).sum()), int((rouge_dup & ~cos_dup).sum())
        agree = float((rouge_dup == cos_dup).mean())
        p_yes = rouge_dup.mean() * cos_dup.mean() + (1 - rouge_dup.mean()) * (1 - cos_dup.mean())
        kappa = (agree - p_yes) / (1 - p_yes) if p_yes < 1 else 1.0
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "threshold": t,
                "agreement": round(agree, 5),
                "kappa": round(kappa, 3),
                "precision": round(precision, 3),
                "recall": round(recall, 3),
                "f1": round(f1, 3),
                "cosine_dups": int(cos_dup.sum()),
            }
        )
    return {
        "pairs": len(rouge_pairs),
        "rouge_dups": int(rouge_dup.sum()),
        "by_threshold": rows,
        "best": max(rows, key=lambda r: r["kappa"]),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=50_000, help="candidates to grow the pool with")
    parser.add_argument("--threshold", type=float, default=None, help="cosine threshold (default: the dedup service's)")
    parser.add_argument("--batch", type=int, default=512, help="candidates per FilterBatch call (default 512: bulk growth)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rouge-sizes", default="500,2000,8000", help="pool sizes at which the ROUGE-L procedure is timed")
    parser.add_argument("--rouge-candidates", type=int, default=4, help="candidates timed at each pool size")
    parser.add_argument("--agreement-texts", type=int, default=1200)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"], help="embedder runtime of the timed run")
    parser.add_argument("--no-decisions", action="store_true", help="skip the fp32 reference embedding and the decision comparison")
    parser.add_argument(
        "--reference-vectors", type=Path, help=".npy of the fp32 vectors of seeds + stream, in order (reuse; else computed)"
    )
    parser.add_argument("--rate-texts", type=int, default=1024, help="texts for the side-by-side rate of each path (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from autodidact.dedup.defaults import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    texts = real_texts()
    stream = candidate_stream(texts, args.pool)

    grown = await grow_with_diversity(texts["seed"], stream, threshold, args.batch, args.threads, args.runtime)
    print(
        f"diversity filter ({grown['runtime']}): {grown['candidates']:,} candidates in {grown['seconds']:.1f} s, "
        f"kept {grown['kept']:,} ({grown['index']} index)",
        flush=True,
    )
    rates = None
    if args.rate_texts:
        rates = await runtime_rates(stream[: args.rate_texts], args.threads, args.batch, rounds=2)
        print("texts/s side by side: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()), flush=True)
    decisions = None
    if not args.no_decisions:
        everything = texts["seed"] + stream
        if args.reference_vectors and args.reference_vectors.exists():
            reference = dict(zip(everything, np.load(args.reference_vectors), strict=True))
            reference_rate, reference_runtime = None, "torch/fp32 (precomputed)"
        else:
            reference, reference_rate, reference_runtime = await embed_all(everything, args.threads, "torch", "fp32", args.batch)
            if args.reference_vectors:
                np.save(args.reference_vectors, np.stack([reference[t] for t in everything]))
        decisions = await decision_agreement(texts["seed"], stream, threshold, args.batch, reference, grown["vectors"], grown["kept_flags"])
        decisions |= {"reference": reference_runtime, "reference_texts_per_s": reference_rate and round(reference_rate, 1)}
        print(
            f"decisions against {reference_runtime}: {decisions['replayed_agreement']:.4%} agree on the replayed growth "
            f"({decisions['replayed_differing']} differ), {decisions['against_reference_pool_agreement']:.4%} against the fp32 pool "
            f"({decisions['against_reference_pool_differing']} differ); accept at >= 99.5%",
            flush=True,
        )

    rouge = time_rouge(texts["seed"] + stream, [int(s) for s in args.rouge_sizes.split(",")], args.rouge_candidates)
    rouge_total = sum(rouge["intercept_s"] + rouge["per_pooled_s"] * size for size in grown["pool_sizes"])
    print(
        f"ROUGE-L procedure: {rouge['intercept_s']:.3f} s + {rouge['per_pooled_s'] * 1e6:.1f} µs per pooled instruction per candidate; "
        f"extrapolated over the same growth: {rouge_total:,.0f} s ({rouge_total / 3600:.1f} h)",
        flush=True,
    )
    speedup = rouge_total / grown["seconds"]
    print(f"speed-up: {speedup:,.0f}x (target 1,000x)", flush=True)

    from autodidact.backends.embed.local import LocalEmbedder, LocalEmbedderSettings

    rng = random.Random(1)
    sample = texts["seed"] + rng.sample(texts["svamp"], min(len(texts["svamp"]), args.agreement_texts // 2))
    sample += rng.sample(texts["gsm8k"], max(0, args.agreement_texts - len(sample)))
    embedder = await LocalEmbedder.load(LocalEmbedderSettings(threads=args.threads))
    vectors = await embedder.embed(sample)
    await embedder.close()
    agree = agreement(sample, vectors, [0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95])
    print(f"agreement on {agree['pairs']:,} real pairs ({agree['rouge_dups']:,} with ROUGE-L > 0.7):")
    for row in agree["by_threshold"]:
        print(
            f"  cosine >= {row['threshold']:.2f}: agree {row['agreement']:.4%}  kappa {row['kappa']:.3f}  "
            f"precision {row['precision']:.3f}  recall {row['recall']:.3f}"
        )
    print(f"best agreement (kappa): cosine >= {agree['best']['threshold']}")

    result = {
        "diversity": {k: v for k, v in grown.items() if k not in ("pool_sizes", "kept_flags", "vectors")},
        "decisions_vs_fp32": decisions,
        "rates_side_by_side": rates,
        "threshold": threshold,
        "rouge": {**rouge, "extrapolated_total_s": round(rouge_total)},
        "speedup": round(speedup),
        "target_speedup": 1000,
        "agreement": agree,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
