"""The export folder reads as a Hugging Face dataset, with numbers as numbers
and no temporary files left by a failed write (issue 10, items 9 and 10); a
job's records are written a chunk at a time (issue 11)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autodidact.coordinator import export
from autodidact.coordinator.recipes.base import ERROR_FILTER, Decision, JobContext, StageResult
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.records import Record
from autodidact.coordinator.store import SqliteJobStore
from autodidact.v1 import coordinator_pb2

# A tuple of fields, not a list: mypy joins a list's mixed (name, type) pairs to tuple[str, object], which pa.schema refuses.
SCHEMA = pa.schema((("item_id", pa.string()), ("score", pa.float64()), ("tags", pa.list_(pa.string())), ("note", pa.string())))


def write_tables(directory: Path, tables: dict[str, tuple[list[dict[str, Any]], pa.Schema]], records: list[Record]) -> None:
    """The tables (rows not yet conformed) and the records' lineage, written as an export writes them."""
    writer = export.DatasetWriter(directory, {name: schema for name, (_, schema) in tables.items()}, lambda _: tables)
    writer.add(records)
    writer.commit()


def conformed(rows: list[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    return pa.Table.from_pylist(rows, schema=schema).to_pylist()


def test_rows_missing_a_column_or_typed_loosely_are_written_with_the_table_schema(tmp_path):
    rows = [{"item_id": "a", "score": 1, "tags": ["x"]}, {"tags": [], "item_id": "b", "score": 0.5, "note": "n"}]
    write_tables(tmp_path, {"t": (rows, SCHEMA)}, [])
    written = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert written == [{"item_id": "a", "score": 1.0, "tags": ["x"], "note": None}, {"item_id": "b", "score": 0.5, "tags": [], "note": "n"}]
    assert [list(row) for row in written] == [SCHEMA.names] * 2
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == written


def test_the_dataset_card_lets_datasets_load_every_table_by_name(tmp_path):
    import datasets

    empty = pa.schema([("item_id", pa.string())])
    tables: dict[str, tuple[list[dict[str, Any]], pa.Schema]] = {
        "first": ([{"item_id": "a", "score": 2}], SCHEMA),
        "second": ([{"prompt": "p", "completion": "c"}], pa.schema([("prompt", pa.string()), ("completion", pa.string())])),
        "empty": ([], empty),
    }
    write_tables(tmp_path, tables, [Record("a", True, {"anything": [1, "mixed"]}, [])])
    card = export.write_dataset_card(tmp_path, "job-1", "self_instruct", {n: (s, len(r)) for n, (r, s) in tables.items()}, partial=False)
    assert card.read_text().startswith("---\nconfigs:\n- config_name: first\n  data_files: first.parquet\n  default: true\n")
    for name in ("first", "second"):
        rows, schema = tables[name]
        loaded = datasets.load_dataset(str(tmp_path), name=name, split="train", cache_dir=str(tmp_path / "cache"))
        assert loaded.to_list() == conformed(rows, schema)
    # `datasets` cannot load a file without rows: an empty table is described but is no config.
    assert "config_name: empty" not in card.read_text() and "## empty\n\n0 rows. Empty" in card.read_text()
    # Without a name: the default table, not a mix of every file in the folder.
    assert datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "cache")).column_names == SCHEMA.names


def test_manifest_numbers_are_json_numbers():
    stage = coordinator_pb2.StageProgress(stage="dataset", done=12, kept=3, total=20, dropped_by_filter={"error": 2})
    assert export.message_json(stage) == {"stage": "dataset", "done": 12, "kept": 3, "total": 20, "droppedByFilter": {"error": 2}}
    assert export.message_json(coordinator_pb2.ExportedFile(name="p", kind="k", rows=7))["rows"] == 7
    job = coordinator_pb2.Job(id="j", stages=[stage])
    assert export.message_json(job)["stages"][0]["done"] == 12
    # A table with no rows says 0, not nothing (proto3's JSON leaves zeros out).
    assert export.message_json(coordinator_pb2.ExportedFile(name="p", kind="k"), zeros=True)["rows"] == 0
    assert export.message_json(coordinator_pb2.StageProgress(stage="s"), zeros=True)["kept"] == 0


