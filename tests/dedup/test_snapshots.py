"""Snapshots and the exact-to-HNSW switch run in the background (issue 13):
a call never waits for them, a crash before or during one loses nothing, and a
restart loads the last snapshot and searches the log rows after it.

Background work is made to block on an Event, so a call that waited for it
would hang until the Event's timeout instead of returning at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import faiss
import numpy as np
from benchmarks.baseline_dedup_namespace import Namespace as PreviousNamespace

from autodidact.dedup import namespaces
from autodidact.dedup.defaults import NamespaceSettings
from autodidact.dedup.namespaces import Namespace
from tests.dedup.test_namespaces import DIM, random_units

# Helpers take this version's Namespace or the previous one (benchmarks/baseline_dedup_namespace.py): Any.
BLOCKED_FOR = 20.0  # seconds a blocked background job waits before giving up


def grow(ns: Any, vectors: np.ndarray, start: int, batch: int, prefix: str = "v") -> list[float]:
    """Judges and commits vectors[start:] in batches (ids prefix+row, batch ids b<row>); the seconds each call took."""
    seconds = []
    for first in range(start, len(vectors), batch):
        chunk = vectors[first : first + batch]
        ids = [f"{prefix}{first + k}" for k in range(len(chunk))]
        began = time.perf_counter()
        ns.commit(f"b{first}", ns.judge(ids, chunk, threshold=0.99), chunk)
        seconds.append(time.perf_counter() - began)
    return seconds


def finds_itself(ns: Any, vectors: np.ndarray, prefix: str = "v") -> float:
    """Share of the vectors whose near-duplicate (the vector plus tiny noise) is dropped as a copy of it."""
    noisy = vectors + np.random.default_rng(99).normal(scale=1e-3, size=vectors.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    hits = 0
    for first in range(0, len(vectors), 64):
        chunk = noisy[first : first + 64]
        verdicts = ns.judge([f"probe{first + k}" for k in range(len(chunk))], chunk, threshold=0.99)
        hits += sum(not v.kept and v.nearest_id == f"{prefix}{first + k}" for k, v in enumerate(verdicts))
    return hits / len(vectors)


def blocking(real, release: threading.Event, started: threading.Event):
    def job(*args):
        started.set()
        release.wait(BLOCKED_FOR)
        return real(*args)

    return job


def test_commits_do_not_wait_for_a_slow_snapshot(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings(exact_limit=30, snapshot_every=40))
    vectors = random_units(400, seed=5)
    grow(ns, vectors[:40], 0, 20)
    ns.settle()  # the graph of 40 rows, and its snapshot
    assert ns.index_kind == "hnsw" and (tmp_path / "ns" / "index.json").read_text() == '{"size": 40}'
    release, started = threading.Event(), threading.Event()
    ns._write_snapshot = blocking(ns._write_snapshot, release, started)  # type: ignore[method-assign]
    seconds = grow(ns, vectors[:200], 40, 20)
    assert started.is_set(), "a snapshot was due at 80 rows"
    # The snapshot is still blocked: the graph is frozen at 80 rows and the rest is searched exactly.
    assert max(seconds) < 1.0 and (tmp_path / "ns" / "index.json").read_text() == '{"size": 40}'
    assert ns.size == 200 and ns.exact_rows == 120
    assert finds_itself(ns, vectors[:200]) == 1.0
    release.set()
    ns.settle()
    assert ns.exact_rows == 0 and finds_itself(ns, vectors[:200]) == 1.0
    assert (tmp_path / "ns" / "index.json").read_text() == '{"size": 200}'  # 80 first, then all 200 when due
    ns.close()


def test_a_crash_before_or_during_a_snapshot_loses_nothing(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings(snapshot_every=40))
    release, started = threading.Event(), threading.Event()
    ns._write_snapshot = blocking(ns._write_snapshot, release, started)  # type: ignore[method-assign]
    vectors = random_units(120, seed=6)
    grow(ns, vectors, 0, 12)
    assert started.is_set()
    # The process dies here: the snapshot never finishes and leaves a torn file.
    (tmp_path / "ns" / "index.faiss.tmp").write_bytes(b"torn")
    after_crash = Namespace(tmp_path / "ns", DIM, NamespaceSettings(snapshot_every=40))
    assert after_crash.size == 120
    assert after_crash.recorded_verdicts("b108") == ns.recorded_verdicts("b108") is not None
    assert finds_itself(after_crash, vectors) == 1.0
    release.set()
    ns.close()
    after_crash.close()


def test_a_restart_loads_the_snapshot_and_searches_the_rows_after_it(tmp_path):
    settings = NamespaceSettings(exact_limit=100, snapshot_every=60, drain_per_commit=8)
    ns = Namespace(tmp_path / "ns", DIM, settings)
    vectors = random_units(300, seed=7)
    grow(ns, vectors[:240], 0, 20)
    ns.settle()
    snapshot_rows = ns._snapshot_size()
    assert 180 <= snapshot_rows <= 240 and ns.index_kind == "hnsw"
    # Fewer rows than the next snapshot needs (where the last one fell depends on the background thread's pace).
    total = 240 + min(30, ns._snapshot_due() - (240 - snapshot_rows) - 1)
    grow(ns, vectors[:total], 240, 10)
    ns.settle()
    assert ns._snapshot_size() == snapshot_rows < total
    ns.close()
    reopened = Namespace(tmp_path / "ns", DIM, settings)
    # The graph came from the snapshot (a build would still be flat here); the rest is searched exactly.
    assert reopened.index_kind == "hnsw" and reopened.size == total and reopened.exact_rows == total - snapshot_rows
    assert finds_itself(reopened, vectors[:total]) == 1.0
    exact = reopened.exact_rows
    grow(reopened, vectors[: total + 4], total, 4)  # 12 exact rows join the graph: the batch's 4, and 8 more
    assert reopened.exact_rows == exact + 4 - 12 and reopened.size == total + 4
    reopened.close()


def test_the_hnsw_switch_happens_in_the_background(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings(exact_limit=100, snapshot_every=10_000))
    release, started = threading.Event(), threading.Event()
    ns._build_hnsw = blocking(ns._build_hnsw, release, started)  # type: ignore[method-assign]
    vectors = random_units(300, seed=8)
    grow(ns, vectors[:120], 0, 20)
    assert started.wait(5) and ns.index_kind == "flat"
    seconds = grow(ns, vectors[:300], 120, 20)
    assert max(seconds) < 1.0 and ns.index_kind == "flat" and ns.exact_rows == 300
    assert finds_itself(ns, vectors[:300]) == 1.0
    release.set()
    ns.settle()
    assert ns.index_kind == "hnsw" and ns.exact_rows == 0
    assert isinstance(ns._graph, faiss.IndexHNSWFlat) and ns._graph.ntotal == 300
    assert finds_itself(ns, vectors[:300]) >= 0.99
    ns.close()


def test_a_failed_snapshot_is_logged_and_tried_again(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings(snapshot_every=20))
    real, failures = ns._write_snapshot, list[int]()

    def flaky(rows):
        if not failures:
            failures.append(len(rows))  # an exact namespace's rows
            raise OSError("disk full")
        real(rows)

    ns._write_snapshot = flaky  # type: ignore[method-assign]
    vectors = random_units(60, seed=9)
    grow(ns, vectors[:20], 0, 20)
    ns.settle()  # the failure surfaces in no call, and is not retried at once
    assert failures == [20] and not (tmp_path / "ns" / "index.json").exists()
    grow(ns, vectors, 20, 20)
    ns.settle()
    assert ns._snapshot_size() == 60
    ns.close()


def test_a_namespace_written_by_the_previous_version_opens_and_grows(tmp_path):
    settings = NamespaceSettings(exact_limit=100, snapshot_every=50)
    previous = PreviousNamespace(tmp_path / "ns", DIM, settings)
    vectors = random_units(300, seed=10)
    grow(previous, vectors[:230], 0, 23)
    recorded = previous.recorded_verdicts("b23")
    previous.close()
    assert 0 < previous._snapshot_size() < 230  # its last snapshot, then rows only in the log

    ns = Namespace(tmp_path / "ns", DIM, settings)
    assert ns.size == 230 and ns.index_kind == "hnsw" and ns.exact_rows == 230 - previous._snapshot_size()
    assert recorded is not None and [v.to_json() for v in ns.recorded_verdicts("b23") or []] == [v.to_json() for v in recorded]
    assert finds_itself(ns, vectors[:230]) >= 0.99
    grow(ns, vectors, 230, 10)
    ns.settle()
    ns.close()
    reopened = Namespace(tmp_path / "ns", DIM, settings)
    assert reopened.size == 300 and finds_itself(reopened, vectors) >= 0.99
    reopened.close()


def test_the_log_is_checkpointed_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(namespaces, "CHECKPOINT_ROWS", 50)
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings())
    threads, real = [], ns._checkpoint

    def checkpoint():
        threads.append(threading.current_thread().name)
        real()

    ns._checkpoint = checkpoint  # type: ignore[method-assign]
    grow(ns, random_units(200, seed=11), 0, 20)
    ns.close()  # waits for queued background work
    # 21 log rows a commit (20 vectors, 1 batch): one checkpoint every third commit, on the background thread.
    assert len(threads) == 3 and all(name.startswith("dedup-background") for name in threads)
    # The rows reached the database file itself: the commits left the WAL to the checkpoints.
    assert (tmp_path / "ns" / "log.sqlite").stat().st_size > 200 * DIM * 4
