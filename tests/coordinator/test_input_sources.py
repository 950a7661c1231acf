"""Where a job's inputs may come from, and the hostile corpus: every path,
URI and name an attacker tried (the issue's, and more) is refused, no
refusal quotes a byte of a file, and nothing is written outside the job's
own storage.

The job manager runs on the real store with a double generator (labelled:
no model runs here); the recipes' own input parsing is real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from autodidact.coordinator.inputs import InputSource, locate, snapshot
from autodidact.coordinator.jobs import JobManager
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import SqliteJobStore
from autodidact.coordinator.tenants import Quotas, TenantPolicy, Tenants
from autodidact.errors import AutodidactError, InvalidArgument, NotFound, ResourceExhausted
from autodidact.runtime.principal import SUBMITTER, Principal, acting_as
from autodidact.v1 import coordinator_pb2

PROMPTS = "".join(json.dumps({"prompt": f"Tell me about bread number {i}."}) + "\n" for i in range(3))
SECRET = "root:x:0:0:SECRET-CONTENT-7f3a"


class Unreachable:
    """A double of the generator: submissions go through without its model's limits."""

    async def GetModelInfo(self, request: object, timeout: float) -> object:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "unreachable")


@pytest.fixture
def world(tmp_path):
    """A coordinator data dir, an allowed input root with a good file, and secrets outside it."""
    data = tmp_path / "data"
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "prompts.jsonl").write_text(PROMPTS)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(SECRET + "\n")
    (root / "link-out.jsonl").symlink_to(outside / "passwd")  # a planted link inside the root
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo.jsonl")
    return data, root, outside


def manager_for(data: Path, roots: tuple[str, ...] = (), quotas: Quotas | None = None) -> tuple[JobManager, SqliteJobStore]:
    store = SqliteJobStore(data / "jobs.sqlite")
    tenants = Tenants(defaults=TenantPolicy(quotas or Quotas()), shared_roots=roots)
    services = Services(Unreachable(), None, None, None, None)  # type: ignore[arg-type]
    return JobManager(store, services, TenantStorage(data), tenants), store


def constitutional(reference: str, inline: dict[str, str] | None = None) -> coordinator_pb2.JobSpec:
    return coordinator_pb2.JobSpec(constitutional=coordinator_pb2.ConstitutionalSpec(prompts_path=reference), inline_inputs=inline or {})


