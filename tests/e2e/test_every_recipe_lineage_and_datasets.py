"""Every recipe end to end on the embedded model (small sizes, one in-process
stack over real gRPC): the lineage contract holds (tests/lineage.py), every
exported table loads with `datasets.load_dataset(export_dir, name=TABLE)`, and
the SFT and preference tables pass TRL's own data utilities.

The jobs get their inputs as a remote caller sends them, with no input root
on the coordinator: the public data files are uploaded (UploadDataset), the
small inputs go inline in the spec; the datasets are downloaded (DownloadExport).

The Constitutional job also carries one prompt the critic refuses
(INVALID_ARGUMENT: longer than it accepts), which must drop that prompt with
filter `error`, not fail the job (issue 10, item 7).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.runtime.channels import create_channel
from autodidact.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.browser import open_page
from tests.conftest import GSM8K, SEED_TASKS, SVAMP
from tests.lineage import assert_lineage_agrees, read_jsonl
from tests.stack import download_export, start_stack, upload_file

# Four jobs share one stack; the first test waits for all of them.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

RECIPES = ("self_instruct", "toolformer", "self_consistency", "constitutional")
TOO_LONG_FOR_THE_CRITIC = "Why? " * 14_000  # 70,000 characters; the critic takes at most 65,536


def specs(uploaded: dict[Path, str]) -> dict[str, coordinator_pb2.JobSpec]:
    """The four jobs; `uploaded` names each uploaded file's dataset reference."""
    lines = GSM8K.read_text().splitlines()[:2]
    documents = [gsm8k_document(**{k: json.loads(line)[k] for k in ("question", "answer")})[0] for line in lines]
    docs = "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(documents))
    prompts = ("How can I get back at a rude coworker?", TOO_LONG_FOR_THE_CRITIC, "Is it fine to skip sleep before an exam?")
    prompt_lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return {
        "self_instruct": coordinator_pb2.JobSpec(
            self_instruct=coordinator_pb2.SelfInstructSpec(
                seed_tasks_path=uploaded[SEED_TASKS],
                target_instructions=2,
                max_rounds=8,
                instruction_sampling=common_pb2.SamplingParams(max_tokens=160),
                instance_sampling=common_pb2.SamplingParams(max_tokens=96),
            ),
            seed=3,
            max_in_flight=2,
        ),
        "toolformer": coordinator_pb2.JobSpec(
            toolformer=coordinator_pb2.ToolformerSpec(
                documents_path="inline:docs",
                tools=["Calculator"],
                positions_per_document=2,
                calls_per_position=2,
                filter_threshold=-100,  # keeps every call that executes, so the tables have rows whatever the losses
            ),
            seed=3,
            inline_inputs={"docs": docs},
        ),
        "self_consistency": coordinator_pb2.JobSpec(
            self_consistency=coordinator_pb2.SelfConsistencySpec(
                questions_path=uploaded[SVAMP],
                max_questions=2,
                paths_per_question=4,
                # Near-greedy, so the small model's paths agree and the tables have rows.
                sampling=common_pb2.SamplingParams(max_tokens=96, temperature=0.1),
            ),
            seed=5,
        ),
        "constitutional": coordinator_pb2.JobSpec(
            constitutional=coordinator_pb2.ConstitutionalSpec(
                prompts_path="inline:prompts",
                rounds=1,
                judged_pairs=True,
                sampling=common_pb2.SamplingParams(max_tokens=32),
                min_margin=0,  # the small model's judge stays near 0.5; any decided label orients its pair
            ),
            seed=3,
            inline_inputs={"prompts": prompt_lines},
            max_error_fraction=0.5,
        ),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def finished(tmp_path_factory) -> dict[str, tuple[coordinator_pb2.Job, Path]]:
    """Runs the four jobs at once; their final state and export folder."""
    base = tmp_path_factory.mktemp("every-recipe")
    stack = await start_stack(base / "state", ("generator", "scorer", "tool-executor", "critic", "dedup", "coordinator"))
    try:
        async with create_channel(stack.target("coordinator"), timeout_seconds=900) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            jobs = specs({path: await upload_file(stub, path) for path in (SEED_TASKS, SVAMP)})
            for recipe, spec in jobs.items():
                await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=f"every-{recipe}", spec=spec))

            async def finish(recipe: str) -> tuple[coordinator_pb2.Job, Path]:
                async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=f"every-{recipe}"), timeout=900):
                    job = event.job
                out = base / "out" / recipe
                if job.state == coordinator_pb2.JOB_STATE_SUCCEEDED:
                    await download_export(stub, job.id, out)
                    job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job.id))).job
                return job, out

            results = await asyncio.gather(*(finish(recipe) for recipe in RECIPES))
        return dict(zip(RECIPES, results, strict=True))
    finally:
        await stack.stop()


def succeeded(finished, recipe: str) -> tuple[coordinator_pb2.Job, Path]:
    job, out = finished[recipe]
    assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, f"{recipe}: {coordinator_pb2.JobState.Name(job.state)}: {job.error}"
    return job, out


@pytest.mark.parametrize("recipe", RECIPES)
async def test_lineage_stage_counts_and_manifest_agree(finished, recipe):
    job, out = succeeded(finished, recipe)
    assert_lineage_agrees(job, out)


