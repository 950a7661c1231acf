"""A job's report: one self-contained HTML file a person reads to judge a job.

What it shows: the funnel (candidates, each stage's decided and kept with the
filters that dropped the rest, kept), a histogram of each score a filter decides
by with the job's thresholds drawn, tokens and seconds per kept sample, the
models, template versions and seed, and a searchable sample of kept and dropped
rows with their lineage.

The file needs no network to view: the figures are inline SVG drawn by
matplotlib (through `Figure` directly, never pyplot, so no global backend is
chosen for the process), the one script and the styles are inline, and a
Content-Security-Policy forbids loading anything else. Every piece of text is
HTML-escaped: item data is model output, so it is untrusted.

`ReportBuilder` is fed lineage rows a chunk at a time (the rows of
lineage.jsonl, as `export.lineage_rows` makes them, or `record_row` from
StreamSamples' records) and holds only the deciding scores (floats) and a
bounded sample of rows, so a job of millions of items costs megabytes, not the
job. The export writes the report with every dataset; `autodidact report`
builds one client-side for any job, a running one too.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import json
import math
import random
import re
import threading
from array import array
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from autodidact.coordinator.protos import CANCELLED, state_name
from autodidact.v1 import coordinator_pb2

if TYPE_CHECKING:  # the registry imports every recipe
    from autodidact.coordinator.recipes.recipe import DecidingScore, Recipe

# Rows of each kind (kept, dropped) in the sample: enough to read a job's reasons, small enough to search in a browser.
SAMPLE_ROWS = 200
# Scores kept per deciding score; past this a uniform reservoir keeps the histogram's shape (8 bytes each).
MAX_SCORES = 1_000_000
# Characters of one text (a reason, a note, an item's data) shown in the sample.
TEXT_CHARS = 400
DATA_CHARS = 800
# Models and template versions listed (a job has a handful; a bound keeps a hostile lineage from growing the report).
MAX_NAMES = 50
HISTOGRAM_BINS = 40
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
# matplotlib's text layout and font cache are shared by every figure of the process: one report draws at a time.
_DRAWING = threading.Lock()
KEPT_COLOUR, DROPPED_COLOUR, THRESHOLD_COLOUR = "#3b7dd8", "#d8733b", "#222222"


def record_row(record: coordinator_pb2.JobRecord) -> dict[str, Any]:
    """A StreamSamples record as the lineage row `export.lineage_rows` writes for it: the
    same keys, each decision with only its non-empty fields (proto3 scalars cannot say
    None, so the row leaves out what the store would have held as "" or None)."""
    lineage = []
    for d in record.lineage:
        decision: dict[str, Any] = {"stage": d.stage, "kept": d.kept}
        if d.filter:
            decision["filter"] = d.filter
        if d.HasField("score"):
            decision["score"] = d.score
        if d.reason:
            decision["reason"] = d.reason
        if d.model.model:
            decision["model"] = d.model.model
        if d.template_version:
            decision["template_version"] = d.template_version
        if d.HasField("seed"):
            decision["seed"] = d.seed
        for key in ("decided_by", "reviewer", "note"):
            if value := getattr(d, key):
                decision[key] = value
        lineage.append(decision)
    return {"item_id": record.item_id, "kept": record.kept, "data": json_format.MessageToDict(record.data), "lineage": lineage}


def _cut(text: str, limit: int = TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _e(value: Any) -> str:
    """Escaped for an element's text and for a quoted attribute alike."""
    return html.escape(str(value), quote=True)


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


