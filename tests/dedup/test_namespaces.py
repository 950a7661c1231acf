"""FAISS namespaces with their SQLite log (real FAISS, real files; synthetic unit vectors)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from autodidact.dedup.defaults import NamespaceSettings
from autodidact.dedup.namespaces import Namespace

DIM = 16


def unit(*rows: list[float]) -> np.ndarray:
    vectors = np.array(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_units(n: int, seed: int) -> np.ndarray:
    return unit(*np.random.default_rng(seed).normal(size=(n, DIM)).tolist())


def e(i: int, j: int | None = None, mix: float = 0.0) -> list[float]:
    v = [0.0] * DIM
    v[i] = 1.0
    if j is not None:
        v[j] = mix
    return v


def test_duplicates_inside_a_batch_and_against_the_namespace_are_dropped(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings())
    first = ns.judge(["a", "b", "c"], unit(e(0), e(0, 1, 0.1), e(2)), threshold=0.8)
    assert [(v.kept, v.nearest_id) for v in first] == [(True, ""), (False, "a"), (True, "a")]
    assert first[1].similarity == pytest.approx(1 / np.sqrt(1.01), abs=1e-5)
    ns.commit("", first, unit(e(0), e(0, 1, 0.1), e(2)))
    assert ns.size == 2
    second = ns.judge(["d", "e"], unit(e(2, 3, 0.2), e(5)), threshold=0.8)
    assert [(v.kept, v.nearest_id) for v in second] == [(False, "c"), (True, "a")]


def test_judging_changes_nothing_until_commit(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings())
    ns.judge(["a"], unit(e(0)), threshold=0.8)
    assert ns.size == 0


def test_a_namespace_survives_reopening_with_and_without_a_snapshot(tmp_path):
    settings = NamespaceSettings(snapshot_every=4)
    ns = Namespace(tmp_path / "ns", DIM, settings)
    vectors = random_units(10, seed=1)
    for start in range(0, 10, 3):
        chunk = vectors[start : start + 3]
        ids = [f"v{start + k}" for k in range(len(chunk))]
        ns.commit(f"batch-{start}", ns.judge(ids, chunk, threshold=1.01), chunk)
    ns.settle()  # snapshots are written in the background
    assert ns.size == 10 and (tmp_path / "ns" / "index.faiss").exists()
    probe = random_units(5, seed=2)
    before = ns.judge([f"p{k}" for k in range(5)], probe, threshold=0.5)
    ns.close()
    reopened = Namespace(tmp_path / "ns", DIM, settings)
    assert reopened.size == 10
    assert reopened.judge([f"p{k}" for k in range(5)], probe, threshold=0.5) == before
    assert reopened.recorded_verdicts("batch-3") is not None and reopened.recorded_verdicts("nope") is None
    # A torn snapshot (size disagrees with the index file) is ignored: the log rebuilds it.
    reopened.close()
    (tmp_path / "ns" / "index.json").write_text('{"size": 7}')
    rebuilt = Namespace(tmp_path / "ns", DIM, settings)
    assert rebuilt.size == 10
    assert rebuilt.judge([f"p{k}" for k in range(5)], probe, threshold=0.5) == before


def test_switches_to_hnsw_past_the_exact_limit_and_still_finds_neighbours(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings(exact_limit=50))
    vectors = random_units(200, seed=3)
    ids = [f"v{i}" for i in range(200)]
    ns.commit("", ns.judge(ids, vectors, threshold=1.01), vectors)
    ns.settle()  # the graph is built in the background (test_the_hnsw_switch_happens_in_the_background)
    assert ns.index_kind == "hnsw" and ns.size == 200
    # Each stored vector's nearest neighbour is itself.
    verdicts = ns.judge([f"q{i}" for i in range(200)], vectors, threshold=0.99)
    assert sum(v.nearest_id == f"v{i}" for i, v in enumerate(verdicts)) >= 198
    assert not any(v.kept for v in verdicts[:1])


def test_commit_is_all_or_nothing(tmp_path):
    ns = Namespace(tmp_path / "ns", DIM, NamespaceSettings())
    vectors = unit(e(0), e(1))
    ns.commit("b1", ns.judge(["a", "b"], vectors, threshold=0.8), vectors)
    with pytest.raises(sqlite3.IntegrityError):
        ns.commit("b1", ns.judge(["c", "d"], unit(e(2), e(3)), threshold=0.8), unit(e(2), e(3)))  # batch id taken
    assert ns.size == 2
    ns.close()
    assert Namespace(tmp_path / "ns", DIM, NamespaceSettings()).size == 2