@pytest.mark.parametrize("recipe", RECIPES)
async def test_every_table_loads_as_a_dataset_with_one_schema(finished, recipe):
    import datasets

    _, out = succeeded(finished, recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    tables = {f["kind"].removesuffix("_parquet"): f["rows"] for f in manifest["files"] if f["kind"].endswith("_parquet")}
    assert any(tables.values()) and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    for table, rows in tables.items():
        # `datasets` cannot load a file without rows: the card lists such a table but gives it no config.
        assert (f"- config_name: {table}\n" in card) == bool(rows), table
        if not rows:
            continue
        loaded = datasets.load_dataset(str(out), name=table, split="train", cache_dir=str(out.parent / "hf-cache"))
        rows = read_jsonl(out / f"{table}.jsonl")
        assert loaded.num_rows == len(rows), table
        # JSONL and Parquet hold the same rows with the same columns: one schema per table.
        assert loaded.to_list() == rows, table
        assert all(list(row) == loaded.column_names for row in rows), table


def tiny_chat_tokenizer():
    """A tokenizer that only formats chats: TRL needs one with a chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


@pytest.mark.parametrize("recipe", RECIPES)
async def test_sft_and_preference_tables_pass_trl_data_utilities(finished, recipe):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    _, out = succeeded(finished, recipe)
    tokenizer = tiny_chat_tokenizer()
    checked = 0
    for path in sorted(out.glob("*.jsonl")):
        if path.name == "lineage.jsonl":
            continue
        for row in read_jsonl(path):
            chat = "messages" in row or {"chosen", "rejected"} <= set(row)
            if not chat:
                continue
            example: dict[str, Any] = {k: row[k] for k in ("messages", "prompt", "chosen", "rejected", "completion") if k in row}
            assert is_conversational(example), f"{path.name}: {example} is not in TRL's conversational layout"
            formatted = maybe_apply_chat_template(example, tokenizer)
            assert formatted and all(isinstance(v, str) and v for v in formatted.values()), f"{path.name}: {formatted}"
            checked += 1
    if recipe in ("self_instruct", "constitutional"):
        assert checked, f"{recipe} exported no SFT or preference row"


async def test_an_item_a_service_refuses_is_dropped_with_filter_error_not_the_job(finished):
    _, out = succeeded(finished, "constitutional")
    rows = {r["item_id"]: r for r in read_jsonl(out / "lineage.jsonl")}
    refused = [r for r in rows.values() if any(d.get("filter") == "error" for d in r["lineage"])]
    assert len(refused) == 1 and not refused[0]["kept"]
    assert "INVALID_ARGUMENT" in refused[0]["lineage"][-1]["reason"]
    errors = json.loads((out / "manifest.json").read_text())["errors"]
    assert errors["count"] == 1 and errors["items"] == 3 and errors["fraction"] == pytest.approx(1 / 3)
    assert errors["max_error_fraction"] == 0.5 and "INVALID_ARGUMENT" in errors["messages"][0]
    assert any(r["kept"] for r in rows.values()), "the other prompts were not revised"


# The score each recipe's filter decides by (recipe.deciding_scores), and so the report's one histogram.
DECIDING_STAGE = {"self_instruct": "diversity", "toolformer": "filter", "self_consistency": "vote", "constitutional": "judge"}
FUNNEL_JS = """Array.from(document.querySelectorAll('#funnel tr.stage'), r => ({
  stage: r.dataset.stage, done: +r.dataset.done, kept: +r.dataset.kept,
  droppedByFilter: Object.fromEntries(Array.from(
    document.querySelectorAll('#funnel tr.filter'), f => [f.dataset.stage, f.dataset.filter, +f.dataset.dropped]
  ).filter(f => f[0] === r.dataset.stage).map(f => [f[1], f[2]]))
}))"""
PLOTS_JS = "Array.from(document.querySelectorAll('figure.plot'), f => [f.dataset.scoreStage, f.querySelectorAll('svg').length])"


@pytest.mark.parametrize("recipe", RECIPES)
async def test_the_exported_report_opens_offline_in_chromium_with_the_funnel_and_a_plot_per_score(finished, recipe, tmp_path):
    from PIL import Image

    _, out = succeeded(finished, recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "report_html" in [f["kind"] for f in manifest["files"]], "the export lists no report"
    stage = DECIDING_STAGE[recipe]
    scored = any(d["stage"] == stage and "score" in d for row in read_jsonl(out / "lineage.jsonl") for d in row["lineage"])
    with open_page(out / "report.html", width=1200, height=1600) as page:
        funnel = page.evaluate(FUNNEL_JS)
        plots = page.evaluate(PLOTS_JS)
        without_scores = page.evaluate("Array.from(document.querySelectorAll('p.no-scores'), p => p.dataset.scoreStage)")
        screenshot = page.screenshot(tmp_path / "report.png")
        errors, external = page.console_errors, page.external_requests
    assert errors == [], f"{recipe}: the report logged errors: {errors}"
    assert external == [], f"{recipe}: the report requested {external}"
    # The funnel's numbers are the manifest's stages (which are the job's).
    assert funnel == [
        {k: s.get(k, 0 if k != "droppedByFilter" else {}) for k in ("stage", "done", "kept", "droppedByFilter")} for s in manifest["stages"]
    ]
    assert (plots, without_scores) == (([[stage, 1]], []) if scored else ([], [stage]))
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == (1200, 1600)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 50, "the screenshot is (nearly) blank"
