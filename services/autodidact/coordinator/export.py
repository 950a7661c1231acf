"""Writes a job's dataset: JSONL and Parquet tables, the lineage of every
candidate, a manifest, a dataset card and a report (report.py). Files are written to a temporary
name and renamed, so a reader never sees half a file, and a failed write
leaves no temporary file behind.

Records stream from the store a chunk at a time (one Parquet row group per
chunk), so an export holds one chunk, not the job; the writing runs off the
event loop."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import structlog
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from autodidact.coordinator.inputs import file_sha256
from autodidact.coordinator.protos import CANCELLED, max_error_fraction, state_name
from autodidact.coordinator.recipes.base import ERROR_FILTER, MAX_ERROR_MESSAGES
from autodidact.coordinator.records import ERRORS_KEY, SUMMARY_KEY, Record, dataset_members, iter_records
from autodidact.coordinator.report import ReportBuilder
from autodidact.coordinator.store import JobStore
from autodidact.errors import Unavailable
from autodidact.v1 import coordinator_pb2

log = structlog.get_logger("autodidact.export")

if TYPE_CHECKING:  # the registry imports every recipe
    # Message.DESCRIPTOR is either descriptor.Descriptor or, under the default upb backend, this one (same fields).
    from google._upb._message import Descriptor as UpbDescriptor

    from autodidact.coordinator.recipes.recipe import Recipe

TMP_SUFFIX = ".tmp"
# json.dumps(row, ensure_ascii=False) without building an encoder per row (an export writes millions).
_JSON = json.JSONEncoder(ensure_ascii=False)
# Records per chunk: what an export holds at once, and one Parquet row group of each table.
RECORDS_PER_CHUNK = 8192
# proto3's JSON mapping writes these as strings; the manifest wants numbers.
_INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
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


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.writelines(_JSON.encode(row) + "\n" for row in rows)


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


def _numbers(message_type: descriptor.Descriptor | UpbDescriptor, value: dict[str, Any]) -> dict[str, Any]:
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
            value[field.json_name] = (
                [_numbers(field.message_type, v) for v in entry] if isinstance(entry, list) else _numbers(field.message_type, entry)
            )
    return value


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / "manifest.json"
    _replace_atomically(
        path, lambda tmp: tmp.write_text(json.dumps({**manifest, "exported_at": time.time()}, indent=2, sort_keys=True) + "\n")
    )
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
    lines += [
        "Each table is in `TABLE.parquet` and `TABLE.jsonl` (same rows, same columns); `lineage.jsonl` says why",
        "every candidate was kept or dropped, and `manifest.json` holds the spec, models and stage counts.",
        "",
    ]
    for name, (schema, rows) in tables.items():
        lines += [f"## {name}", "", f"{rows:,} rows." + ("" if rows else " Empty, so not a config: `datasets` cannot load it."), ""]
        lines += ["| column | type |", "| --- | --- |"]
        lines += [f"| {column.name} | {column.type} |" for column in schema]
        lines.append("")
    path = directory / "README.md"
    _replace_atomically(path, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    return path


class DatasetWriter:
    """The tables and lineage.jsonl of one export, written a chunk of records
    at a time to temporary files; `commit` renames every file into place,
    `abort` removes them. Also tallies what the manifest reports of the records, and hands
    each chunk's lineage rows to `on_lineage` (the report), so they are made once."""

    def __init__(
        self,
        directory: Path,
        schemas: dict[str, pa.Schema],
        tables: Callable[[list[Record]], dict[str, Any]],
        on_lineage: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.schemas = schemas
        self._tables = tables  # records -> {table name: (rows, schema)}
        self._on_lineage = on_lineage
        self.rows = dict.fromkeys(schemas, 0)
        self.records = 0
        self.models: set[str] = set()
        self.template_versions: set[str] = set()
        self.error_count = 0
        self.error_messages: list[str] = []
        self._renames: list[tuple[Path, Path]] = []
        self._parquet: dict[str, pq.ParquetWriter] = {}  # open until commit or abort
        try:
            self._jsonl = {name: self._temporary(directory / f"{name}.jsonl") for name in schemas}
            self._lineage = self._temporary(directory / "lineage.jsonl")
            for tmp in [*self._jsonl.values(), self._lineage]:
                tmp.write_text("", encoding="utf-8")
            for name, schema in schemas.items():
                self._parquet[name] = pq.ParquetWriter(self._temporary(directory / f"{name}.parquet"), schema)
        except BaseException:
            self.abort()
            raise

    def _temporary(self, path: Path) -> Path:
        tmp = path.with_name(path.name + TMP_SUFFIX)
        self._renames.append((tmp, path))
        return tmp

    def add(self, records: list[Record]) -> None:
        """Appends a chunk: each table's rows as one row group, conformed to its schema, and every record's lineage."""
        for name, (rows, _) in self._tables(records).items():
            if rows:
                # Conformed to the schema (every column, in order and type) through one Arrow
                # table, so the JSONL and Parquet files read the same.
                table = pa.Table.from_pylist(rows, schema=self.schemas[name])
                self._parquet[name].write_table(table)
                _append_jsonl(self._jsonl[name], table.to_pylist())
                self.rows[name] += table.num_rows
        lineage = lineage_rows(records)
        _append_jsonl(self._lineage, lineage)
        if self._on_lineage is not None:
            self._on_lineage(lineage)
        self.records += len(records)
        for record in records:
            for _, decision in record.lineage:
                if decision.model:
                    self.models.add(decision.model)
                if decision.template_version:
                    self.template_versions.add(decision.template_version)
                if decision.filter == ERROR_FILTER:
                    self.error_count += 1
                    if len(self.error_messages) < MAX_ERROR_MESSAGES:
                        self.error_messages.append(decision.reason)

    def commit(self) -> None:
        try:
            for name, writer in self._parquet.items():
                if not self.rows[name]:  # a table without rows, as pq.write_table writes one
                    writer.write_table(self.schemas[name].empty_table())
                writer.close()
            for tmp, path in self._renames:
                os.replace(tmp, path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Closes and removes every temporary file (after a commit, none is left)."""
        try:
            for writer in self._parquet.values():
                if writer.is_open:
                    writer.close()
        finally:
            for tmp, _ in self._renames:
                tmp.unlink(missing_ok=True)


async def _chunks(records: AsyncIterator[Record], size: int) -> AsyncIterator[list[Record]]:
    chunk: list[Record] = []
    async for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_report(directory: Path, report: ReportBuilder) -> Path:
    path = directory / "report.html"
    text = report.html()
    _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _prepare(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(directory)


def _file(path: Path, kind: str, rows: int = 0) -> coordinator_pb2.ExportedFile:
    """The file as ExportJob lists it: its name (what DownloadExport takes), size and sha256, never a server path."""
    size, sha256 = file_sha256(path)
    return coordinator_pb2.ExportedFile(name=path.name, kind=kind, rows=rows, size_bytes=size, sha256=sha256)


def written_export(directory: Path) -> list[coordinator_pb2.ExportedFile] | None:
    """The files of the export already in `directory`, as its manifest lists them (and the
    manifest itself), or None when there is none whole. A succeeded job's dataset never
    changes, so ExportJob lists this one instead of writing it again: a download between two
    exports then cannot meet a manifest rewritten under it."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = [json_format.ParseDict(entry, coordinator_pb2.ExportedFile(), ignore_unknown_fields=True) for entry in manifest["files"]]
        if not all((directory / file.name).stat().st_size == file.size_bytes for file in files):
            return None
    except (OSError, ValueError, KeyError, TypeError, json_format.ParseError):
        return None
    return [*files, _file(directory / "manifest.json", "manifest")]


async def write_dataset(
    store: JobStore, key: str, job: coordinator_pb2.Job, recipe: Recipe[Any], directory: Path
) -> list[coordinator_pb2.ExportedFile]:
    """Writes the job's dataset into `directory`: each table's JSONL and
    Parquet, lineage.jsonl, the dataset card, report.html and the manifest
    (which lists the others). `key` is the job's key in the store; `job` is the
    job as GetJob reports it: its state and stage counts go into the manifest
    and the report's funnel. A cancelled job's tables hold what it finished."""
    partial = job.state == CANCELLED
    await asyncio.to_thread(_prepare, directory)
    belongs = await dataset_members(store, key, recipe)
    schemas = recipe.tables
    # Fed the lineage rows the writer makes from each chunk: the store is read once for both.
    report = ReportBuilder.for_job(job, recipe)
    writer = await asyncio.to_thread(DatasetWriter, directory, schemas, recipe.dataset_tables, report.add)
    try:
        records = iter_records(store, key, recipe.stages, recipe.final_stages, belongs)
        async for chunk in _chunks(records, RECORDS_PER_CHUNK):
            await asyncio.to_thread(writer.add, chunk)
        await asyncio.to_thread(writer.commit)
    except BaseException:
        await asyncio.to_thread(writer.abort)
        raise
    files = []
    for name, rows in writer.rows.items():
        files.append(await asyncio.to_thread(_file, directory / f"{name}.jsonl", f"{name}_jsonl", rows))
        files.append(await asyncio.to_thread(_file, directory / f"{name}.parquet", f"{name}_parquet", rows))
    files.append(await asyncio.to_thread(_file, directory / "lineage.jsonl", "lineage_jsonl", writer.records))
    recipe_name = job.spec.WhichOneof("recipe") or ""
    tables = {name: (schema, writer.rows[name]) for name, schema in schemas.items()}
    card = await asyncio.to_thread(write_dataset_card, directory, job.id, recipe_name, tables, partial)
    files.append(await asyncio.to_thread(_file, card, "dataset_card"))
    report_path = await asyncio.to_thread(write_report, directory, report)
    files.append(await asyncio.to_thread(_file, report_path, "report_html"))
    errors = await store.get_value(key, ERRORS_KEY)
    if errors is None:  # a cancelled job wrote no error report: count what its lineage shows
        errors = {"count": writer.error_count, "items": writer.records, "messages": writer.error_messages}
    manifest = {
        "job_id": job.id,
        "recipe": recipe_name,
        "state": state_name(job.state),
        "partial": partial,
        "spec": message_json(job.spec),
        "models": sorted(writer.models),
        "template_versions": sorted(writer.template_versions),
        "summary": await store.get_value(key, SUMMARY_KEY) or {},
        "errors": {
            **errors,
            "fraction": errors["count"] / errors["items"] if errors["items"] else 0.0,
            "max_error_fraction": max_error_fraction(job.spec),
        },
        "stages": [message_json(stage, zeros=True) for stage in job.stages],
        "files": [message_json(f, zeros=True) for f in files],
    }
    manifest_path = await asyncio.to_thread(write_manifest, directory, manifest)
    files.append(await asyncio.to_thread(_file, manifest_path, "manifest"))
    return files


# Publishes a job's exported files somewhere callers fetch them without the coordinator:
# (tenant, job id, the local dataset folder, its files) -> sets each file's url.
Publisher = Callable[[str, str, Path, list[coordinator_pb2.ExportedFile]], Awaitable[None]]


class ObjectStorePublisher:
    """Copies each export to `<prefix>/<tenant>/<job_id>/<name>` in an object store
    (fsspec: s3://, gs://, az://, with the cloud's standard credential chain) and
    gives each file a presigned URL valid for `ttl_seconds`. The local copy stays
    (DownloadExport serves it); the object store is what callers outside fetch."""

    def __init__(self, prefix: str, ttl_seconds: float = 3600.0) -> None:
        import fsspec  # the objectstore extra

        self.prefix = prefix.rstrip("/")
        self.ttl_seconds = ttl_seconds
        self._fs, _ = fsspec.core.url_to_fs(self.prefix)

    async def __call__(self, tenant: str, job_id: str, directory: Path, files: list[coordinator_pb2.ExportedFile]) -> None:
        try:
            await asyncio.to_thread(self._put, tenant, job_id, directory, files)
        except OSError as exc:  # s3fs says what the store answered: no bucket, access denied, unreachable
            raise Unavailable(f"the export could not be put under {self.prefix}: {exc.strerror or exc}") from None
        except Exception as exc:  # e.g. a credential that cannot sign URLs (GCS and Azure workload identities need signing rights)
            log.warning("export not published", prefix=self.prefix, error=f"{type(exc).__name__}: {exc}")
            raise Unavailable(f"the export could not be published under {self.prefix} (see the coordinator's log)") from None

    def _put(self, tenant: str, job_id: str, directory: Path, files: list[coordinator_pb2.ExportedFile]) -> None:
        expires = time.time() + self.ttl_seconds
        for file in files:
            remote = f"{self.prefix}/{tenant}/{job_id}/{file.name}"
            self._fs.put_file(str(directory / file.name), remote)
            file.url = self._fs.sign(remote, expiration=int(self.ttl_seconds))
            file.url_expires_at.FromNanoseconds(int(expires * 1e9))
