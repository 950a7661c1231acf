"""`autodidact review`: a job's items awaiting review out to an annotation tool, and
people's decisions back in (docs/jobs.md, "Review gates").

Out: ListReviews, page by page, as Label Studio tasks (its JSON import format:
one task per item, `data` holding what a person reads, the filter's verdict as
a prediction to start from), with the labeling config those tasks expect.

In: a Label Studio JSON export of those tasks (each task's latest annotation
that was not cancelled: a "keep" or "drop" choice and an optional note), or
JSON lines of {"item_id", "kept", "reviewer"?, "note"?}; sent with
SubmitReviews in batches. Both formats are read whole and checked against
the server's rules (the job's own tasks, each item once, the bounds of a
note and a reviewer) before anything is sent, so a bad file sends nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from autodidact.v1 import coordinator_pb2
from autodidact.validation import MAX_REVIEW_ITEM_ID_CHARS, MAX_REVIEW_NOTE_CHARS, MAX_REVIEWER_CHARS

# What the tasks' labeling config names: a choice and a note about the item's text.
LABEL_CONFIG = """<View>
  <Header value="$stage: score $score, threshold $threshold; the filter proposes to $proposed"/>
  <Text name="item" value="$text"/>
  <Choices name="decision" toName="item" choice="single" required="true">
    <Choice value="keep"/>
    <Choice value="drop"/>
  </Choices>
  <TextArea name="note" toName="item" placeholder="why (optional)"/>
</View>
"""
# Decisions per SubmitReviews call (the server takes at most 10,000).
SUBMIT_BATCH = 1000
# Characters of one field's value in a task's text.
FIELD_CHARS = 4000


class ReviewFileError(ValueError):
    """A review file that cannot be read; says which line or task and why."""


@dataclass(frozen=True)
class Decided:
    item_id: str
    kept: bool
    reviewer: str
    note: str


def _text(data: dict[str, Any]) -> str:
    """What a person reads: each of the item's fields on its own line."""
    lines = []
    for key, value in data.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{key}: {shown[:FIELD_CHARS]}{'…' if len(shown) > FIELD_CHARS else ''}")
    return "\n".join(lines)


def label_studio_task(item: coordinator_pb2.ReviewItem, job_id: str) -> dict[str, Any]:
    """One item as a Label Studio task, the filter's verdict as its prediction."""
    proposed = "keep" if item.proposed_kept else "drop"
    return {
        "data": {
            "job_id": job_id,
            "item_id": item.item_id,
            "stage": item.stage,
            "score": round(item.score, 6),
            "threshold": round(item.threshold, 6),
            "proposed": proposed,
            "reason": item.reason,
            "text": _text(json_format.MessageToDict(item.data)),
        },
        "predictions": [
            {
                "model_version": "autodidact filter",
                "result": [{"from_name": "decision", "to_name": "item", "type": "choices", "value": {"choices": [proposed]}}],
            }
        ],
    }