class _Scores:
    """One deciding score's values with each decision's kept flag: every one up to `limit`,
    then a uniform reservoir of `limit` (Algorithm R, seeded, so a report is repeatable)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values = array("d")
        self.kept = bytearray()
        self.seen = 0
        self.nonfinite = 0  # NaN or infinite: counted, not plotted
        self._rng = random.Random(0)

    def add(self, value: float, kept: bool) -> None:
        if not math.isfinite(value):
            self.nonfinite += 1
            return
        self.seen += 1
        if len(self.values) < self.limit:
            self.values.append(value)
            self.kept.append(kept)
        elif (slot := self._rng.randrange(self.seen)) < self.limit:
            self.values[slot] = value
            self.kept[slot] = kept


class _Sample:
    """Up to `size` rows with the smallest hashes of their item ids (a bottom-k sample): uniform,
    and the same rows whatever order or chunks they come in (export and StreamSamples agree)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self._heap: list[tuple[int, str, dict[str, Any]]] = []  # (-hash, item id, summary): the root is the largest hash

    def add(self, row: dict[str, Any]) -> None:
        self.seen += 1
        if self.size <= 0:
            return
        item_id = str(row.get("item_id", ""))
        rank = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big")
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (-rank, item_id, _summary(row)))
        elif (-rank, item_id) > self._heap[0][:2]:
            heapq.heapreplace(self._heap, (-rank, item_id, _summary(row)))

    def rows(self) -> list[dict[str, Any]]:
        return [summary for _, _, summary in sorted(self._heap, key=lambda entry: entry[1])]


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    """What the sample table shows of a row, its texts cut: the sample's size in memory is bounded."""
    lineage = []
    for decision in row.get("lineage", []):
        entry = {"stage": str(decision.get("stage", "")), "kept": bool(decision.get("kept"))}
        if decision.get("score") is not None:
            entry["score"] = decision["score"]
        for key in ("filter", "reason", "decided_by", "reviewer", "note"):
            if decision.get(key):
                entry[key] = _cut(str(decision[key]))
        lineage.append(entry)
    final = next((d for d in reversed(lineage) if not d["kept"]), lineage[-1] if lineage else {})
    data = json.dumps(row.get("data", {}), ensure_ascii=False, default=str)
    return {
        "item_id": _cut(str(row.get("item_id", ""))),
        "kept": bool(row.get("kept")),
        "final": final,
        "data": _cut(data, DATA_CHARS),
        "lineage": lineage,
    }


