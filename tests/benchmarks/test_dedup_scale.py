"""The dedup scale benchmark runs end to end at a small scale (dimension 64,
a few thousand rows, the HNSW switch at 1,000) and reports every figure for
the new namespace and the baseline. Not the targets: those are for the full
run, docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("restart_s", "bytes_written", "bytes_on_disk", "memory_per_vector_bytes", "planted", "recall", "recall_after_restart")


def test_the_benchmark_reports_every_figure_at_a_small_scale(tmp_path):
    out = tmp_path / "dedup_scale.json"
    command = [sys.executable, "-m", "benchmarks.dedup_scale", "--vectors", "4000", "--baseline-vectors", "2000", "--dim", "64"]
    command += [
        "--exact-limit",
        "1000",
        "--snapshot-every",
        "500",
        "--planted",
        "0.05",
        "--restart-probes",
        "256",
        "--dir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    subprocess.run(
        command,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    report = json.loads(out.read_text())
    for side, rows in (("new", 4000), ("baseline", 2000)):
        figures = report[side]
        assert figures["rows"] >= rows and figures["index_kind"] == "hnsw"  # after the restart
        assert all(figures[name] is not None for name in FIGURES)
        assert figures["planted"] > 50 and figures["recall"] >= 0.99 and figures["recall_after_restart"] >= 0.99
        assert figures["bytes_written"] > figures["rows"] * 64 * 4  # at least every vector once, in the log
        latency = figures["latency"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert report["new_up_to_baseline_size"]["calls"] > 0 and set(report["baseline_over_new_at_same_size"]) == {
        "p50_ms",
        "p99_ms",
        "max_ms",
    }
    assert set(report["meets_targets"]) == {"p99_ms", "max_ms", "restart_s", "recall"}
    assert list(tmp_path.iterdir()) == [out]  # the namespaces' folder is removed
