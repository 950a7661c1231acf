"""How `autodidact run` shows a job's progress while it follows it.

On a terminal: a rich progress display, one bar per stage as stages start
deciding items, with the stage's counts, its rate and, when its total is
known, the time remaining. Anywhere else (a file, a pipe, a CI log): one
plain line per WatchJob event, the format scripts and logs have always read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from autodidact.v1 import coordinator_pb2

# Items come seconds to minutes apart on a CPU: rich's default 30 s window would often hold
# a single sample, which gives no rate at all.
SPEED_WINDOW_SECONDS = 300.0


def progress_line(job: coordinator_pb2.Job) -> str:
    """The job's progress as one plain line: the dataset's bar first (kept of
    its target), then each stage's kept/decided, then any items awaiting review."""
    parts: list[str] = []
    for stage in job.stages:
        if stage.stage == "dataset" and stage.HasField("total"):
            done = min(stage.kept, stage.total)
            filled = int(20 * done / max(stage.total, 1))
            parts.insert(0, f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{stage.total} kept")
        else:
            parts.append(f"{stage.stage} {stage.kept}/{stage.done}")
    if job.awaiting_review:
        parts.append(awaiting_review(job))
    return "  ".join(parts) or "starting"


def awaiting_review(job: coordinator_pb2.Job) -> str:
    return f"{job.awaiting_review} awaiting review"


class RateColumn(ProgressColumn):
    """Items decided per second (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?/s" if speed is None else f"{speed:.2f}/s", style="progress.data.speed")


class _StageBars(Progress):
    """rich's Progress with a note under the bars (items awaiting review)."""

    note = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.note:
            yield Text(self.note, style="yellow")


def stage_bars(console: Console, get_time: Callable[[], float] | None = None) -> _StageBars:
    """The display: each stage's name and kept/decided, a bar (pulsing while
    its total is unknown), decided/total, rate and time remaining."""
    return _StageBars(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[kept]}", style="green"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(elapsed_when_finished=True),
        console=console,
        get_time=get_time,
        speed_estimate_period=SPEED_WINDOW_SECONDS,
    )


class StderrRelay:
    """Prints what the process writes to its stderr file descriptor above the
    bars, while they are on screen.

    rich moves the cursor up over its last frame to draw the next one, so a
    line written to the terminal behind its back is overwritten or leaves a
    torn frame. C libraries in this process (llama.cpp, gRPC core) and the
    sandbox's child processes write to the descriptor itself, where rich's own
    redirection of sys.stderr cannot see them: so the descriptor goes to a
    pipe, and a thread prints each line through the bars' console (the
    services' structlog lines, written to sys.stderr, arrive the same way).
    """

    def __init__(self, fd: int = 2, encoding: str = "utf-8") -> None:
        self._fd = fd
        self._encoding = encoding
        self._saved = os.dup(fd)
        # The bars draw on a copy of the terminal's descriptor, which the redirection leaves alone.
        self.terminal = os.fdopen(os.dup(fd), "w", encoding=encoding, errors="replace")
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._read = read
        self._thread: threading.Thread | None = None

    def start(self, console: Console) -> None:
        self._thread = threading.Thread(target=self._relay, args=(console,), name="stderr-relay", daemon=True)
        self._thread.start()

    def _relay(self, console: Console) -> None:
        with os.fdopen(self._read, "rb") as pipe:
            for line in pipe:
                try:
                    console.print(Text.from_ansi(line.decode(self._encoding, "replace").rstrip("\n")), soft_wrap=True)
                except Exception:  # the terminal went away (a dropped SSH session): keep draining, or writers to fd 2 block
                    with contextlib.suppress(OSError):
                        os.write(self.terminal.fileno(), line)  # closed only once this thread ended

    def stop(self) -> None:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved, self._fd)  # closes the pipe's last writer: the thread reads the rest, then the end
        os.close(self._saved)
        if self._thread is not None:
            # A child process that inherited the pipe keeps it open: the thread then ends with the process.
            self._thread.join(timeout=2)
        if self._thread is None or not self._thread.is_alive():
            self.terminal.close()


class JobProgress:
    """Shows a job's progress from its WatchJob events, as a context manager:
    `with JobProgress() as progress: ... progress.update(job)`.

    By default it writes to stderr: bars when it is a terminal, plain lines
    otherwise. `stream` replaces stderr, always with plain lines; `console`
    (a rich Console) always gets the bars (tests force a terminal with it).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        console: Console | None = None,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        self._stream = stream or sys.stderr
        self._terminal = console is not None or (stream is None and self._stream.isatty())
        self._console = console
        self._get_time = get_time
        self._relay: StderrRelay | None = None
        self._bars: _StageBars | None = None
        self._tasks: dict[str, Task] = {}

    @property
    def is_terminal(self) -> bool:
        return self._terminal

    def __enter__(self) -> JobProgress:
        if not self._terminal:
            return self
        console = self._console
        if console is None:
            self._stream.flush()
            try:
                self._relay = StderrRelay(self._stream.fileno(), getattr(self._stream, "encoding", None) or "utf-8")
            except (OSError, ValueError):  # a terminal-like stream without a descriptor (an IDE's console)
                console = Console(file=self._stream)
            else:
                console = Console(file=self._relay.terminal)
        try:
            self._bars = stage_bars(console, self._get_time)
            self._bars.start()
            if self._relay is not None:
                self._relay.start(console)
        except BaseException:
            self.__exit__(None, None, None)  # stderr back to the terminal
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        try:
            if self._bars is not None:
                # The bars stay on screen as the job's last state; what follows prints below them.
                self._bars.stop()
        finally:
            if self._relay is not None:
                self._relay.stop()

    def update(self, job: coordinator_pb2.Job) -> None:
        if self._bars is None:
            if not self._terminal:
                print(progress_line(job), file=self._stream, flush=True)
            return
        finished = job.state == coordinator_pb2.JOB_STATE_SUCCEEDED
        for stage in job.stages:
            total: float | None = stage.total if stage.HasField("total") else None
            if total is None and finished:
                # A job that succeeded has decided all it will: a stage without a known
                # total is complete rather than pulsing on.
                total = stage.done
            kept = f"{stage.kept}/{stage.done} kept"
            task = self._tasks.get(stage.stage)
            if task is None:
                task_id = self._bars.add_task(stage.stage, total=total, completed=stage.done, kept=kept)
                self._tasks[stage.stage] = next(t for t in self._bars.tasks if t.id == task_id)
                continue
            # Set here rather than through update(): rich forgets a task's rate samples when
            # its total changes, and a total grows as a run decides past its target.
            task.total = total
            self._bars.update(task.id, completed=stage.done, kept=kept)
        self._bars.note = awaiting_review(job) if job.awaiting_review else ""
        self._bars.refresh()