def outside_storage(tree: Path, data: Path) -> dict[str, bytes | None]:
    """Every file under `tree` but outside the coordinator's `data`, with its bytes (None for links and non-files)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(tree.rglob("*")):
        if not path.is_relative_to(data):
            found[str(path)] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


HOSTILE = [
    "/etc/passwd",
    "/proc/self/environ",
    "/etc/shadow",
    "/dev/zero",
    "/dev/stdin",
    "relative/prompts.jsonl",
    "prompts.jsonl",
    "../allowed/prompts.jsonl",
    "~/.ssh/id_rsa",
    "",
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "s3://someone-elses-bucket/data.jsonl",
    "gs://bucket/x",
    "az://container/blob",
    "http://169.254.169.254/latest/meta-data/",
    "dataset:../../jobs.sqlite",
    "dataset:ds-0123",
    "inline:missing",
    "inline:../x",
    "/" + "a" * 5000,
]


@pytest.mark.parametrize("reference", HOSTILE)
def test_with_no_roots_no_server_path_or_uri_is_read(world, reference):
    data, root, _ = world
    manager, store = manager_for(data)
    before = outside_storage(root.parent, data)

    async def attempt() -> str:
        with pytest.raises(AutodidactError) as refused:
            await manager.submit("job-1", constitutional(reference))
        await manager.close()
        return str(refused.value)

    message = asyncio.run(attempt())
    asyncio.run(store.close())
    assert SECRET not in message and "SECRET" not in message
    assert "Traceback" not in message
    assert outside_storage(root.parent, data) == before, "something was written outside the coordinator's storage"
    assert not list((data / "tenants").glob("*/jobs/*")), "a refused job left a folder"


def _refusal(manager: JobManager, store: SqliteJobStore, spec: coordinator_pb2.JobSpec) -> str:
    async def attempt() -> str:
        with pytest.raises(AutodidactError) as refused:
            await manager.submit("job-1", spec)
        await manager.close()
        return str(refused.value)

    try:
        return asyncio.run(attempt())
    finally:
        asyncio.run(store.close())


@pytest.mark.parametrize(
    "name",
    [
        "link-out.jsonl",  # a symlink inside the root pointing outside it
        "fifo.jsonl",  # a FIFO: opening it must neither hang nor read
        "sub",  # a folder
        "missing.jsonl",
        "../outside/passwd",  # climbs out of the root
        "sub/../../outside/passwd",
    ],
)
def test_under_a_root_only_regular_files_inside_it_are_read_with_one_answer_for_every_refusal(world, name):
    data, root, outside = world
    manager, store = manager_for(data, roots=(str(root),))
    message = _refusal(manager, store, constitutional(f"{root}/{name}"))
    assert message.endswith("is not a readable file under an input root this tenant may use")
    assert SECRET not in message and str(outside) not in message


def test_the_coordinators_own_store_is_not_an_input_even_when_its_folder_is_a_root(world):
    data, root, _ = world
    manager, store = manager_for(data, roots=(str(root),))
    asyncio.run(store.close())
    # The data dir is not under the allowed root: its job store is refused like any outside file.
    manager, store = manager_for(data, roots=(str(root),))
    message = _refusal(manager, store, constitutional(str(data / "jobs.sqlite")))
    assert "is not a readable file under an input root" in message


def test_object_store_uris_must_stay_under_an_allowed_prefix():
    roots = ("s3://team-a-data/inputs/",)
    for uri in (
        "s3://team-a-data/inputs/../secrets/x.jsonl",
        "s3://team-a-data/inputs//x.jsonl",
        "s3://team-a-data/other/x.jsonl",
        "s3://team-a-data/inputs-evil/x.jsonl",
        "s3://team-a-data/inputs/x.jsonl?versionId=1",
        "gs://team-a-data/inputs/x.jsonl",
    ):
        with pytest.raises(InvalidArgument, match="is not a readable file under an input root"):
            locate("spec.x", uri, {}, roots, lambda field, dataset_id: Path("/nowhere"))
    assert locate("spec.x", "s3://team-a-data/inputs/x.jsonl", {}, roots, lambda f, d: Path()).uri == "s3://team-a-data/inputs/x.jsonl"


def test_an_allowed_file_is_snapshotted_and_the_job_reads_the_snapshot_not_the_source(world):
    data, root, _ = world
    manager, store = manager_for(data, roots=(str(root),))
    source = root / "prompts.jsonl"

    async def submit() -> coordinator_pb2.Job:
        job, created, _ = await manager.submit("job-1", constitutional(str(source)))
        assert created
        await manager.close()
        return job

    job = asyncio.run(submit())
    asyncio.run(store.close())
    snapshot_file = TenantStorage(data).inputs_dir("default", "job-1") / "prompts_path"
    assert snapshot_file.read_bytes() == source.read_bytes()
    assert [(i.field, i.reference, i.size_bytes, i.sha256) for i in job.inputs] == [
        ("spec.constitutional.prompts_path", str(source), len(PROMPTS), hashlib.sha256(PROMPTS.encode()).hexdigest())
    ]
    source.write_text("edited after submit\n")
    assert snapshot_file.read_text() == PROMPTS  # the job's copy is its own


def test_the_same_spec_over_edited_input_content_is_another_job(world):
    data, root, _ = world
    manager, store = manager_for(data, roots=(str(root),))
    source = root / "prompts.jsonl"

    async def run() -> str:
        await manager.submit("job-1", constitutional(str(source)))
        _, created, _ = await manager.submit("job-1", constitutional(str(source)))
        assert not created  # the same content: the same job
        source.write_text(PROMPTS.replace("bread", "cake"))
        with pytest.raises(AutodidactError) as refused:
            await manager.submit("job-1", constitutional(str(source)))
        await manager.close()
        return str(refused.value)

    message = asyncio.run(run())
    asyncio.run(store.close())
    assert "exists with the same spec over inputs of other content" in message


def test_inline_inputs_are_snapshotted_and_not_kept_in_the_spec(world):
    data, _, _ = world
    manager, store = manager_for(data)

    async def run() -> coordinator_pb2.Job:
        job, _, _ = await manager.submit("inline-1", constitutional("inline:prompts", {"prompts": PROMPTS}))
        await manager.close()
        return job

    job = asyncio.run(run())
    asyncio.run(store.close())
    assert not job.spec.inline_inputs and job.inputs[0].reference == "inline:prompts"
    assert (TenantStorage(data).inputs_dir("default", "inline-1") / "prompts_path").read_text() == PROMPTS


@pytest.mark.parametrize(
    ("inline", "message"),
    [
        ({"../x": PROMPTS}, "spec.inline_inputs['../x']: names are 1 to 64 characters"),
        ({"big": "x" * (4 * 2**20 + 1)}, "spec.inline_inputs: hold 4,194,305 bytes; at most 4,194,304"),
    ],
)
def test_inline_inputs_are_bounded_and_named_safely(world, inline, message):
    data, _, _ = world
    manager, store = manager_for(data)
    assert message in _refusal(manager, store, constitutional("inline:big", inline))


def test_an_input_over_the_upload_bound_is_refused_with_the_quota(world):
    data, root, _ = world
    manager, store = manager_for(data, roots=(str(root),), quotas=Quotas(upload_bytes=10))
    message = _refusal(manager, store, constitutional(str(root / "prompts.jsonl")))
    assert "quota upload_bytes of tenant 'default' is 10 bytes" in message


def test_snapshot_refuses_a_link_swapped_in_after_the_check(world, tmp_path):
    _, root, outside = world
    checked = root / "prompts.jsonl"
    source = InputSource(path=checked)
    checked.unlink()
    checked.symlink_to(outside / "passwd")  # swapped between the check and the open
    with pytest.raises(InvalidArgument) as refused:
        snapshot("spec.x", str(checked), source, tmp_path / "snap", Quotas(), "default")
    assert SECRET not in str(refused.value) and not (tmp_path / "snap").exists()


def test_another_tenants_dataset_is_not_found(world):
    data, _, _ = world
    storage = TenantStorage(data)
    folder = storage.tenant_dir("team-a") / "datasets"
    folder.mkdir(parents=True)
    dataset_id = "ds-" + "a" * 32
    (folder / f"{dataset_id}.data").write_text(PROMPTS)
    (folder / f"{dataset_id}.json").write_text("{}")
    manager, store = manager_for(data)

    async def attempt() -> None:
        with acting_as(Principal("team-b", "bot", frozenset({SUBMITTER}))), pytest.raises(NotFound, match="does not exist"):
            await manager.submit("job-1", constitutional(f"dataset:{dataset_id}"))
        await manager.close()

    asyncio.run(attempt())
    asyncio.run(store.close())


@pytest.mark.parametrize("tenant", ["..", "a/b", ".hidden", "", "x" * 200])
def test_tenant_names_cannot_name_folders_outside_the_storage(tmp_path, tenant):
    with pytest.raises(InvalidArgument):
        TenantStorage(tmp_path).tenant_dir(tenant)


@pytest.mark.parametrize("job_id", ["..", "../x", ".", "a/b"])
def test_job_ids_cannot_name_folders_outside_the_tenant(tmp_path, job_id):
    with pytest.raises(InvalidArgument):
        TenantStorage(tmp_path).job_dir("default", job_id)


def test_a_caller_sending_the_retired_output_dir_field_cannot_choose_where_exports_go(world):
    """Field 12 (output_dir) is reserved: an old client's bytes arrive as an unknown field and are ignored."""
    data, _, _ = world
    spec = constitutional("inline:p", {"p": PROMPTS})
    raw = spec.SerializeToString() + b"\x62" + bytes([len(b"/etc")]) + b"/etc"  # field 12, length-delimited
    parsed = coordinator_pb2.JobSpec.FromString(raw)
    manager, store = manager_for(data)

    async def run() -> None:
        await manager.submit("old-client", parsed)
        await manager.close()

    asyncio.run(run())
    asyncio.run(store.close())
    assert TenantStorage(data).inputs_dir("default", "old-client").is_dir()


