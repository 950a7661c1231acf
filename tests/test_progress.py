"""`autodidact run`'s progress display: plain lines off a terminal, rich bars on one."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from autodidact.progress import JobProgress, StderrRelay, progress_line
from autodidact.runner import follow
from autodidact.v1 import coordinator_pb2

RUNNING = coordinator_pb2.JOB_STATE_RUNNING
SUCCEEDED = coordinator_pb2.JOB_STATE_SUCCEEDED


def stage(name: str, done: int, kept: int, total: int | None = None) -> coordinator_pb2.StageProgress:
    progress = coordinator_pb2.StageProgress(stage=name, done=done, kept=kept)
    if total is not None:
        progress.total = total
    return progress


def job(*stages: coordinator_pb2.StageProgress, state: Any = RUNNING, awaiting_review: int = 0) -> coordinator_pb2.Job:
    return coordinator_pb2.Job(id="j", state=state, stages=stages, awaiting_review=awaiting_review)


SELF_INSTRUCT = job(
    stage("generate_instructions", 18, 18),
    stage("heuristics", 18, 18),
    stage("diversity", 18, 15),
    stage("classify", 11, 11),
    stage("instances", 10, 3),
    stage("dataset", 3, 3, total=5),
)


def test_plain_lines_keep_their_format():
    # The format docs/jobs.md shows and scripts read: the dataset's bar first, then kept/decided per stage.
    assert progress_line(SELF_INSTRUCT) == (
        "[############........] 3/5 kept  generate_instructions 18/18  heuristics 18/18  diversity 15/18  classify 11/11  instances 3/10"
    )
    assert progress_line(job()) == "starting"
    assert progress_line(job(stage("paths", 2, 1), stage("vote", 1, 0))) == "paths 1/2  vote 0/1"


def test_items_awaiting_review_are_said_on_the_plain_line():
    assert progress_line(job(stage("paths", 2, 1), awaiting_review=4)) == "paths 1/2  4 awaiting review"


def test_off_a_terminal_each_event_is_one_plain_line(monkeypatch):
    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", stderr)
    events = [job(), job(stage("paths", 1, 1)), SELF_INSTRUCT]
    with JobProgress() as progress:
        assert not progress.is_terminal
        for event in events:
            progress.update(event)
    assert stderr.getvalue() == "".join(progress_line(event) + "\n" for event in events)
    assert "\r" not in stderr.getvalue() and "\x1b" not in stderr.getvalue()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120, color_system=None), screen


def test_on_a_terminal_a_stage_with_a_total_shows_a_bar_its_rate_and_time_remaining():
    console, screen = terminal()
    clock = Clock()
    with JobProgress(console=console, get_time=clock) as progress:
        assert progress.is_terminal
        for second, done in enumerate([0, 2, 4]):
            clock.now = float(second)
            progress.update(job(stage("paths", 3 * done, done), stage("dataset", done, done, total=10)))
    shown = screen.getvalue()
    assert "━" in shown
    # 2 items a second over the last two seconds; 6 items left: 3 s.
    last = shown.rsplit("dataset", 1)[1].splitlines()[0]
    assert "4/10" in last and "2.00/s" in last and "0:00:03" in last, last
    # A stage without a total: its count and rate, no time remaining.
    paths = shown.rsplit("paths", 1)[1].splitlines()[0]
    assert "4/12 kept" in paths and "12/?" in paths and "6.00/s" in paths and ":" not in paths, paths


def test_on_a_terminal_a_finished_job_fills_the_bars_of_stages_without_a_total():
    console, screen = terminal()
    with JobProgress(console=console, get_time=Clock()) as progress:
        progress.update(job(stage("paths", 3, 2)))
        progress.update(job(stage("paths", 5, 4), state=SUCCEEDED))
    assert "5/5" in screen.getvalue().rsplit("paths", 1)[1]


def test_on_a_terminal_items_awaiting_review_are_said_under_the_bars():
    console, screen = terminal()
    with JobProgress(console=console, get_time=Clock()) as progress:
        progress.update(job(stage("paths", 3, 2), awaiting_review=7))
    assert "7 awaiting review" in screen.getvalue()


def test_the_relay_prints_what_is_written_to_the_descriptor_through_the_console(tmp_path: Path):
    # A file stands for the terminal: what is written to its descriptor arrives through the console.
    with (tmp_path / "terminal").open("w+b") as terminal_file:
        fd = terminal_file.fileno()
        relay = StderrRelay(fd)
        console = Console(file=relay.terminal, force_terminal=False)
        relay.start(console)
        os.write(fd, b"a log line\nanother, cut")
        relay.stop()
        os.write(fd, b"\nafter\n")  # the descriptor is the file again
        assert (tmp_path / "terminal").read_text() == "a log line\nanother, cut\n\nafter\n"


class Stub:
    """WatchJob of a coordinator: the job as it changes, then done."""

    def __init__(self, events: list[coordinator_pb2.Job]) -> None:
        self.events = events

    def WatchJob(self, request: coordinator_pb2.WatchJobRequest, timeout: float) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        async def stream() -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
            for event in self.events:
                yield coordinator_pb2.WatchJobResponse(job=event)

        return stream()


EVENTS = [job(stage("paths", 1, 1)), job(stage("paths", 2, 1), stage("vote", 1, 0), state=SUCCEEDED)]


@pytest.mark.asyncio
async def test_run_follows_the_job_with_plain_lines_when_stderr_is_not_a_terminal(capsys):
    final = await follow(Stub(EVENTS), job(), "j", show_progress=True)
    assert final == EVENTS[-1]
    assert capsys.readouterr().err == "paths 1/1\npaths 1/2  vote 0/1\n"


@pytest.mark.asyncio
async def test_run_quiet_shows_no_progress(capsys):
    final = await follow(Stub(EVENTS), job(), "j", show_progress=False)
    assert final == EVENTS[-1]
    assert capsys.readouterr().err == ""
