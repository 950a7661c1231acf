"""The job report (issue 14): funnel numbers in the DOM, every text escaped, a
histogram per deciding score with its threshold, a bounded sample that does not
depend on how rows arrive, the same rows from StreamSamples as from the export,
report.html in every export, `autodidact report`, and the page in a real browser
(no console error, no request, the search filtering rows)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from concurrent import futures
from typing import Any

import grpc
import pytest

from autodidact import cli
from autodidact.coordinator import export
from autodidact.coordinator.protos import record_message
from autodidact.coordinator.recipes.base import Decision, StageResult
from autodidact.coordinator.recipes.recipe import DecidingScore
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.coordinator.records import Record
from autodidact.coordinator.report import ReportBuilder, fetch_report, record_row
from autodidact.coordinator.store import SqliteJobStore
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.browser import open_page

HOSTILE = '<script>alert(1)</script><img src="http://203.0.113.9/x.png" onerror="alert(2)">'


def job(stages: list[coordinator_pb2.StageProgress] | None = None, **spec: Any) -> coordinator_pb2.Job:
    self_instruct = coordinator_pb2.SelfInstructSpec(**spec)
    message = coordinator_pb2.Job(
        id="job-1", spec=coordinator_pb2.JobSpec(self_instruct=self_instruct, seed=11), state=coordinator_pb2.JOB_STATE_SUCCEEDED
    )
    message.created_at.FromSeconds(1_800_000_000)
    message.updated_at.FromSeconds(1_800_000_600)
    message.stages.extend(stages or [])
    return message


def rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Self-Instruct-like lineage rows: kept below a similarity of 0.7, dropped above it."""
    rng = random.Random(seed)
    out = []
    for number in range(count):
        similarity = rng.random()
        kept = similarity < 0.7
        drop = {} if kept else {"filter": "similarity", "reason": f"near {HOSTILE}"}
        out.append(
            {
                "item_id": f"r{number:05d}-00",
                "kept": kept,
                "data": {"instruction": f"task {number} {HOSTILE}"},
                "lineage": [
                    {
                        "stage": "generate_instructions",
                        "kept": True,
                        "model": "smol.gguf",
                        "template_version": "self_instruct/v1",
                        "seed": 7,
                    },
                    {"stage": "diversity", "kept": kept, "score": similarity, **drop},
                ],
            }
        )
    return out


def funnel_of(page: str) -> list[tuple[str, int, int]]:
    return [
        (m[1], int(m[2]), int(m[3]))
        for m in re.finditer(r'<tr class="stage" data-stage="([^"]*)" data-done="(\d+)" data-kept="(\d+)"', page)
    ]


def figures_of(page: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r'<figure class="plot" data-score-stage="([^"]*)".*?>(.*?)</figure>', page, re.DOTALL)}


STAGES = [
    coordinator_pb2.StageProgress(stage="generate_instructions", done=300, kept=300),
    coordinator_pb2.StageProgress(stage="diversity", done=300, kept=205, dropped_by_filter={"similarity": 95}),
]


def test_the_funnel_is_the_jobs_stage_counts_in_machine_readable_rows():
    builder = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"])
    builder.add(rows(300))
    page = builder.html()
    assert funnel_of(page) == [("generate_instructions", 300, 300), ("diversity", 300, 205)]
    assert '<tr class="filter" data-stage="diversity" data-filter="similarity" data-dropped="95">' in page
    kept = sum(r["kept"] for r in rows(300))
    assert 'data-total="candidates" data-count="300"' in page and f'data-total="kept" data-count="{kept}"' in page
    # The facts: seed from the spec, models and template versions from the lineage.
    assert "<td>smol.gguf</td>" in page and "<td>self_instruct/v1</td>" in page and '<tr data-fact="seed"><th>seed</th><td>11</td>' in page
    assert "2027-01-15 08:00:00 UTC" in page  # created_at


def test_every_text_is_escaped_and_the_page_loads_nothing():
    hostile = rows(20)
    hostile[0]["item_id"] = HOSTILE
    hostile[0]["lineage"][-1].update(decided_by="human", reviewer=HOSTILE, note=HOSTILE, kept=False, filter=HOSTILE)
    builder = ReportBuilder.for_job(
        job([coordinator_pb2.StageProgress(stage=HOSTILE, done=1, kept=0, dropped_by_filter={HOSTILE: 1})]), None
    )
    builder.add(hostile)
    page = builder.html()
    assert HOSTILE not in page and "<img" not in page
    assert page.count("<script") == 1  # the report's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert csp and "default-src 'none'" in csp[1] and "img-src data:" in csp[1]
    # No address to fetch anything from: the SVGs' namespaces are names, not requests.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)