@pytest.mark.parametrize("name", ["../inputs/prompts_path", "/etc/passwd", "..", ".", "a/b", "", "manifest.json\n"])
def test_download_names_cannot_leave_the_jobs_export_folder(world, name):
    data, _, _ = world
    manager, store = manager_for(data)

    async def attempt() -> None:
        await manager.submit("dl", constitutional("inline:p", {"p": PROMPTS}))
        with pytest.raises((InvalidArgument, NotFound)) as refused:
            async for _ in manager.download("dl", name):
                pass
        assert PROMPTS[:20] not in str(refused.value)
        await manager.close()

    asyncio.run(attempt())
    asyncio.run(store.close())


def test_a_link_planted_in_the_export_folder_is_not_followed(world):
    data, _, outside = world
    manager, store = manager_for(data)
    folder = TenantStorage(data).dataset_dir("default", "dl")
    folder.mkdir(parents=True)
    (folder / "manifest.json").symlink_to(outside / "passwd")

    async def attempt() -> None:
        await manager.submit("dl", constitutional("inline:p", {"p": PROMPTS}))
        with pytest.raises(NotFound):
            async for _ in manager.download("dl", "manifest.json"):
                pass
        await manager.close()

    asyncio.run(attempt())
    asyncio.run(store.close())


def test_upload_bounds_and_hash_are_checked(tmp_path):
    storage = TenantStorage(tmp_path)
    body = PROMPTS.encode()

    def header(**changes: object) -> coordinator_pb2.UploadDatasetHeader:
        fields = {
            "name": "p.jsonl",
            "format": coordinator_pb2.DATASET_FORMAT_JSONL,
            "sha256": hashlib.sha256(body).hexdigest(),
            "size_bytes": len(body),
        }
        return coordinator_pb2.UploadDatasetHeader(**(fields | changes))  # type: ignore[arg-type]

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7):
            yield data[start : start + 7]

    async def run() -> None:
        info, created = await storage.upload("default", header(), chunks(body), Quotas())
        assert created and info.dataset_id == "ds-" + hashlib.sha256(body).hexdigest()[:32]
        again, created = await storage.upload("default", header(name="other"), chunks(body), Quotas())
        assert not created and again == info
        with pytest.raises(InvalidArgument, match=r"header\.sha256: does not match"):
            await storage.upload("default", header(sha256="0" * 64), chunks(body), Quotas())
        with pytest.raises(InvalidArgument, match=r"declares 1 bytes|more than the 1 bytes"):
            await storage.upload("default", header(size_bytes=1), chunks(body), Quotas())
        with pytest.raises(ResourceExhausted, match="quota upload_bytes of tenant 'default' is 10 bytes"):
            await storage.upload("default", header(), chunks(body), Quotas(upload_bytes=10))
        with pytest.raises(ResourceExhausted, match="quota stored_bytes of tenant 'default'"):
            await storage.upload("default", header(sha256="1" * 64), chunks(body), Quotas(stored_bytes=len(body) + 5))
        with pytest.raises(InvalidArgument, match=r"header\.name: must not hold control characters"):
            await storage.upload("default", header(name="a\nb"), chunks(body), Quotas())

    asyncio.run(run())
    leftovers = [p.name for p in (tmp_path / "tenants" / "default" / "datasets").iterdir()]
    assert sorted(leftovers) == sorted(
        [f"ds-{hashlib.sha256(body).hexdigest()[:32]}.data", f"ds-{hashlib.sha256(body).hexdigest()[:32]}.json"]
    )