def test_a_failed_write_leaves_no_temporary_file_and_leftovers_are_removed(tmp_path):
    (tmp_path / "t.parquet").mkdir()  # cannot be replaced by a file
    with pytest.raises(OSError):
        write_tables(tmp_path, {"t": ([{"item_id": "a"}], SCHEMA)}, [])
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "old.jsonl.tmp").write_text("killed mid-write")
    export.remove_temporary_files(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


# --- write_dataset: records streamed from the store a chunk at a time ---

JOB = "job"
VALUES = pa.schema((("item_id", pa.string()), ("value", pa.int64())))


class ValuesRecipe(Recipe[None]):
    """A DOUBLE recipe: what write_dataset reads of one (stages, belongs, tables, rows)."""

    name = "self_consistency"
    stages = ("work", "dataset")
    services = ()
    tables: ClassVar[dict[str, pa.Schema]] = {"values": VALUES}

    def resolve(self, spec: Any, job_id: str) -> None:
        return None

    async def run(self, ctx: JobContext, params: None) -> dict[str, Any]:
        raise NotImplementedError("export never runs a recipe")

    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        return lambda item_id: True

    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        return {"values": [{"item_id": r.item_id, "value": r.data["value"]} for r in records if r.kept]}


RECIPE = ValuesRecipe()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")

    async def fill() -> None:
        await store.create_job(JOB, b"", "hash", coordinator_pb2.JOB_STATE_SUCCEEDED)
        for number in range(10):
            item, kept = f"i{number:02d}", number != 4
            decision = Decision(kept, "" if kept else ERROR_FILTER, reason="" if kept else "refused", model="m.gguf")
            value = StageResult({"value": number}, decision).to_json()
            await store.put_result(JOB, item, "dataset", value, kept=kept, filter_=decision.filter)

    asyncio.run(fill())
    yield store
    asyncio.run(store.close())


def _job() -> coordinator_pb2.Job:
    spec = coordinator_pb2.JobSpec(self_consistency=coordinator_pb2.SelfConsistencySpec())
    return coordinator_pb2.Job(id=JOB, spec=spec, state=coordinator_pb2.JOB_STATE_CANCELLED)


async def test_chunks_become_row_groups_and_the_files_read_as_one_export(store, tmp_path, monkeypatch):
    whole = await export.write_dataset(store, JOB, _job(), RECIPE, tmp_path / "whole")
    monkeypatch.setattr(export, "RECORDS_PER_CHUNK", 4)
    chunked = await export.write_dataset(store, JOB, _job(), RECIPE, tmp_path / "chunked")
    assert [(f.kind, f.rows) for f in chunked] == [(f.kind, f.rows) for f in whole]
    assert {f.kind: f.rows for f in chunked}["values_parquet"] == 9 and {f.kind: f.rows for f in chunked}["lineage_jsonl"] == 10
    assert pq.ParquetFile(tmp_path / "chunked" / "values.parquet").num_row_groups == 3  # 10 records, 4 a chunk
    for name in ("values.jsonl", "lineage.jsonl", "README.md"):
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp_path / "chunked" / "values.jsonl").read_text().splitlines()]
    assert pq.read_table(tmp_path / "chunked" / "values.parquet").to_pylist() == rows
    manifest = json.loads((tmp_path / "chunked" / "manifest.json").read_text())
    # A cancelled job stored no error report: it is counted from the lineage, over every chunk.
    assert manifest["errors"] == {"count": 1, "items": 10, "messages": ["refused"], "fraction": 0.1, "max_error_fraction": 0.1}
    assert manifest["partial"] is True and manifest["models"] == ["m.gguf"]


async def test_an_export_that_fails_midway_leaves_the_previous_files_and_no_temporary_ones(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    await export.write_dataset(store, JOB, _job(), RECIPE, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    chunks = 0

    class FailingRecipe(ValuesRecipe):
        """The DOUBLE recipe, whose disk fills at the second chunk."""

        def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
            nonlocal chunks
            chunks += 1
            if chunks == 2:
                raise OSError("disk full")
            return super().rows(records)

    monkeypatch.setattr(export, "RECORDS_PER_CHUNK", 4)
    with pytest.raises(OSError, match="disk full"):
        await export.write_dataset(store, JOB, _job(), FailingRecipe(), out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
