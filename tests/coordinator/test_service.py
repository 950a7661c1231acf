"""The coordinator with the real generator and dedup services, in process over gRPC."""

from __future__ import annotations

import json

import grpc
import pyarrow.parquet as pq
import pytest
import pytest_asyncio

from autodidact.coordinator.storage import TenantStorage
from autodidact.runtime.channels import create_channel
from autodidact.runtime.principal import DEFAULT_TENANT
from autodidact.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import SEED_TASKS, details_of
from tests.lineage import read_jsonl
from tests.stack import download_export, start_stack, upload_file

pytestmark = pytest.mark.asyncio(loop_scope="module")


def small_spec(target: int = 2, seed: int = 3, seeds: str = str(SEED_TASKS)) -> coordinator_pb2.JobSpec:
    """A job that finishes in seconds on 2 cores. Its seed tasks are a server file under the
    stack's input root, unless `seeds` names an uploaded dataset."""
    return coordinator_pb2.JobSpec(
        self_instruct=coordinator_pb2.SelfInstructSpec(
            seed_tasks_path=seeds,
            target_instructions=target,
            max_rounds=8,
            instruction_sampling=common_pb2.SamplingParams(max_tokens=160),
            instance_sampling=common_pb2.SamplingParams(max_tokens=96),
        ),
        seed=seed,
        max_in_flight=2,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running_stack(tmp_path_factory):
    # Jobs here may read the examples' files and the tests' own (operator-allowed input roots).
    stack = await start_stack(tmp_path_factory.mktemp("stack"), input_roots=(str(SEED_TASKS.parent), str(tmp_path_factory.getbasetemp())))
    yield stack
    await stack.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coordinator(running_stack):
    async with create_channel(running_stack.target("coordinator"), timeout_seconds=300) as channel:
        yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)


async def finish(stub, job_id: str) -> tuple[coordinator_pb2.Job, list[coordinator_pb2.Job]]:
    events = [e.job async for e in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=300)]
    return events[-1], events


async def test_a_job_runs_to_a_dataset_with_progress_lineage_and_files(coordinator, tmp_path):
    # As a remote caller: the seeds are uploaded, the dataset downloaded.
    seeds = await upload_file(coordinator, SEED_TASKS)
    submitted = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-1", spec=small_spec(seeds=seeds)))
    assert [(i.field, i.reference, i.size_bytes) for i in submitted.job.inputs] == [
        ("spec.self_instruct.seed_tasks_path", seeds, SEED_TASKS.stat().st_size)
    ]
    assert submitted.created and submitted.job.state in (coordinator_pb2.JOB_STATE_PENDING, coordinator_pb2.JOB_STATE_RUNNING)
    job, events = await finish(coordinator, "si-1")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert len(events) >= 3, "watch sent no progress between start and end"
    stages = {s.stage: s for s in job.stages}
    assert stages["dataset"].kept == 2 and stages["dataset"].total == max(2, stages["dataset"].done)
    assert "seed_pool" not in stages and stages["generate_instructions"].done == stages["heuristics"].done >= 2

    records = [r.record async for r in coordinator.StreamSamples(coordinator_pb2.StreamSamplesRequest(job_id="si-1", include_dropped=True))]
    kept = [r for r in records if r.kept]
    assert len(kept) == 2
    for record in kept:
        assert [d.stage for d in record.lineage] == ["generate_instructions", "heuristics", "diversity", "classify", "instances", "dataset"]
        assert all(d.kept for d in record.lineage)
        origin = record.lineage[0]  # the sample the instruction came from
        assert origin.model.model.endswith(".gguf") and origin.template_version == "self_instruct/v1" and origin.HasField("seed")
        assert record.lineage[2].HasField("score")  # the similarity
        assert record.data["instances"]
    for record in records:
        if not record.kept:
            dropping = [d for d in record.lineage if not d.kept]
            assert len(dropping) == 1 and dropping[0].filter and dropping[0].reason
    from prometheus_client import REGISTRY

    assert (REGISTRY.get_sample_value("autodidact_stage_decisions_total", {"stage": "dataset", "outcome": "kept"}) or 0) >= 2
    only_kept = [r async for r in coordinator.StreamSamples(coordinator_pb2.StreamSamplesRequest(job_id="si-1"))]
    assert len(only_kept) == 2

    files = await download_export(coordinator, "si-1", tmp_path / "dataset")
    rows = read_jsonl(files["instances_jsonl"])
    assert rows and {"instruction", "input", "output", "is_classification", "item_id"} <= set(rows[0])
    assert pq.read_table(files["instances_parquet"]).to_pylist() == rows
    messages = read_jsonl(files["sft_messages_jsonl"])
    assert [m["role"] for m in messages[0]["messages"]] == ["user", "assistant"]
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["summary"]["kept"] == 2 and manifest["template_versions"] == ["self_instruct/v1"]
    assert any(s["stage"] == "diversity" for s in manifest["stages"]) and manifest["models"]
    # Numbers are JSON numbers, not the strings proto3's JSON mapping makes of 64-bit integers.
    dataset = next(s for s in manifest["stages"] if s["stage"] == "dataset")
    assert dataset["done"] >= 2 and dataset["kept"] == 2 and dataset["total"] == max(2, dataset["done"])
    assert all(isinstance(f["rows"], int) for f in manifest["files"] if "rows" in f)
    assert manifest["partial"] is False and manifest["errors"]["count"] == 0
    # A dataset card names every table for `datasets.load_dataset(folder, name=TABLE)`.
    card = files["dataset_card"].read_text()
    assert card.startswith("---\nconfigs:\n- config_name: instances\n  data_files: instances.parquet\n")
    assert "- config_name: sft_messages\n  data_files: sft_messages.parquet" in card
    lineage = read_jsonl(files["lineage_jsonl"])
    assert len(lineage) == len(records)


