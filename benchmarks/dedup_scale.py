"""A dedup namespace grown to 1,000,000 vectors, against the namespace before
issue 13 (benchmarks/baseline_dedup_namespace.py) in the same run.

Each implementation grows a namespace on disk through the real
`Namespace.judge` + `commit` (what FilterBatch does under the namespace lock,
embedding excluded), FilterBatch(64) at a time, with random unit vectors of
dimension 384 and planted near-duplicates: copies of earlier kept vectors plus
noise, at cosine `--dup-cosine` to their source (well above the threshold,
while random vectors stay below 0.3 of each other). Exact search drops every
planted item (its source is in the namespace at that cosine), so the recall is
the share of planted items the namespace drops, with the source as nearest id.

Reported per implementation: p50, p99 and longest call (and the size at the
longest), restart time (open the folder and answer a first batch), bytes
written (write() calls counted by /proc/self/io, snapshots and log), memory
per vector (RSS growth over the rows), recall during growth and after restart.
The baseline rewrites its whole index every 5,000 additions (about 150 GB by
a million), so it runs to `--baseline-vectors` only; the new namespace's
figures up to that size are reported beside it for a like-for-like ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"p99_ms": 50, "max_ms": 200, "restart_s": 30, "recall": 0.99}


class AnyNamespace(Protocol):
    size: int
    index_kind: str

    def judge(self, ids: list[str], vectors: np.ndarray, threshold: float) -> list[Any]: ...
    def commit(self, batch_id: str, verdicts: list[Any], vectors: np.ndarray) -> None: ...
    def close(self) -> None: ...


def io_written() -> int:
    """Bytes this process has passed to write() so far (snapshots, log, WAL; every thread)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def units(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@dataclass
class Sources:
    """A uniform sample of the kept vectors so far (reservoir), to plant near-duplicates of."""

    capacity: int
    dim: int
    rng: np.random.Generator
    ids: list[str] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self.vectors = np.empty((self.capacity, self.dim), dtype=np.float32)

    def offer(self, item_id: str, vector: np.ndarray) -> None:
        self.seen += 1
        if len(self.ids) < self.capacity:
            self.vectors[len(self.ids)] = vector
            self.ids.append(item_id)
            return
        slot = int(self.rng.integers(self.seen))
        if slot < self.capacity:
            self.vectors[slot], self.ids[slot] = vector, item_id

    def near_duplicates(self, n: int, cosine: float) -> tuple[list[str], np.ndarray]:
        picks = self.rng.integers(len(self.ids), size=n)
        # Noise of norm s orthogonal-ish to a unit vector: cosine 1/sqrt(1+s^2).
        sigma = np.sqrt((1 / cosine**2 - 1) / self.dim)
        noisy = self.vectors[picks] + self.rng.normal(scale=sigma, size=(n, self.dim)).astype(np.float32)
        return [self.ids[p] for p in picks], noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 1) if seconds else 0.0


def latency(calls: list[tuple[int, float]], below: int | None = None) -> dict[str, Any]:
    """p50, p99 and the longest of the calls made while the namespace held fewer than `below` rows."""
    chosen = [(size, s) for size, s in calls if below is None or size < below]
    seconds = [s for _, s in chosen]
    worst = max(chosen, key=lambda c: c[1])
    return {
        "calls": len(seconds),
        "p50_ms": percentile_ms(seconds, 50),
        "p99_ms": percentile_ms(seconds, 99),
        "max_ms": round(worst[1] * 1e3, 1),
        "max_at_size": worst[0],
    }