def test_a_histogram_per_deciding_score_with_its_threshold_and_text_when_there_are_no_scores():
    builder = ReportBuilder.for_job(job(STAGES, similarity_threshold=0.8), RECIPES["self_instruct"])
    builder.add(rows(300))
    page = builder.html()
    figures = figures_of(page)
    assert list(figures) == ["diversity"]
    svg = figures["diversity"]
    assert svg.lstrip().startswith("<svg") and "<?xml" not in page and "<!-- threshold -->" in svg
    assert 'data-thresholds="0.8"' in page and "300 scores" in page
    empty = ReportBuilder.for_job(job(), RECIPES["self_instruct"])
    empty.add([])
    page = empty.html()
    assert not figures_of(page) and '<p class="no-scores" data-score-stage="diversity">No diversity scores yet' in page


def test_two_figures_in_one_page_share_no_svg_ids():
    builder = ReportBuilder(
        job(STAGES), (DecidingScore("diversity", "one", (0.7,), "below"), DecidingScore("diversity", "two", (0.5,), "below"))
    )
    builder.add(rows(50))
    figures = re.findall(r'<figure class="plot".*?</figure>', builder.html(), re.DOTALL)
    ids = [re.findall(r'\bid="([^"]+)"', svg) for svg in figures]
    assert len(figures) == 2 and all(ids) and not set(ids[0]) & set(ids[1])
    for svg, own in zip(figures, ids, strict=True):  # each figure's glyphs and clip paths are its own
        assert set(re.findall(r'(?:href="|url\()#([^")]+)', svg)) <= set(own)


def test_the_sample_is_bounded_and_the_same_whatever_order_and_chunks_the_rows_come_in():
    every = rows(2000)
    one = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"], sample_rows=25)
    one.add(every)
    shuffled = every[:]
    random.Random(5).shuffle(shuffled)
    other = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"], sample_rows=25)
    for start in range(0, len(shuffled), 333):
        other.add(shuffled[start : start + 333])
    page = one.html()
    assert page == other.html()
    assert page.count('<tr class="sample" data-kept="true"') == 25 and page.count('<tr class="sample" data-kept="false"') == 25


def test_scores_past_the_cap_are_a_reservoir():
    builder = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"], max_scores=100)
    builder.add(rows(1000))
    page = builder.html()
    assert "1,000 scores, a uniform sample of 100 plotted" in page


def test_usage_and_review_show_when_recorded():
    message = job(STAGES)
    builder = ReportBuilder.for_job(message, RECIPES["self_instruct"])
    builder.add(rows(10))
    assert builder.html().count("not recorded") == 4 and "awaiting review" not in builder.html()
    message.usage.prompt_tokens, message.usage.completion_tokens, message.usage.run_seconds = 900, 100, 20.0
    message.awaiting_review = 3
    kept = sum(r["kept"] for r in rows(10))
    page = builder.html()
    assert f"{1000 / kept:,.1f} tokens" in page and f"{20 / kept:,.1f} s" in page and "3 items wait for a person" in page


def test_a_streamed_record_is_the_row_lineage_jsonl_holds():
    decisions = [
        ("generate_instructions", Decision(True, model="m.gguf", template_version="v1", seed=0)),
        ("diversity", Decision(False, "similarity", score=0.0, reason="near")),
        ("review", Decision(True, decided_by="human", reviewer="ann", note="fine")),
    ]
    record = Record("r1", False, {"text": "hi", "n": 2, "nested": {"a": [1, "b"]}}, decisions)
    (written,) = export.lineage_rows([record])
    streamed = record_row(record_message(record))
    assert streamed == {**written, "data": {"text": "hi", "n": 2.0, "nested": {"a": [1.0, "b"]}}}  # a Struct's numbers are floats


async def test_every_export_writes_the_report_and_lists_it(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    try:
        await store.create_job("job-1", b"", "hash", coordinator_pb2.JOB_STATE_SUCCEEDED)
        for number in range(6):
            kept = number % 3 != 0
            decision = Decision(kept, "" if kept else "similarity", score=number / 6, reason=HOSTILE)
            result = StageResult({"instruction": HOSTILE}, decision).to_json()
            await store.put_result("job-1", f"r{number:05d}-00", "diversity", result, kept=kept, filter_=decision.filter)
        recipe = RECIPES["self_instruct"]
        stages = [coordinator_pb2.StageProgress(stage="diversity", done=6, kept=4, dropped_by_filter={"similarity": 2})]
        files = await export.write_dataset(store, "job-1", job(stages), recipe, tmp_path / "out")
    finally:
        await store.close()
    report = next(f for f in files if f.kind == "report_html")
    assert report.name == "report.html" and report.size_bytes == (tmp_path / "out" / "report.html").stat().st_size
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "report.html" in [f["name"] for f in manifest["files"]]
    assert [f.name for f in export.written_export(tmp_path / "out") or []] == [f.name for f in files]
    page = (tmp_path / "out" / "report.html").read_text()
    assert funnel_of(page) == [(s["stage"], s["done"], s["kept"]) for s in manifest["stages"]]
    assert list(figures_of(page)) == ["diversity"] and HOSTILE not in page
    assert not list((tmp_path / "out").glob("*.tmp"))


class FakeCoordinator:
    """GetJob and StreamSamples of one job, as a coordinator answers them (its other methods are UNIMPLEMENTED)."""

    def __init__(self, message: coordinator_pb2.Job, records: list[Record]) -> None:
        self.message, self.records = message, records
        self.include_dropped: list[bool] = []

    def GetJob(self, request: coordinator_pb2.GetJobRequest, context: Any) -> coordinator_pb2.GetJobResponse:
        if request.job_id != self.message.id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} does not exist")
        return coordinator_pb2.GetJobResponse(job=self.message)

    def StreamSamples(self, request: coordinator_pb2.StreamSamplesRequest, context: Any) -> Any:
        self.include_dropped.append(request.include_dropped)
        for record in self.records:
            yield coordinator_pb2.StreamSamplesResponse(record=record_message(record))