async def test_submitting_again_is_idempotent_and_another_spec_under_the_id_is_refused(coordinator, tmp_path):
    spec = small_spec(target=1, seed=5)
    first = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-2", spec=spec))
    again = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-2", spec=spec))
    assert first.created and not again.created and again.job.id == "si-2"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-2", spec=small_spec(target=2, seed=5)))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    job, _ = await finish(coordinator, "si-2")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (coordinator_pb2.JobSpec(), "spec.recipe: is required"),
        (coordinator_pb2.JobSpec(constitutional=coordinator_pb2.ConstitutionalSpec()), "spec.constitutional.prompts_path: is required"),
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path="/no/such.jsonl", target_instructions=3)
            ),
            "spec.self_instruct.seed_tasks_path: '/no/such.jsonl' is not a readable file under an input root this tenant may use",
        ),
        (
            coordinator_pb2.JobSpec(self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path=str(SEED_TASKS))),
            "spec.self_instruct.target_instructions: is required",
        ),
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(
                    seed_tasks_path=str(SEED_TASKS), target_instructions=3, similarity_threshold=2
                )
            ),
            "spec.self_instruct.similarity_threshold: must be between 0 and 1, got 2",
        ),
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path=str(SEED_TASKS), target_instructions=3), max_in_flight=1000
            ),
            "spec.max_in_flight: must be between 1 and 256",
        ),
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(seed_tasks_path=str(SEED_TASKS), target_instructions=3),
                max_error_fraction=1.5,
            ),
            "spec.max_error_fraction: must be between 0 and 1, got 1.5",
        ),
        # Known only from the generator's model (2,048 tokens of context): refused at submit, not at run time.
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(
                    seed_tasks_path=str(SEED_TASKS), target_instructions=3, instance_sampling=common_pb2.SamplingParams(max_tokens=2049)
                )
            ),
            "spec.self_instruct.instance_sampling.max_tokens: must be at most the generator's context length, 2,048 tokens, got 2,049",
        ),
        (
            coordinator_pb2.JobSpec(
                self_instruct=coordinator_pb2.SelfInstructSpec(
                    seed_tasks_path=str(SEED_TASKS), target_instructions=3, instruction_sampling=common_pb2.SamplingParams(max_tokens=32768)
                )
            ),
            "spec.self_instruct.instruction_sampling.max_tokens: must be at most the generator's context length, 2,048 tokens, got 32,768",
        ),
    ],
)
async def test_bad_specs_are_refused_at_submit(coordinator, spec, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="bad-spec", spec=spec))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details_of(raised.value)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await coordinator.GetJob(coordinator_pb2.GetJobRequest(job_id="bad-spec"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_job_ids_and_unknown_jobs(coordinator):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="has space", spec=small_spec()))
    assert "job_id: must be 1 to 128 characters" in details_of(raised.value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.ExportJob(coordinator_pb2.ExportJobRequest(job_id="nobody"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_a_job_and_keeps_what_it_stored(coordinator, tmp_path):
    await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-cancel", spec=small_spec(target=50, seed=9)))
    cancelled = await coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="si-cancel"))
    assert cancelled.job.state == coordinator_pb2.JOB_STATE_CANCELLED
    job, _ = await finish(coordinator, "si-cancel")
    assert job.state == coordinator_pb2.JOB_STATE_CANCELLED
    # A cancelled job stays exportable: what it finished, marked partial.
    files = await download_export(coordinator, "si-cancel", tmp_path)
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["partial"] is True and manifest["state"] == "CANCELLED"
    assert "cancelled" in files["dataset_card"].read_text()

    # RetryJob resumes it under its id; a running job cannot be retried.
    retried = await coordinator.RetryJob(coordinator_pb2.RetryJobRequest(job_id="si-cancel"))
    assert retried.job.state in (coordinator_pb2.JOB_STATE_PENDING, coordinator_pb2.JOB_STATE_RUNNING) and not retried.job.error
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.RetryJob(coordinator_pb2.RetryJobRequest(job_id="si-cancel"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only a FAILED or CANCELLED job" in details_of(raised.value)
    await coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="si-cancel"))


async def test_a_failed_export_leaves_no_temporary_files_and_the_job_resumes_under_its_id(coordinator, running_stack):
    # The job's own export folder in the coordinator's storage, damaged before the job writes it.
    out = TenantStorage(running_stack.options.coordinator.data_dir).dataset_dir(DEFAULT_TENANT, "si-retry")
    (out / "instances.parquet").mkdir(parents=True)  # the export cannot rename its Parquet file into place
    (out / "stale.jsonl.tmp").write_text("left by an export killed mid-write")
    spec = small_spec(target=1, seed=3)
    await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-retry", spec=spec))
    job, _ = await finish(coordinator, "si-retry")
    assert job.state == coordinator_pb2.JOB_STATE_FAILED and "instances.parquet" in job.error
    assert not list(out.glob("*.tmp")), "the failed export left temporary files"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.ExportJob(coordinator_pb2.ExportJobRequest(job_id="si-retry"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "RetryJob" in details_of(raised.value)

    (out / "instances.parquet").rmdir()  # the disk is fixed
    (out / "stale.jsonl.tmp").write_text("left by an export killed mid-write")
    # The same id and spec again resumes the failed job from what it stored.
    again = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-retry", spec=spec))
    assert again.resumed and not again.created
    job, _ = await finish(coordinator, "si-retry")
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
    assert (out / "instances.parquet").is_file() and not list(out.glob("*.tmp"))
    done = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="si-retry", spec=spec))
    assert not done.created and not done.resumed and done.job.state == coordinator_pb2.JOB_STATE_SUCCEEDED


async def test_a_prompt_that_cannot_fit_the_model_is_refused_at_submit(coordinator, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "How many?"}) + "\n" + json.dumps({"question": "Count the apples. " * 700}) + "\n")
    spec = coordinator_pb2.JobSpec(
        self_consistency=coordinator_pb2.SelfConsistencySpec(questions_path=str(questions), paths_per_question=2)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="too-long", spec=spec))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.self_consistency.questions_path (question 2): a prompt of" in details_of(raised.value)
    assert "does not fit the generator's context of 2,048 tokens" in details_of(raised.value)
    bad_pattern = coordinator_pb2.JobSpec(
        self_consistency=coordinator_pb2.SelfConsistencySpec(questions_path=str(questions), answer_pattern="(unclosed")
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="bad-pattern", spec=bad_pattern))
    assert "spec.self_consistency.answer_pattern: is not a valid regular expression" in details_of(raised.value)


