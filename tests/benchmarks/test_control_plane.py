"""The control-plane benchmark runs end to end at a small scale and reports
every figure, for the current store (with and without a follower during the job) and the baseline (not the targets: those
are for the full run on the reference machine, docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ITEMS, BASELINE_ITEMS = 2_000, 200
FIGURES = (
    "results",
    "run_s",
    "durable_results_per_s",
    "finish_after_last_result_s",
    "loop_lag_p99_ms",
    "loop_lag_max_ms",
    "loop_lag_max_incl_export_ms",
    "peak_rss_after_job_mib",
    "peak_rss_mib",
    "watch_events",
    "watch_delay_p50_s",
    "watch_delay_p99_s",
    "watch_delay_max_s",
    "follow_records",
    "follow_behind_last_result_s",
    "follow_records_per_s",
    "replay_records",
    "replay_records_per_s",
    "export_s",
)


@pytest.mark.slow
def test_the_benchmark_reports_every_figure_for_every_run(tmp_path: Path) -> None:
    out = tmp_path / "control_plane.json"
    command = [sys.executable, "-m", "benchmarks.control_plane", "--items", str(ITEMS)]
    completed = subprocess.run(
        [*command, "--baseline-items", str(BASELINE_ITEMS), "--watch-only", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"current", "watch_only", "baseline"}
    assert set(report["targets"]) == {"durable_results_per_s", "loop_lag_p99_ms", "peak_rss_mib", "watch_delay_max_s", "export_s"}
    for kind, items in (("current", ITEMS), ("watch_only", ITEMS), ("baseline", BASELINE_ITEMS)):
        run = report["runs"][kind]
        for figure in FIGURES:
            value = run[figure]
            # How far the follower was behind the last result can be negative (it had it first); nothing else can.
            assert isinstance(value, (int, float)) and math.isfinite(value), (kind, figure, value)
            assert value >= 0 or figure == "follow_behind_last_result_s", (kind, figure, value)
        # Every item: a revise and a dataset result, one record kept, one row per table (one round each).
        assert run["items"] == items and run["results"] == 2 * items
        assert run["follow_records"] == (0 if kind == "watch_only" else items) and run["replay_records"] == items
        assert run["export_rows"] == {"sft_messages_jsonl": items, "preferences_jsonl": items, "lineage_jsonl": items}
    assert "durable_results_per_s" in completed.stdout  # the printed table
