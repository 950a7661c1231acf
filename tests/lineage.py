"""The lineage contract (docs/jobs.md, "Lineage"), checked on a finished job
and its export folder; shared by the end-to-end tests of every recipe.

1. Every item with a decision appears in lineage.jsonl exactly once (nothing a
   stage decided is missing: rule 3's counts come from the store).
2. Each row has one final decision: every decision kept and the row kept at a
   final stage, or exactly one drop, the last one, and the row not kept.
3. Each stage's progress equals what the lineage rows say about that stage.
4. The manifest's stages equal the job's, as JSON numbers; the tables' rows
   come from kept rows, and every file's row count is right.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.v1 import coordinator_pb2


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_lineage_agrees(job: coordinator_pb2.Job, export_dir: Path) -> None:
    problems = lineage_problems(job, export_dir)
    assert not problems, f"job {job.id} breaks the lineage contract:\n  " + "\n  ".join(problems[:40])


def lineage_problems(job: coordinator_pb2.Job, export_dir: Path) -> list[str]:
    """Every broken rule, as "rule N: what" lines (empty when the contract holds)."""
    problems: list[str] = []
    recipe = job.spec.WhichOneof("recipe")
    assert recipe is not None, f"job {job.id}'s spec names no recipe, so its final stages are unknown"
    final_stages = RECIPES[recipe].final_stages
    rows = read_jsonl(export_dir / "lineage.jsonl")
    manifest = json.loads((export_dir / "manifest.json").read_text())

    # 1. one row per item
    for item_id, count in Counter(r["item_id"] for r in rows).items():
        if count > 1:
            problems.append(f"rule 1: {item_id} has {count} lineage rows")

    # 2. one final decision per row
    for row in rows:
        decisions = row["lineage"]
        drops = [d for d in decisions if not d["kept"]]
        if not decisions:
            problems.append(f"rule 2: {row['item_id']} has no decision")
        elif not drops:
            if not row["kept"]:
                problems.append(f"rule 2: {row['item_id']}: every decision kept it, but the row says dropped")
            if decisions[-1]["stage"] not in final_stages:
                problems.append(f"rule 2: {row['item_id']}: kept, but its last decision is at {decisions[-1]['stage']}, not a final stage")
        else:
            if len(drops) > 1:
                problems.append(f"rule 2: {row['item_id']} was dropped {len(drops)} times ({', '.join(d['stage'] for d in drops)})")
            if decisions[-1]["kept"]:
                problems.append(f"rule 2: {row['item_id']}: dropped at {drops[0]['stage']} but decided again after")
            if row["kept"]:
                problems.append(f"rule 2: {row['item_id']}: dropped at {drops[0]['stage']}, but the row says kept")
        if sum(1 for d in decisions if d["stage"] in final_stages) > 1:
            problems.append(f"rule 2: {row['item_id']} has more than one final decision")

    # 3. stage counts agree with the rows
    for stage in job.stages:
        at = [d for r in rows for d in r["lineage"] if d["stage"] == stage.stage]
        kept = sum(d["kept"] for d in at)
        dropped = Counter(d.get("filter", "") for d in at if not d["kept"])
        if stage.done != len(at):
            problems.append(f"rule 3: stage {stage.stage}: done {stage.done}, lineage rows with a decision there {len(at)}")
        if stage.kept != kept:
            problems.append(f"rule 3: stage {stage.stage}: kept {stage.kept}, lineage says {kept}")
        if dict(stage.dropped_by_filter) != dict(dropped):
            problems.append(f"rule 3: stage {stage.stage}: dropped_by_filter {dict(stage.dropped_by_filter)}, lineage says {dict(dropped)}")
        if stage.HasField("total") and stage.done > stage.total:
            problems.append(f"rule 3: stage {stage.stage}: done {stage.done} > total {stage.total}")

    # 4. the manifest and the tables
    expected = [
        {
            "stage": s.stage,
            "done": s.done,
            "kept": s.kept,
            **({"total": s.total} if s.HasField("total") else {}),
            "droppedByFilter": dict(s.dropped_by_filter),
        }
        for s in job.stages
    ]
    if manifest["stages"] != expected:
        problems.append(f"rule 4: manifest stages {manifest['stages']} differ from the job's {expected}")
    for stage in manifest["stages"]:
        numbers = [stage.get("done", 0), stage.get("kept", 0), stage.get("total", 0), *stage.get("droppedByFilter", {}).values()]
        if not all(isinstance(n, int) for n in numbers):
            problems.append(f"rule 4: manifest stage {stage['stage']} holds numbers as strings: {stage}")
    by_id = {r["item_id"]: r for r in rows}
    kept_at_end = {r["item_id"] for r in rows if r["kept"] and r["lineage"] and r["lineage"][-1]["stage"] == "dataset"}
    in_tables: set[str] = set()
    for file in manifest["files"]:
        if not isinstance(file.get("rows", 0), int):
            problems.append(f"rule 4: manifest file {file['name']} has rows {file['rows']!r}, not a number")
        path = export_dir / file["name"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != file["sha256"] or path.stat().st_size != int(file["sizeBytes"]):
            problems.append(f"rule 4: {path.name} does not match the size and sha256 the manifest gives it")
        if file["kind"].endswith("_jsonl") and file["kind"] != "lineage_jsonl":
            table = read_jsonl(path)
            if len(table) != file.get("rows", 0):
                problems.append(f"rule 4: {path.name} has {len(table)} rows, the manifest says {file.get('rows', 0)}")
            parquet_rows = pq.read_table(path.with_suffix(".parquet")).num_rows
            if parquet_rows != len(table):
                problems.append(f"rule 4: {path.name} has {len(table)} rows, its Parquet {parquet_rows}")
            for row in table:
                item_id = row.get("item_id")
                if item_id is None:
                    continue
                in_tables.add(item_id)
                if item_id not in by_id:
                    problems.append(f"rule 4: {path.name} has a row of {item_id}, which has no lineage row")
                elif "kept" not in row and not by_id[item_id]["kept"]:
                    problems.append(f"rule 4: {path.name} has a row of {item_id}, which lineage says was dropped")
    for item_id in sorted(kept_at_end):
        if not any(t == item_id or t.startswith(item_id + "/") for t in in_tables):
            problems.append(f"rule 4: {item_id} was kept, but no table has a row of it (or of its parts)")
    return problems