def test_a_root_that_covers_the_coordinators_data_reads_none_of_it(tmp_path):
    """An operator allows a folder that holds the coordinator's own data dir: other tenants'
    uploads and snapshots, and the job store, are still never inputs."""
    data = tmp_path / "data"
    storage = TenantStorage(data)
    other = storage.tenant_dir("team-a") / "datasets"
    other.mkdir(parents=True)
    (other / ("ds-" + "a" * 32 + ".data")).write_text(PROMPTS)
    (tmp_path / "mine.jsonl").write_text(PROMPTS)
    for reference in (str(other / ("ds-" + "a" * 32 + ".data")), str(data / "jobs.sqlite")):
        manager, store = manager_for(data, roots=(str(tmp_path),))
        assert "is not a readable file under an input root" in _refusal(manager, store, constitutional(reference))
    manager, store = manager_for(data, roots=(str(tmp_path),))

    async def allowed() -> None:
        _, created, _ = await manager.submit("mine", constitutional(str(tmp_path / "mine.jsonl")))
        assert created
        await manager.close()

    asyncio.run(allowed())
    asyncio.run(store.close())


def test_a_folder_swapped_for_a_link_after_the_check_is_caught_on_the_opened_file(world, tmp_path):
    _, root, outside = world
    (root / "inner").mkdir()
    (root / "inner" / "passwd").write_text(PROMPTS)
    source = locate("spec.x", str(root / "inner" / "passwd"), {}, (str(root),), lambda f, d: Path())
    (root / "inner").rename(root / "moved")
    (root / "inner").symlink_to(outside)  # the folder on the way now leads outside the root
    with pytest.raises(InvalidArgument) as refused:
        snapshot("spec.x", str(root / "inner" / "passwd"), source, tmp_path / "snap", Quotas(), "default")
    assert SECRET not in str(refused.value) and not (tmp_path / "snap").exists()