def grow(make: Any, folder: Path, target: int, args: argparse.Namespace, label: str) -> dict[str, Any]:
    dim, batch = args.dim, args.batch
    rng = np.random.default_rng(args.seed)
    sources = Sources(args.sources, dim, np.random.default_rng(args.seed + 1))
    rss_before, written_before = rss_bytes(), io_written()
    ns: AnyNamespace = make(folder)
    calls: list[tuple[int, float]] = []
    exact_rows: list[int] = []  # the new namespace's rows searched exactly, at each call
    planted = found = 0
    item = 0
    started = time.perf_counter()
    next_report = target // 10
    while ns.size < target:
        vectors = units(rng, batch, dim)
        ids = [f"i{item + k}" for k in range(batch)]
        duplicate_of: dict[int, str] = {}
        if sources.ids:
            # Each item is a planted near-duplicate with probability args.planted.
            positions = np.flatnonzero(rng.random(batch) < args.planted)
            if len(positions):
                source_ids, noisy = sources.near_duplicates(len(positions), args.dup_cosine)
                vectors[positions] = noisy
                duplicate_of = dict(zip(positions.tolist(), source_ids, strict=True))
        size = ns.size
        began = time.perf_counter()
        verdicts = ns.judge(ids, vectors, args.threshold)
        ns.commit(f"b{item}", verdicts, vectors)
        calls.append((size, time.perf_counter() - began))
        exact_rows.append(getattr(ns, "exact_rows", 0))
        for position, verdict in enumerate(verdicts):
            if position in duplicate_of:
                planted += 1
                found += (not verdict.kept) and verdict.nearest_id == duplicate_of[position]
            elif verdict.kept:
                sources.offer(verdict.id, vectors[position])
        item += batch
        if ns.size >= next_report:
            so_far = latency(calls)
            print(
                f"  {label}: {ns.size:,} rows, {time.perf_counter() - started:,.0f} s, "
                f"p50 {so_far['p50_ms']} ms, p99 {so_far['p99_ms']} ms, max {so_far['max_ms']} ms",
                flush=True,
            )
            next_report += target // 10
    grow_s = time.perf_counter() - started
    settle = getattr(ns, "settle", None)
    if settle is not None:  # background snapshots still running belong to the bytes written
        settle()
    rows = ns.size
    memory = rss_bytes() - rss_before
    ns.close()
    written = io_written() - written_before
    on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

    del ns
    began = time.perf_counter()
    reopened: AnyNamespace = make(folder)
    probe_ids, probe = sources.near_duplicates(args.batch, args.dup_cosine)
    verdicts = reopened.judge([f"probe{k}" for k in range(len(probe))], probe, args.threshold)
    restart_s = time.perf_counter() - began
    after_restart = [(not v.kept) and v.nearest_id == source for v, source in zip(verdicts, probe_ids, strict=True)]
    # More probes after restart: the recall of a reopened namespace (snapshot + rows searched exactly).
    for _ in range(args.restart_probes // args.batch):
        probe_ids, probe = sources.near_duplicates(args.batch, args.dup_cosine)
        verdicts = reopened.judge([f"probe{k}" for k in range(len(probe))], probe, args.threshold)
        after_restart += [(not v.kept) and v.nearest_id == source for v, source in zip(verdicts, probe_ids, strict=True)]
    index_kind = reopened.index_kind
    reopened.close()
    return {
        "rows": rows,
        "grow_s": round(grow_s, 1),
        "latency": latency(calls),
        "latency_by_size": [latency(calls[k * len(calls) // 10 : (k + 1) * len(calls) // 10]) for k in range(10)],
        "exact_rows_max": max(exact_rows),
        "calls_with_over_1000_exact_rows": sum(rows > 1000 for rows in exact_rows),
        "calls": calls,
        "restart_s": round(restart_s, 2),
        "bytes_written": written,
        "bytes_on_disk": on_disk,
        "memory_per_vector_bytes": round(memory / rows),
        "planted": planted,
        "recall": round(found / planted, 5) if planted else None,
        "recall_after_restart": round(float(np.mean(after_restart)), 5),
        "index_kind": index_kind,
    }


def machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    # Other work on the machine shows in the latencies: the load average says how much there was.
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()}


def summary(result: dict[str, Any]) -> str:
    lat = result["latency"]
    return (
        f"{result['rows']:,} rows in {result['grow_s']:,.0f} s: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
        f"longest {lat['max_ms']} ms (at {lat['max_at_size']:,}); restart {result['restart_s']} s; "
        f"written {result['bytes_written'] / 1e9:.2f} GB; {result['memory_per_vector_bytes']:,} B/vector; "
        f"recall {result['recall']} (after restart {result['recall_after_restart']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="rows to grow the new namespace to")
    parser.add_argument("--baseline-vectors", type=int, default=200_000, help="rows to grow the baseline to (0: skip it)")
    parser.add_argument("--batch", type=int, default=64, help="items per FilterBatch call")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--planted", type=float, default=0.02, help="share of items that are near-duplicates of earlier ones")
    parser.add_argument("--dup-cosine", type=float, default=0.95, help="cosine of a planted near-duplicate to its source")
    parser.add_argument("--threshold", type=float, default=None, help="cosine threshold (default: the dedup service's)")
    parser.add_argument("--sources", type=int, default=20_000, help="kept vectors sampled as sources of planted duplicates")
    parser.add_argument("--restart-probes", type=int, default=2_048, help="near-duplicates judged after the restart")
    parser.add_argument("--exact-limit", type=int, default=None, help="override the exact-to-HNSW switch (smoke tests)")
    parser.add_argument("--snapshot-every", type=int, default=None, help="override the least rows between snapshots (smoke tests)")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the namespaces (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from dataclasses import replace

    from benchmarks.baseline_dedup_namespace import Namespace as BaselineNamespace

    from autodidact.dedup.defaults import DEFAULT_THRESHOLD, NamespaceSettings
    from autodidact.dedup.namespaces import Namespace

    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD
    settings = NamespaceSettings()
    if args.exact_limit is not None:
        settings = replace(settings, exact_limit=args.exact_limit)
    if args.snapshot_every is not None:
        settings = replace(settings, snapshot_every=args.snapshot_every)
    load_at_start = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="dedup-scale-", dir=args.dir))
    print(f"namespaces in {folder}; {machine()}", flush=True)
    results: dict[str, Any] = {}
    try:
        if args.baseline_vectors:
            print(f"baseline (before issue 13) to {args.baseline_vectors:,} rows", flush=True)
            results["baseline"] = grow(
                lambda path: BaselineNamespace(path, args.dim, settings), folder / "baseline", args.baseline_vectors, args, "baseline"
            )
            shutil.rmtree(folder / "baseline")
            print(f"baseline: {summary(results['baseline'])}", flush=True)
        print(f"new namespace to {args.vectors:,} rows", flush=True)
        results["new"] = grow(lambda path: Namespace(path, args.dim, settings), folder / "new", args.vectors, args, "new")
        print(f"new: {summary(results['new'])}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    new = results["new"]
    report: dict[str, Any] = {
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "workload": {
            "dim": args.dim,
            "batch": args.batch,
            "threshold": args.threshold,
            "planted_share": args.planted,
            "dup_cosine": args.dup_cosine,
            "settings": settings.__dict__,
        },
        "targets": TARGETS,
        "new": {k: v for k, v in new.items() if k != "calls"},
        "meets_targets": {
            "p99_ms": new["latency"]["p99_ms"] <= TARGETS["p99_ms"],
            "max_ms": new["latency"]["max_ms"] <= TARGETS["max_ms"],
            "restart_s": new["restart_s"] <= TARGETS["restart_s"],
            "recall": (new["recall"] or 0) >= TARGETS["recall"] and new["recall_after_restart"] >= TARGETS["recall"],
        },
    }
    if "baseline" in results:
        base = results["baseline"]
        same_size = latency(new["calls"], below=base["rows"])
        report["baseline"] = {k: v for k, v in base.items() if k != "calls"}
        report["new_up_to_baseline_size"] = same_size
        report["baseline_over_new_at_same_size"] = {
            key: round(base["latency"][key] / same_size[key], 2) if same_size[key] else None for key in ("p50_ms", "p99_ms", "max_ms")
        }
        ratios = report["baseline_over_new_at_same_size"]
        print(
            f"up to {base['rows']:,} rows, baseline / new: p50 {ratios['p50_ms']}x, p99 {ratios['p99_ms']}x, longest {ratios['max_ms']}x "
            f"(new: p50 {same_size['p50_ms']} ms, p99 {same_size['p99_ms']} ms, longest {same_size['max_ms']} ms)",
            flush=True,
        )
    print(f"targets {TARGETS}: {report['meets_targets']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
