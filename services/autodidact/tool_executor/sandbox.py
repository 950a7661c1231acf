"""Worker processes that run tool code on untrusted input, with limits.

The calculator refuses everything expensive before computing it; the
sandbox is the second line in case a bound is wrong. Each worker is a
separate process (started by a forkserver: the service's own threads are
never forked) with an address-space limit and a CPU-time limit per task, and
every task has a hard wall-clock timeout after which its worker is killed and
replaced. A crash or a kill costs one call, never the service.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from autodidact.tool_executor.calculator import CalculatorError, Limits, calculate

TIMEOUT, CRASHED = "timeout", "crashed"


@dataclass(frozen=True)
class SandboxSettings:
    workers: int = 2
    timeout_seconds: float = 1.0
    memory_bytes: int = 256 * 2**20
    cpu_seconds_per_task: int = 2
    calculator: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class TaskOutcome:
    output: str | None = None
    error_kind: str = ""  # a CalculatorError kind, TIMEOUT or CRASHED
    error: str = ""


def _serve(conn: Connection, settings: SandboxSettings) -> None:  # pragma: no cover (runs in the worker)
    resource.setrlimit(resource.RLIMIT_AS, (settings.memory_bytes, settings.memory_bytes))
    while True:
        try:
            task, argument = conn.recv()
        except EOFError:
            return
        used = int(time.process_time())
        # RLIMIT_CPU counts the process's whole life, so each task gets a fresh allowance.
        resource.setrlimit(resource.RLIMIT_CPU, (used + settings.cpu_seconds_per_task, resource.RLIM_INFINITY))
        try:
            if task != "calculator":
                raise ValueError(f"unknown sandbox task {task!r}")
            conn.send(TaskOutcome(output=calculate(argument, settings.calculator)))
        except CalculatorError as exc:
            conn.send(TaskOutcome(error_kind=exc.kind, error=str(exc)))
        except MemoryError:
            conn.send(TaskOutcome(error_kind=CRASHED, error="ran out of memory"))


class _Worker:
    def __init__(self, context: Any, settings: SandboxSettings) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, settings), daemon=True, name="tool-sandbox")
        self.process.start()
        child.close()

    def call(self, task: str, argument: str, timeout: float) -> TaskOutcome:
        """Blocking; runs on a thread. Kills the worker when it does not answer in time."""
        try:
            self.conn.send((task, argument))
            if self.conn.poll(timeout):
                outcome: TaskOutcome = self.conn.recv()
                return outcome
            outcome = TaskOutcome(error_kind=TIMEOUT, error=f"no result within {timeout:g}s")
        except (EOFError, OSError):
            outcome = TaskOutcome(error_kind=CRASHED, error="the tool's worker process died (a resource limit?)")
        self.kill()
        return outcome

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and not self.conn.closed

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class Sandbox:
    """A pool of worker processes; `await sandbox.run("calculator", text)`."""

    def __init__(self, settings: SandboxSettings = SandboxSettings()) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("forkserver")
        self._idle: asyncio.Queue[_Worker] | None = None

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        workers = await asyncio.gather(*(asyncio.to_thread(self._new_worker) for _ in range(self._settings.workers)))
        for worker in workers:
            self._idle.put_nowait(worker)

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self._settings)

    async def run(self, task: str, argument: str) -> TaskOutcome:
        assert self._idle is not None, "Sandbox.start() was not awaited"
        worker = await self._idle.get()
        try:
            outcome = await asyncio.to_thread(worker.call, task, argument, self._settings.timeout_seconds)
        finally:
            if not worker.alive:
                worker = await asyncio.to_thread(self._new_worker)
            self._idle.put_nowait(worker)
        return outcome

    async def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            worker = self._idle.get_nowait()
            await asyncio.to_thread(worker.kill)
