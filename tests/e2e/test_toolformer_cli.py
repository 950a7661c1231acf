"""The Toolformer recipe end to end from the CLI on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.coordinator.recipes.toolformer import trivial_call
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
        capture_output=True,
        text=True,
        timeout=600,
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
        # `text` (what TRL trains on by default) carries the calls; `original_text` is the document.
        assert row["text"] != row["original_text"]
        # Removing the spliced calls gives the document back.
        stripped = row["text"]
        for call in row["calls"]:
            stripped = (
                stripped.replace(" " + call["call"], "", 1) if (" " + call["call"]) in stripped else stripped.replace(call["call"], "", 1)
            )
        assert stripped == row["original_text"]
        for call in row["calls"]:
            assert call["call"] == f"[Calculator({call['input']}) -> {call['result']}]"
            assert call["loss_minus"] - call["loss_plus"] == pytest.approx(call["gain"])
    assert {r["document_id"] for r in rows} <= {"d0", "d1"}
    # A trivial call is dropped before scoring, so it has no losses; every other executed call has them.
    scored = [c for c in executed if c["dropped_by"] != "trivial_call"]
    for call in executed:
        assert (call["dropped_by"] == "trivial_call") == (trivial_call(call["input"], call["result"]) != "")
    for call in scored:
        assert call["loss_plus"] is not None and call["loss_no_call"] is not None
    by_item = {entry["item_id"]: entry for entry in lineage}
    prefilter = by_item["doc00002/Calculator"]["lineage"]
    assert [(e["stage"], e["kept"], e.get("filter")) for e in prefilter] == [("prefilter", False, "no_arithmetic")]
    # Calls are sampled under the call grammar: a malformed one can only be one cut off by max_tokens.
    for entry in lineage:
        for step in entry["lineage"]:
            if step.get("filter") == "malformed_call":
                assert "never closes" in step["reason"], step
    # No trivial call is kept: [Calculator(12) -> 12] teaches nothing.
    for row in rows:
        for call in row["calls"]:
            assert trivial_call(call["input"], call["result"]) == ""
    assert_toolformer_lineage(lineage, manifest)
    # Every executed call's lineage runs from its sample to the filter's decision, with the sample's seed.
    for call in scored:
        steps = [e["stage"] for e in by_item[call["item_id"]]["lineage"]]
        assert steps[:3] == ["sample_call", "execute", "filter"]
        assert by_item[call["item_id"]]["lineage"][0]["seed"] > 0


def assert_toolformer_lineage(lineage: list[dict], manifest: dict) -> None:
    """The lineage contract (issue 10, item 6) for this recipe: one row per
    decided item, one final decision per row, stage counts from the rows."""
    ids = [entry["item_id"] for entry in lineage]
    assert len(ids) == len(set(ids))
    for entry in lineage:
        steps = entry["lineage"]
        drops = [i for i, step in enumerate(steps) if not step["kept"]]
        if drops:
            assert drops == [len(steps) - 1] and not entry["kept"], entry
        else:
            assert entry["kept"] and steps[-1]["stage"] in ("splice", "dataset"), entry
    # Every (document, tool) item that passed the prefilter ends at splice, so it is in lineage.
    assert {i for i in ids if i.count("/") == 1} == {f"{i}/Calculator" for i in ids if "/" not in i}
    for stage in manifest["stages"]:
        at_stage = [step for entry in lineage for step in entry["lineage"] if step["stage"] == stage["stage"]]
        assert int(stage.get("done", 0)) == len(at_stage), stage
        assert int(stage.get("kept", 0)) == sum(step["kept"] for step in at_stage), stage
        dropped: dict[str, int] = {}
        for step in at_stage:
            if not step["kept"]:
                dropped[step["filter"]] = dropped.get(step["filter"], 0) + 1
        assert {k: int(v) for k, v in stage.get("droppedByFilter", {}).items()} == dropped, stage
        if "total" in stage:
            assert int(stage["done"]) <= int(stage["total"])