def test_a_snapshot_of_an_upload_is_linked_and_counted_once(tmp_path):
    storage = TenantStorage(tmp_path)
    body = PROMPTS.encode()
    header = coordinator_pb2.UploadDatasetHeader(
        name="p.jsonl", format=coordinator_pb2.DATASET_FORMAT_JSONL, sha256=hashlib.sha256(body).hexdigest(), size_bytes=len(body)
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    info, _ = asyncio.run(storage.upload("default", header, chunks(), Quotas()))
    # At its stored_bytes quota exactly: the job's snapshot of the upload takes no more room.
    manager, store = manager_for(tmp_path, quotas=Quotas(stored_bytes=len(body)))

    async def submit() -> None:
        _, created, _ = await manager.submit("job-1", constitutional(f"dataset:{info.dataset_id}"))
        assert created
        # Uploading the same content again at the quota returns the dataset it has.
        again, created = await storage.upload("default", header, chunks(), Quotas(stored_bytes=len(body)))
        assert again == info and not created
        await manager.close()

    asyncio.run(submit())
    asyncio.run(store.close())
    assert storage.stored_bytes("default") == len(body)
    assert (storage.inputs_dir("default", "job-1") / "prompts_path").stat().st_nlink == 2


def test_concurrent_submissions_cannot_pass_the_running_jobs_quota_together(tmp_path, monkeypatch):
    manager, store = manager_for(tmp_path, quotas=Quotas(running_jobs=1))

    async def runs_until_stopped(key: str) -> None:  # a job that stays RUNNING (its services would answer later)
        await asyncio.Event().wait()

    monkeypatch.setattr(manager, "_run", runs_until_stopped)

    async def race() -> list[object]:
        spec = constitutional("inline:p", {"p": PROMPTS})
        outcomes: list[object] = list(await asyncio.gather(*(manager.submit(f"job-{n}", spec) for n in range(4)), return_exceptions=True))
        await manager.close()
        return outcomes

    outcomes = asyncio.run(race())
    asyncio.run(store.close())
    assert sum(not isinstance(outcome, BaseException) for outcome in outcomes) == 1
    assert all("quota running_jobs of tenant 'default' is 1" in str(o) for o in outcomes if isinstance(o, BaseException))


def test_stored_bytes_is_checked_while_an_input_is_copied(world):
    data, root, _ = world
    manager, store = manager_for(data, roots=(str(root),), quotas=Quotas(stored_bytes=10))
    assert "quota stored_bytes of tenant 'default' is 10 bytes" in _refusal(manager, store, constitutional(str(root / "prompts.jsonl")))
    assert not list((data / "tenants" / "default" / "staging").glob("*/*")), "the refused copy was left behind"


def test_a_succeeded_jobs_export_is_listed_again_not_rewritten(tmp_path):
    from autodidact.coordinator import export

    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "t.jsonl").write_text('{"a": 1}\n')
    entry = {"name": "t.jsonl", "kind": "t_jsonl", "rows": 1, "sizeBytes": 9, "sha256": hashlib.sha256(b'{"a": 1}\n').hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"files": [entry]}))
    listed = export.written_export(folder)
    assert listed is not None and [f.name for f in listed] == ["t.jsonl", "manifest.json"] and listed[0].sha256 == entry["sha256"]
    (folder / "t.jsonl").write_text("changed and longer\n")
    assert export.written_export(folder) is None  # not whole any more: written again


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/abs.txt", "a/b.txt", ".."])
def test_the_client_writes_only_plain_file_names_the_coordinator_sends(tmp_path, name):
    from autodidact.runner import RecipeError, download

    with pytest.raises(RecipeError, match="not a plain file name"):
        asyncio.run(download(None, "job", coordinator_pb2.ExportedFile(name=name), tmp_path / "out"))
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_one_tenants_uploads_are_bounded_and_an_idle_one_is_abandoned(monkeypatch):
    from autodidact.coordinator import service
    from autodidact.errors import DeadlineExceeded

    slots = service.UploadSlots(per_tenant=2)
    with slots.slot("team-a"), slots.slot("team-a"):
        with pytest.raises(ResourceExhausted, match="tenant 'team-a' already has 2 uploads in progress"), slots.slot("team-a"):
            pass
        with slots.slot("team-b"):  # another tenant is not held up
            pass
    with slots.slot("team-a"):  # freed when they ended
        pass

    monkeypatch.setattr(service, "UPLOAD_IDLE_SECONDS", 0.05)

    async def stalls() -> AsyncIterator[coordinator_pb2.UploadDatasetRequest]:
        yield coordinator_pb2.UploadDatasetRequest(chunk=b"x")
        await asyncio.sleep(3600)  # a client that stops sending but keeps the call open
        yield coordinator_pb2.UploadDatasetRequest(chunk=b"y")

    async def read() -> None:
        messages = stalls()
        assert (await service._next_message(messages)) is not None
        with pytest.raises(DeadlineExceeded, match=r"sent nothing for 0\.05 s"):
            await service._next_message(messages)

    asyncio.run(read())