def records_of(lineage_rows: list[dict[str, Any]]) -> list[Record]:
    def decision(d: dict[str, Any]) -> Decision:
        return Decision(**{k: v for k, v in d.items() if k != "stage"})

    return [Record(r["item_id"], r["kept"], r["data"], [(d["stage"], decision(d)) for d in r["lineage"]]) for r in lineage_rows]


@pytest.fixture
def fake_coordinator():
    servicer = FakeCoordinator(job(STAGES), records_of(rows(300)))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetJob": grpc.unary_unary_rpc_method_handler(
            servicer.GetJob,
            request_deserializer=coordinator_pb2.GetJobRequest.FromString,
            response_serializer=coordinator_pb2.GetJobResponse.SerializeToString,
        ),
        "StreamSamples": grpc.unary_stream_rpc_method_handler(
            servicer.StreamSamples,
            request_deserializer=coordinator_pb2.StreamSamplesRequest.FromString,
            response_serializer=coordinator_pb2.StreamSamplesResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("autodidact.v1.CoordinatorService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_autodidact_report_builds_the_report_of_a_job_from_its_coordinator(fake_coordinator, tmp_path, capsys):
    servicer, target = fake_coordinator
    out = tmp_path / "job-1.html"
    assert cli.main(["report", "job-1", "--target", target, "--out", str(out), "--token", "t"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert servicer.include_dropped == [True]
    page = out.read_text()
    # The same report as an export's, from the same rows (StreamSamples' numbers arrive as floats: the data differ in "7.0").
    exported = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"])
    exported.add(rows(300))
    assert funnel_of(page) == funnel_of(exported.html()) and figures_of(page) == figures_of(exported.html())
    assert cli.main(["report", "nope", "--target", target, "--out", str(tmp_path / "x.html"), "--token", "t"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def test_fetch_report_reads_a_running_job_too(fake_coordinator):
    servicer, target = fake_coordinator
    servicer.message.state = coordinator_pb2.JOB_STATE_RUNNING

    async def fetch() -> str:
        async with grpc.aio.insecure_channel(target) as channel:
            return await fetch_report(coordinator_pb2_grpc.CoordinatorServiceStub(channel), "job-1")

    page = asyncio.run(fetch())
    assert "<td>RUNNING</td>" in page and list(figures_of(page)) == ["diversity"]


def test_the_report_in_chromium_loads_nothing_logs_no_error_and_its_search_filters_rows(tmp_path):
    hostile = rows(120)
    hostile[3]["item_id"] = HOSTILE
    builder = ReportBuilder.for_job(job(STAGES), RECIPES["self_instruct"], sample_rows=40)
    builder.add(hostile)
    path = tmp_path / "report.html"
    path.write_text(builder.html(), encoding="utf-8")
    with open_page(path) as page:
        funnel = page.evaluate(
            "Array.from(document.querySelectorAll('#funnel tr.stage'), r => [r.dataset.stage, +r.dataset.done, +r.dataset.kept])"
        )
        svgs = page.evaluate("document.querySelectorAll('figure.plot svg').length")
        total = page.evaluate("document.querySelectorAll('#samples tbody tr').length")
        shown = page.evaluate(
            "var s = document.getElementById('search'); s.value = document.querySelector('#samples tbody tr').dataset.itemId;"
            "s.dispatchEvent(new Event('input')); Array.from(document.querySelectorAll('#samples tbody tr')).filter(r => !r.hidden).length"
        )
        dropped = page.evaluate(
            "s.value = ''; s.dispatchEvent(new Event('input')); var w = document.getElementById('which'); w.value = 'false';"
            "w.dispatchEvent(new Event('change')); +document.getElementById('shown').textContent"
        )
        png = page.screenshot(tmp_path / "report.png").read_bytes()
        errors, external = page.console_errors, page.external_requests
    assert errors == [] and external == []
    assert funnel == [[s.stage, s.done, s.kept] for s in STAGES] and svgs == 1
    assert total == 80 and shown == 1 and dropped == 40
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
