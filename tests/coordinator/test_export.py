"""The export folder reads as a Hugging Face dataset, with numbers as numbers
and no temporary files left by a failed write (issue 10, items 9 and 10)."""

from __future__ import annotations

import json


import pyarrow as pa
import pytest

from autodidact.coordinator import export
from autodidact.v1 import coordinator_pb2

SCHEMA = pa.schema([("item_id", pa.string()), ("score", pa.float64()), ("tags", pa.list_(pa.string())), ("note", pa.string())])


def test_rows_missing_a_column_or_typed_loosely_are_written_with_the_table_schema(tmp_path):
    rows = export.conform([{"item_id": "a", "score": 1, "tags": ["x"]}, {"tags": [], "item_id": "b", "score": 0.5, "note": "n"}], SCHEMA)
    assert rows == [{"item_id": "a", "score": 1.0, "tags": ["x"], "note": None}, {"item_id": "b", "score": 0.5, "tags": [], "note": "n"}]
    export.write_jsonl(tmp_path / "t.jsonl", rows)
    assert [list(json.loads(line)) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == [SCHEMA.names] * 2


def test_the_dataset_card_lets_datasets_load_every_table_by_name(tmp_path):
    import datasets

    tables = {"first": (export.conform([{"item_id": "a", "score": 2}], SCHEMA), SCHEMA),
              "second": ([{"prompt": "p", "completion": "c"}], pa.schema([("prompt", pa.string()), ("completion", pa.string())]))}
    for name, (rows, schema) in tables.items():
        export.write_jsonl(tmp_path / f"{name}.jsonl", rows)
        export.write_parquet(tmp_path / f"{name}.parquet", rows, schema)
    export.write_jsonl(tmp_path / "lineage.jsonl", [{"item_id": "a", "data": {"anything": [1, "mixed"]}}])
    empty = pa.schema([("item_id", pa.string())])
    export.write_parquet(tmp_path / "empty.parquet", [], empty)
    card = export.write_dataset_card(
        tmp_path, "job-1", "self_instruct", {**{n: (s, len(r)) for n, (r, s) in tables.items()}, "empty": (empty, 0)}, partial=False
    )
    assert card.read_text().startswith("---\nconfigs:\n- config_name: first\n  data_files: first.parquet\n  default: true\n")
    for name, (rows, _) in tables.items():
        loaded = datasets.load_dataset(str(tmp_path), name=name, split="train", cache_dir=str(tmp_path / "cache"))
        assert loaded.to_list() == rows
    # `datasets` cannot load a file without rows: an empty table is described but is no config.
    assert "config_name: empty" not in card.read_text() and "## empty\n\n0 rows. Empty" in card.read_text()
    # Without a name: the default table, not a mix of every file in the folder.
    assert datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "cache")).column_names == SCHEMA.names


def test_manifest_numbers_are_json_numbers():
    stage = coordinator_pb2.StageProgress(stage="dataset", done=12, kept=3, total=20, dropped_by_filter={"error": 2})
    assert export.message_json(stage) == {"stage": "dataset", "done": 12, "kept": 3, "total": 20, "droppedByFilter": {"error": 2}}
    assert export.message_json(coordinator_pb2.ExportedFile(path="p", kind="k", rows=7))["rows"] == 7
    job = coordinator_pb2.Job(id="j", stages=[stage])
    assert export.message_json(job)["stages"][0]["done"] == 12
    # A table with no rows says 0, not nothing (proto3's JSON leaves zeros out).
    assert export.message_json(coordinator_pb2.ExportedFile(path="p", kind="k"), zeros=True)["rows"] == 0
    assert export.message_json(coordinator_pb2.StageProgress(stage="s"), zeros=True)["kept"] == 0


def test_a_failed_write_leaves_no_temporary_file_and_leftovers_are_removed(tmp_path):
    (tmp_path / "t.parquet").mkdir()  # cannot be replaced by a file
    with pytest.raises(OSError):
        export.write_parquet(tmp_path / "t.parquet", [{"item_id": "a"}], SCHEMA)
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "old.jsonl.tmp").write_text("killed mid-write")
    export.remove_temporary_files(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
