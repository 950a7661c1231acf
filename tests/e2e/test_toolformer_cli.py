"""The Toolformer recipe end to end from the CLI on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from autodidact.coordinator.recipes.formats import gsm8k_document
from tests.conftest import GSM8K

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
pytestmark = pytest.mark.slow


def test_the_calculator_recipe_runs_from_the_cli_and_writes_its_dataset(tmp_path):
    lines = (GSM8K).read_text().splitlines()[:2]
    documents = [gsm8k_document(**{k: json.loads(line)[k] for k in ("question", "answer")})[0] for line in lines]
    documents.append("The weather was pleasant and nobody was in a hurry.")  # no arithmetic: the pre-filter drops it
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(documents)))
    recipe = tmp_path / "recipe.yaml"
    # A threshold of −100 keeps every call that executes, so splicing is exercised whatever the small model's losses.
    recipe.write_text(
        "toolformer:\n  documents_path: docs.jsonl\n  tools: [Calculator]\n  positions_per_document: 3\n"
        "  calls_per_position: 3\n  filter_threshold: -100\nseed: 3\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [AUTODIDACT, "run", str(recipe), "--data-dir", str(tmp_path / "state"), "--out", str(out), "--quiet", "--threads", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stdout

    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    lineage = [json.loads(line) for line in (out / "lineage.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert pq.read_table(out / "documents.parquet").num_rows == len(rows)
    assert manifest["recipe"] == "toolformer"

    executed = [c for c in calls if c["result"] is not None]
    assert executed, "the model proposed no executable call"
    for row in rows:
        assert row["calls"]
        assert row["augmented_text"] != row["text"]
        # Removing the spliced calls gives the document back.
        stripped = row["augmented_text"]
        for call in row["calls"]:
            stripped = stripped.replace(" " + call["call"], "", 1) if (" " + call["call"]) in stripped else stripped.replace(call["call"], "", 1)
        assert stripped == row["text"]
        for call in row["calls"]:
            assert call["call"] == f"[Calculator({call['input']}) -> {call['result']}]"
            assert call["loss_minus"] - call["loss_plus"] == pytest.approx(call["gain"])
    assert {r["document_id"] for r in rows} <= {"d0", "d1"}
    for call in executed:
        assert call["loss_plus"] is not None and call["loss_no_call"] is not None
    by_item = {entry["item_id"]: entry for entry in lineage}
    prefilter = by_item["doc00002/Calculator"]["lineage"]
    assert [(e["stage"], e["kept"], e.get("filter")) for e in prefilter] == [("prefilter", False, "no_arithmetic")]
    # Every executed call's lineage runs from its sample to the filter's decision, with the sample's seed.
    for call in executed:
        steps = [e["stage"] for e in by_item[call["item_id"]]["lineage"]]
        assert steps[:3] == ["sample_call", "execute", "filter"]
        assert by_item[call["item_id"]]["lineage"][0]["seed"] > 0
