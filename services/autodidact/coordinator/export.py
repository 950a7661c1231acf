"""Writes a job's dataset: JSONL and Parquet tables, the lineage of every
candidate, and a manifest. Files are written to a temporary name and renamed,
so a reader never sees half a file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from autodidact.coordinator.records import Record


def _replace_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")

    _replace_atomically(path, write)


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    _replace_atomically(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp))


def lineage_rows(records: list[Record]) -> list[dict[str, Any]]:
    return [
        {
            "item_id": r.item_id,
            "kept": r.kept,
            "data": r.data,
            "lineage": [{"stage": stage, **{k: v for k, v in vars(d).items() if v not in (None, "")}} for stage, d in r.lineage],
        }
        for r in records
    ]


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / "manifest.json"
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps({**manifest, "exported_at": time.time()}, indent=2, sort_keys=True) + "\n"))
    return path
