"""Writes a job's dataset: JSONL and Parquet tables, the lineage of every
candidate, a manifest and a dataset card. Files are written to a temporary
name and renamed, so a reader never sees half a file, and a failed write
leaves no temporary file behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from autodidact.coordinator.records import Record

TMP_SUFFIX = ".tmp"
# proto3's JSON mapping writes these as strings; the manifest wants numbers.
_INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64, descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64, descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def remove_temporary_files(directory: Path) -> None:
    """Leftovers of an export that was killed between write and rename."""
    if directory.is_dir():
        for leftover in directory.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def _replace_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def conform(rows: list[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    """The rows as the table's schema has them: every column in every row,
    in schema order and type, so the JSONL and Parquet files read the same."""
    return pa.Table.from_pylist(rows, schema=schema).to_pylist()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")

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


def message_json(message: Message, zeros: bool = False) -> dict[str, Any]:
    """A message's JSON mapping with 64-bit integers as JSON numbers; with
    `zeros`, counts of 0 are written too (a reader should not have to know
    that proto3's JSON omits them)."""
    mapping = json_format.MessageToDict(message, always_print_fields_with_no_presence=zeros)
    return _numbers(message.DESCRIPTOR, mapping)


def _numbers(message_type: descriptor.Descriptor, value: dict[str, Any]) -> dict[str, Any]:
    for field in message_type.fields:
        if field.json_name not in value:
            continue
        entry = value[field.json_name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            if inner.type in _INT64_TYPES:
                value[field.json_name] = {k: int(v) for k, v in entry.items()}
            elif inner.message_type is not None:
                value[field.json_name] = {k: _numbers(inner.message_type, v) for k, v in entry.items()}
        elif field.type in _INT64_TYPES:
            value[field.json_name] = [int(v) for v in entry] if isinstance(entry, list) else int(entry)
        elif field.message_type is not None and field.message_type.full_name.startswith("autodidact."):
            value[field.json_name] = [_numbers(field.message_type, v) for v in entry] if isinstance(entry, list) else _numbers(field.message_type, entry)
    return value


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / "manifest.json"
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps({**manifest, "exported_at": time.time()}, indent=2, sort_keys=True) + "\n"))
    return path


def write_dataset_card(directory: Path, job_id: str, recipe: str, tables: dict[str, tuple[pa.Schema, int]], partial: bool) -> Path:
    """README.md in the Hugging Face datasets convention: a `configs:` entry
    per table ({name: (schema, rows)}), so `datasets.load_dataset(directory,
    name=TABLE)` reads it. An empty table gets no entry: `datasets` cannot
    load a file without rows, and the card says so."""
    loadable = [name for name, (_, rows) in tables.items() if rows]
    lines = ["---", "configs:" if loadable else "configs: []"]
    for position, name in enumerate(loadable):
        lines += [f"- config_name: {name}", f"  data_files: {name}.parquet"]
        if position == 0:
            lines.append("  default: true")
    lines += ["---", "", f"# {job_id}", "", f"Made by autodidact's {recipe} recipe."]
    if partial:
        lines.append("The job was cancelled: these tables hold what it finished, no more (see manifest.json).")
    lines += ["Each table is in `TABLE.parquet` and `TABLE.jsonl` (same rows, same columns); `lineage.jsonl` says why",
              "every candidate was kept or dropped, and `manifest.json` holds the spec, models and stage counts.", ""]
    for name, (schema, rows) in tables.items():
        lines += [f"## {name}", "", f"{rows:,} rows." + ("" if rows else " Empty, so not a config: `datasets` cannot load it."), ""]
        lines += ["| column | type |", "| --- | --- |"]
        lines += [f"| {column.name} | {column.type} |" for column in schema]
        lines.append("")
    path = directory / "README.md"
    _replace_atomically(path, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    return path