async def test_jobs_can_share_a_namespace_and_its_seed_pool(coordinator, running_stack, tmp_path):
    from autodidact.v1 import dedup_pb2, dedup_pb2_grpc

    for job_id, seed in (("shared-a", 31), ("shared-b", 32)):
        spec = small_spec(target=1, seed=seed)
        spec.self_instruct.dedup_namespace = "shared-pool"
        await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=job_id, spec=spec))
        job, _ = await finish(coordinator, job_id)
        assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
    kept = {}
    for job_id in ("shared-a", "shared-b"):
        job = (await coordinator.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id))).job
        kept[job_id] = next(s.kept for s in job.stages if s.stage == "diversity")
    async with create_channel(running_stack.target("dedup")) as channel:
        info = await dedup_pb2_grpc.DedupServiceStub(channel).GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="shared-pool"))
    # The 175 seeds joined once; every instruction either job kept is there too.
    assert info.size == 175 + kept["shared-a"] + kept["shared-b"]


async def test_list_jobs_pages_newest_first(coordinator):
    first = await coordinator.ListJobs(coordinator_pb2.ListJobsRequest(page_size=1))
    assert len(first.jobs) == 1 and first.next_page_token
    rest = await coordinator.ListJobs(coordinator_pb2.ListJobsRequest(page_size=100, page_token=first.next_page_token))
    ids = [first.jobs[0].id] + [j.id for j in rest.jobs]
    assert ids[0] == "shared-b" and "si-1" in ids and "si-cancel" in ids and len(ids) == len(set(ids))