def read_decisions(path: Path, reviewer: str, job_id: str) -> list[Decided]:
    """The decisions in a Label Studio export (a JSON list of tasks) or a JSON-lines file,
    checked. `reviewer` names whoever decided where the file does not (empty: the caller's
    identity); a Label Studio task of another job than `job_id` is refused (item ids repeat
    across jobs of a recipe)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewFileError(f"{path}: cannot be read ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            tasks = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReviewFileError(f"{path}: not JSON ({exc})") from None
        decisions = list(_from_label_studio(tasks, reviewer, job_id))
    else:
        decisions = list(_from_json_lines(text, reviewer))
    if not decisions:
        raise ReviewFileError(f"{path}: holds no decision (a Label Studio export with annotations, or JSON lines)")
    seen: set[str] = set()
    for decision in decisions:
        where = f"{path}: item {decision.item_id!r}"
        if not decision.item_id or len(decision.item_id) > MAX_REVIEW_ITEM_ID_CHARS:
            raise ReviewFileError(f"{where}: an item id is 1 to {MAX_REVIEW_ITEM_ID_CHARS} characters")
        if decision.item_id in seen:
            raise ReviewFileError(f"{where} is decided twice")
        seen.add(decision.item_id)
        if len(decision.reviewer) > MAX_REVIEWER_CHARS or not decision.reviewer.isprintable():
            raise ReviewFileError(f"{where}: the reviewer is at most {MAX_REVIEWER_CHARS} printable characters")
        if len(decision.note) > MAX_REVIEW_NOTE_CHARS:
            raise ReviewFileError(f"{where}: the note is at most {MAX_REVIEW_NOTE_CHARS:,} characters, got {len(decision.note):,}")
    return decisions


def _from_label_studio(tasks: Any, reviewer: str, job_id: str) -> Iterator[Decided]:
    if not isinstance(tasks, list):
        raise ReviewFileError("a Label Studio export is a JSON list of tasks")
    for number, task in enumerate(tasks, 1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict) or not isinstance(task["data"].get("item_id"), str):
            raise ReviewFileError(f"task {number}: has no data.item_id (export the tasks `autodidact review --export` wrote)")
        if task["data"].get("job_id", job_id) != job_id:
            raise ReviewFileError(f"task {number}: is of job {task['data']['job_id']!r}, not {job_id!r}")
        done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            continue  # not annotated yet: it stays awaiting review
        annotation = done[-1]  # the latest
        choice, note = None, ""
        for result in annotation.get("result") or []:
            value = result.get("value") or {}
            if result.get("from_name") == "decision" and value.get("choices"):
                choice = value["choices"][0]
            elif result.get("from_name") == "note" and value.get("text"):
                note = "\n".join(value["text"])
        if choice not in ("keep", "drop"):
            raise ReviewFileError(f"task {number} ({task['data']['item_id']}): its annotation chooses neither keep nor drop")
        who = reviewer or _annotator(annotation.get("completed_by"))
        yield Decided(task["data"]["item_id"], choice == "keep", who, note)


def _annotator(completed_by: Any) -> str:
    """Label Studio names the annotator by user id, or by a user object in some exports."""
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("username") or completed_by.get("id") or "")
    return f"label-studio user {completed_by}" if completed_by is not None else ""


def _from_json_lines(text: str, reviewer: str) -> Iterator[Decided]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReviewFileError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("item_id"), str) or not isinstance(row.get("kept"), bool):
            raise ReviewFileError(f'line {number}: needs "item_id" (a string) and "kept" (true or false)')
        note = row.get("note", "")
        if not isinstance(note, str):
            raise ReviewFileError(f'line {number}: "note" must be a string')
        yield Decided(row["item_id"], row["kept"], str(row.get("reviewer") or reviewer), note)


async def export_tasks(stub: Any, job_id: str, timeout: float) -> tuple[list[dict[str, Any]], coordinator_pb2.ListReviewsResponse]:
    """Every item of the job awaiting review, as Label Studio tasks; and the last page (its deadline)."""
    tasks: list[dict[str, Any]] = []
    token = ""
    while True:
        page = await stub.ListReviews(coordinator_pb2.ListReviewsRequest(job_id=job_id, page_size=200, page_token=token), timeout=timeout)
        tasks += [label_studio_task(item, job_id) for item in page.items]
        token = page.next_page_token
        if not token:
            return tasks, page


async def submit(stub: Any, job_id: str, decisions: list[Decided], timeout: float) -> tuple[dict[str, int], int]:
    """Sends the decisions; ({outcome in words: count}, items still awaiting review after the last call)."""
    outcomes: dict[str, int] = {}
    awaiting = 0
    for start in range(0, len(decisions), SUBMIT_BATCH):
        batch = decisions[start : start + SUBMIT_BATCH]
        request = coordinator_pb2.SubmitReviewsRequest(
            job_id=job_id,
            reviews=[coordinator_pb2.ItemReview(item_id=d.item_id, kept=d.kept, reviewer=d.reviewer, note=d.note) for d in batch],
        )
        response = await stub.SubmitReviews(request, timeout=timeout)
        for result in response.results:
            said = coordinator_pb2.ReviewOutcome.Name(result.outcome).removeprefix("REVIEW_OUTCOME_").lower().replace("_", " ")
            outcomes[said] = outcomes.get(said, 0) + 1
        awaiting = response.awaiting_review
    return outcomes, awaiting