class ReportBuilder:
    """Builds one job's report from its lineage rows, fed a chunk at a time with `add`; `html()` writes it.

    `job` is the job as GetJob reports it (its stage counts are the funnel); `scores` are
    the recipe's deciding scores for the job's spec (`deciding_scores_of`)."""

    def __init__(
        self,
        job: coordinator_pb2.Job,
        scores: Sequence[DecidingScore] = (),
        sample_rows: int = SAMPLE_ROWS,
        max_scores: int = MAX_SCORES,
    ) -> None:
        self.job = job
        self.deciding = tuple(scores)
        self._scores = {score.stage: _Scores(max_scores) for score in self.deciding}
        self.items = 0
        self.kept = 0
        self.models: set[str] = set()
        self.template_versions: set[str] = set()
        self._kept_sample = _Sample(sample_rows)
        self._dropped_sample = _Sample(sample_rows)

    @classmethod
    def for_job(cls, job: coordinator_pb2.Job, recipe: Recipe[Any] | None, **kwargs: Any) -> ReportBuilder:
        return cls(job, deciding_scores_of(job, recipe), **kwargs)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.items += 1
            kept = bool(row.get("kept"))
            self.kept += kept
            for decision in row.get("lineage", ()):
                if (model := decision.get("model")) and len(self.models) < MAX_NAMES:
                    self.models.add(str(model))
                if (version := decision.get("template_version")) and len(self.template_versions) < MAX_NAMES:
                    self.template_versions.add(str(version))
                scores = self._scores.get(decision.get("stage", ""))
                if scores is not None and isinstance(score := decision.get("score"), int | float) and not isinstance(score, bool):
                    scores.add(float(score), bool(decision.get("kept")))
            (self._kept_sample if kept else self._dropped_sample).add(row)

    def html(self) -> str:
        job = self.job
        recipe = job.spec.WhichOneof("recipe") or "unknown"
        title = f"{job.id}: {recipe} job report"
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{_e(job.id)} <small>{_e(recipe)} job report</small></h1>",
            self._facts(recipe),
            self._funnel(),
            self._usage(),
            self._figures(),
            self._sample(),
            f"<script>{SCRIPT}</script>",
            "</body></html>",
        ]
        return "\n".join(parts) + "\n"

    # --- sections ---

    def _facts(self, recipe: str) -> str:
        job = self.job
        rows = [
            ("job", job.id),
            ("recipe", recipe),
            ("state", state_name(job.state) + (" (partial: what it finished)" if job.state == CANCELLED else "")),
            ("created", _time(job.created_at) if job.HasField("created_at") else "not recorded"),
            ("updated", _time(job.updated_at) if job.HasField("updated_at") else "not recorded"),
            ("seed", str(job.spec.seed)),
            ("models", ", ".join(sorted(self.models)) or "none recorded"),
            ("template versions", ", ".join(sorted(self.template_versions)) or "none recorded"),
        ]
        if job.error:
            rows.append(("error", job.error))
        body = "".join(f'<tr data-fact="{_e(name)}"><th>{_e(name)}</th><td>{_e(value)}</td></tr>' for name, value in rows)
        return f'<section><h2>Job</h2><table id="facts">{body}</table></section>'

    def _funnel(self) -> str:
        stages = list(self.job.stages)
        widest = max([self.items, *(s.done for s in stages)], default=0) or 1

        def bar(count: int, colour: str) -> str:
            return f'<div class="bar"><span style="width:{100 * count / widest:.1f}%;background:{colour}"></span></div>'

        rows = [
            f'<tr class="total" data-total="candidates" data-count="{self.items}"><th>candidates</th>'
            f"<td>{self.items:,}</td><td></td><td></td><td>{bar(self.items, '#888')}</td></tr>"
        ]
        for stage in stages:
            dropped = stage.done - stage.kept
            total = f' data-total-items="{stage.total}"' if stage.HasField("total") else ""
            rows.append(
                f'<tr class="stage" data-stage="{_e(stage.stage)}" data-done="{stage.done}" data-kept="{stage.kept}" '
                f'data-dropped="{dropped}"{total}><th>{_e(stage.stage)}</th><td>{stage.done:,}'
                + (f" of {stage.total:,}" if stage.HasField("total") else "")
                + f"</td><td>{stage.kept:,}</td><td>{dropped:,}</td><td>{bar(stage.kept, KEPT_COLOUR)}</td></tr>"
            )
            for name, count in sorted(stage.dropped_by_filter.items(), key=lambda kv: (-kv[1], kv[0])):
                rows.append(
                    f'<tr class="filter" data-stage="{_e(stage.stage)}" data-filter="{_e(name)}" data-dropped="{count}">'
                    f"<th>↳ {_e(name)}</th><td></td><td></td><td>{count:,}</td><td>{bar(count, DROPPED_COLOUR)}</td></tr>"
                )
        rows.append(
            f'<tr class="total" data-total="kept" data-count="{self.kept}"><th>kept</th>'
            f"<td></td><td>{self.kept:,}</td><td></td><td>{bar(self.kept, KEPT_COLOUR)}</td></tr>"
        )
        return (
            '<section><h2>Funnel</h2><p class="note">Candidates are the items with a decision (the rows of lineage.jsonl); '
            "each stage shows what it decided and kept, and the filters that dropped the rest; kept are the items in the dataset.</p>"
            '<table id="funnel"><thead><tr><th>stage</th><th>decided</th><th>kept</th><th>dropped</th><th></th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></section>"
        )

    def _usage(self) -> str:
        usage = self.job.usage
        tokens = usage.prompt_tokens + usage.completion_tokens

        def per_kept(value: float, unit: str) -> str:
            if not value:
                return "not recorded"
            return f"{value / self.kept:,.1f} {unit}" if self.kept else f"{_number(value)} {unit} in all (nothing kept)"

        rows = [
            ("tokens", f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion" if tokens else "not recorded"),
            ("tokens per kept sample", per_kept(tokens, "tokens")),
            ("run time", f"{usage.run_seconds:,.1f} s" if usage.run_seconds else "not recorded"),
            ("seconds per kept sample", per_kept(usage.run_seconds, "s")),
        ]
        if self.job.awaiting_review > 0:
            rows.append(("awaiting review", f"{self.job.awaiting_review:,} items wait for a person's decision"))
        body = "".join(f'<tr data-usage="{_e(name)}"><th>{_e(name)}</th><td>{_e(value)}</td></tr>' for name, value in rows)
        return f'<section><h2>Cost</h2><table id="usage">{body}</table></section>'

    def _figures(self) -> str:
        if not self.deciding:
            return "<section><h2>Scores</h2><p>This job's filters decide by no score.</p></section>"
        figures = []
        for number, deciding in enumerate(self.deciding):
            scores = self._scores[deciding.stage]
            thresholds = ", ".join(f"{t:g}" for t in deciding.thresholds)
            if not scores.seen:
                figures.append(
                    f'<p class="no-scores" data-score-stage="{_e(deciding.stage)}">No {_e(deciding.stage)} scores yet '
                    f"({_e(deciding.label)}; threshold {_e(thresholds)}).</p>"
                )
                continue
            kept = sum(scores.kept)
            sampled = f", a uniform sample of {len(scores.values):,} plotted" if scores.seen > len(scores.values) else ""
            nonfinite = f"; {scores.nonfinite:,} not finite, not plotted" if scores.nonfinite else ""
            caption = (
                f"<b>{_e(deciding.stage)}</b>: {_e(deciding.label)}. Kept {_e(deciding.keeps)} the threshold "
                f"({_e(thresholds)}). {scores.seen:,} scores{sampled}{nonfinite}; of those plotted {kept:,} kept, "
                f"{len(scores.values) - kept:,} dropped."
            )
            svg = _histogram(scores, deciding, f"f{number}")
            figures.append(
                f'<figure class="plot" data-score-stage="{_e(deciding.stage)}" data-count="{scores.seen}" '
                f'data-thresholds="{_e(thresholds)}">{svg}<figcaption>{caption}</figcaption></figure>'
            )
        return f"<section><h2>Scores</h2>{''.join(figures)}</section>"

    def _sample(self) -> str:
        kept, dropped = self._kept_sample.rows(), self._dropped_sample.rows()
        rows = "".join(_sample_row(summary) for summary in (*kept, *dropped))
        note = (
            f"{len(kept):,} of {self._kept_sample.seen:,} kept and {len(dropped):,} of {self._dropped_sample.seen:,} dropped rows, "
            "chosen by a hash of the item id (the same rows however often the report is made)."
        )
        return (
            '<section><h2>Sample</h2><p class="note">' + _e(note) + "</p>"
            '<p><input id="search" type="search" placeholder="search ids, reasons, data" aria-label="search the sample"> '
            '<select id="which" aria-label="kept or dropped"><option value="">kept and dropped</option>'
            '<option value="true">kept</option><option value="false">dropped</option></select> '
            f'<span id="shown">{len(kept) + len(dropped)}</span> shown</p>'
            '<table id="samples"><thead><tr><th>item</th><th>kept</th><th>final decision</th><th>data</th><th>lineage</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></section>"
        )


def deciding_scores_of(job: coordinator_pb2.Job, recipe: Recipe[Any] | None) -> tuple[DecidingScore, ...]:
    """The recipe's deciding scores with the thresholds the job's spec sets."""
    if recipe is None or job.spec.WhichOneof("recipe") != recipe.name:
        return ()
    return tuple(recipe.deciding_scores(getattr(job.spec, recipe.name)))


def _time(timestamp: Any) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _decision_text(decision: dict[str, Any]) -> str:
    parts = [f"<b>{_e(decision['stage'])}</b> " + ("kept" if decision["kept"] else "dropped")]
    if decision.get("filter"):
        parts.append(f"by <code>{_e(decision['filter'])}</code>")
    if "score" in decision:
        parts.append(f"score {_e(_number(decision['score']))}")
    if decision.get("reason"):
        parts.append(_e(decision["reason"]))
    if decision.get("decided_by"):
        who = decision["decided_by"] + (f" ({decision['reviewer']})" if decision.get("reviewer") else "")
        parts.append(f"decided by {_e(who)}" + (f": {_e(decision['note'])}" if decision.get("note") else ""))
    return " · ".join(parts)


def _sample_row(summary: dict[str, Any]) -> str:
    final = summary["final"]
    final_text = _decision_text(final) if final else ""
    lineage = "".join(f"<li>{_decision_text(d)}</li>" for d in summary["lineage"])
    kept = "true" if summary["kept"] else "false"
    return (
        f'<tr class="sample" data-kept="{kept}" data-item-id="{_e(summary["item_id"])}"><td><code>{_e(summary["item_id"])}</code></td>'
        f"<td>{'kept' if summary['kept'] else 'dropped'}</td><td>{final_text}</td>"
        f"<td><pre>{_e(summary['data'])}</pre></td><td><ol>{lineage}</ol></td></tr>"
    )


def _histogram(scores: _Scores, deciding: DecidingScore, prefix: str) -> str:
    """The scores' histogram (kept and dropped stacked) with the thresholds as vertical lines, as inline SVG."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = np.frombuffer(scores.values, dtype=np.float64)
    kept = np.frombuffer(bytes(scores.kept), dtype=np.uint8).astype(bool)
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:  # one value: a bin around it
        low, high = low - 0.5, high + 0.5
    span = high - low
    # A threshold far from every score (Toolformer's test jobs use τf = -100) would squash the bars: it is named, not drawn.
    drawn = sorted({t for t in deciding.thresholds if low - span <= t <= high + span})
    off_axis = sorted(set(deciding.thresholds) - set(drawn))
    edges = np.linspace(min([low, *drawn]), max([high, *drawn]), HISTOGRAM_BINS + 1)
    with _DRAWING:
        figure = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
        axes = figure.add_subplot()
        axes.hist(
            [values[kept], values[~kept]], bins=edges.tolist(), stacked=True, color=[KEPT_COLOUR, DROPPED_COLOUR], label=["kept", "dropped"]
        )
        for position, threshold in enumerate(drawn):
            axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.5, label="threshold" if position == 0 else None)
        axes.set_xlabel(_plain(f"{deciding.stage}: {deciding.label}"))
        axes.set_ylabel("decisions")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 of a decision
        title = f"kept {deciding.keeps} the threshold"
        if off_axis:
            title += " (" + ", ".join(f"{t:g}" for t in off_axis) + " off the axis)"
        axes.set_title(_plain(title), fontsize=10)
        axes.legend(fontsize=9)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
    return _inline_svg(out.getvalue(), prefix)


def _plain(text: str) -> str:
    """A label drawn as written: `$` would start mathtext."""
    return text.replace("$", r"\$")


_SVG_ID = re.compile(r'\bid="([^"]+)"')


def _inline_svg(svg: str, prefix: str) -> str:
    """matplotlib's SVG document as an element of the page: no XML prolog, no metadata, and its ids
    renamed `<prefix>-<n>` so several figures in one page cannot refer to each other's glyphs
    or clip paths (matplotlib draws them from a random salt, so the names are repeatable too)."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    names = {old: f"{prefix}-{number}" for number, old in enumerate(dict.fromkeys(_SVG_ID.findall(svg)))}
    if names:
        pattern = re.compile(r'(\bid="|#)(' + "|".join(re.escape(old) for old in sorted(names, key=len, reverse=True)) + r')(?=["\)])')
        svg = pattern.sub(lambda match: match.group(1) + names[match.group(2)], svg)
    return svg.replace("<svg ", '<svg role="img" ', 1)


async def fetch_report(stub: Any, job_id: str, timeout: float = 600.0) -> str:
    """The report of any job, a running one too, built client-side: GetJob and StreamSamples(include_dropped)."""
    from autodidact.coordinator.recipes.registry import RECIPES

    job = (await stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=timeout)).job
    builder = ReportBuilder.for_job(job, RECIPES.get(job.spec.WhichOneof("recipe") or ""))
    chunk: list[dict[str, Any]] = []
    request = coordinator_pb2.StreamSamplesRequest(job_id=job_id, include_dropped=True)
    async for response in stub.StreamSamples(request, timeout=timeout):
        chunk.append(record_row(response.record))
        if len(chunk) >= 4096:
            builder.add(chunk)
            chunk = []
    builder.add(chunk)
    return builder.html()


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1150px;padding:0 16px;color:#1d1d1f}
h1 small{font-weight:normal;color:#666;font-size:60%}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse}
th,td{text-align:left;padding:3px 10px 3px 0;vertical-align:top}
#facts th,#usage th{color:#555;font-weight:normal;width:180px}
#funnel td{text-align:right;min-width:60px}
#funnel td:last-child{width:320px}
#funnel tr.filter th{font-weight:normal;padding-left:18px;color:#8a4a22}
#funnel tr.total th{font-style:italic}
.bar{background:#f0f0f0;height:12px;width:300px}
.bar span{display:block;height:12px}
figure{margin:12px 0}
figure svg{max-width:100%;height:auto}
figcaption{color:#444;max-width:800px}
.note{color:#555}
#samples{width:100%;font-size:12.5px}
#samples td,#samples th{border-top:1px solid #eee;padding:4px 8px 4px 0}
#samples pre{white-space:pre-wrap;word-break:break-word;margin:0;max-width:360px;font-size:11.5px}
#samples ol{margin:0;padding-left:18px}
#samples tr[data-kept="true"] td:nth-child(2){color:#2a6bc4}
#samples tr[data-kept="false"] td:nth-child(2){color:#b4571f}
input,select{font:inherit;padding:3px 6px}
#search{width:320px}
"""

# Filters the sample's rows as one types; no data is ever written into the script, only read from the DOM as text.
SCRIPT = """
(function () {
  var search = document.getElementById("search"), which = document.getElementById("which");
  var shown = document.getElementById("shown");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#samples tbody tr"));
  function filter() {
    var query = search.value.trim().toLowerCase(), kept = which.value, count = 0;
    rows.forEach(function (row) {
      var hit = (!kept || row.getAttribute("data-kept") === kept) && (!query || row.textContent.toLowerCase().indexOf(query) >= 0);
      row.hidden = !hit;
      if (hit) count++;
    });
    shown.textContent = count;
  }
  search.addEventListener("input", filter);
  which.addEventListener("change", filter);
})();
"""
