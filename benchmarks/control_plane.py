"""Control-plane scale: a job of 1,000,000 items through the real coordinator
(JobManager, JobContext, the constitutional recipe, export) and its real job
store, with a LOAD-TEST DOUBLE answering for the models
(benchmarks/loadtest_services.py), so that what is timed is the coordinator.

The same run measures the store in the tree ("current") and today's store
before issue 11's rebuild ("baseline", benchmarks/baseline_store.py), each in
its own process so that peak RSS is its own. The baseline writes one fsync per
result, so it runs on fewer items (--baseline-items) and is compared as rates.

Figures, per store:
- durable stage results per second: results whose put_result came back
  (committed), over the time from submission to the last one;
- event-loop lag: the drift of a 10 ms timer task, p99 and max;
- peak RSS of the process (VmHWM), after the job and at the end;
- Watch delay behind the store: for every result, the time from its commit to
  the first WatchJob event whose stage counts include it (p50, p99, max);
- StreamSamples(follow): a follower started with the job (records/s, and when
  its last record arrived, behind the job's last result), and a follower of the finished job
  (records/s over the whole stream);
- export time of the finished job (ExportJob: every table, lineage, manifest).

With --watch-only, the current store also runs the job with Watch alone
(no StreamSamples follower during it): a follower assembles and encodes every
record as the job writes it, which on one interpreter (the GIL) takes CPU from
the job itself; the two columns show what each costs. Targets are checked on
the run with the follower.

Targets (issue 11, on a 2-core machine): >= 20,000 durable results/s, loop lag
p99 <= 50 ms, RSS <= 1 GiB, Watch <= 1 s behind, export of 1M rows <= 60 s.
The input (one prompt per item) is generated into a temporary folder.

    .venv/bin/python -m benchmarks.control_plane [--items 1000000] [--baseline-items 5000]

(run from the repository root, as a module: it imports its siblings in benchmarks/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from autodidact.coordinator.jobs import JobManager
from autodidact.coordinator.recipes.base import Services
from autodidact.coordinator.service import Coordinator, CoordinatorServicer
from autodidact.coordinator.storage import TenantStorage
from autodidact.coordinator.store import JobStore, SqliteJobStore
from autodidact.coordinator.tenants import Tenants
from autodidact.runtime.component import Resource
from autodidact.runtime.server import settle_heap
from autodidact.v1 import coordinator_pb2
from benchmarks import baseline_store, loadtest_services

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "control_plane.json"
JOB_ID = "control-plane"
LAG_INTERVAL_S = 0.01
TERMINAL = (coordinator_pb2.JOB_STATE_SUCCEEDED, coordinator_pb2.JOB_STATE_FAILED, coordinator_pb2.JOB_STATE_CANCELLED)
# (figure, comparison, bound): what issue 11 asks of the current store.
TARGETS = {
    "durable_results_per_s": (">=", 20_000.0),
    "loop_lag_p99_ms": ("<=", 50.0),
    "peak_rss_mib": ("<=", 1024.0),
    "watch_delay_max_s": ("<=", 1.0),
    "export_s": ("<=", 60.0),
}


# --- glue to the coordinator's public API: one small function each, so a change of API touches one place ---


def open_store(kind: str, path: Path) -> JobStore:
    """The store under test: the tree's ("current") or today's before issue 11 ("baseline")."""
    if kind == "baseline":
        # Its rows are its own dataclasses (the same fields), so it is a JobStore by shape, not by type.
        return cast(JobStore, baseline_store.SqliteJobStore(path))
    return SqliteJobStore(path)


def start_manager(store: JobStore, services: Services, data_dir: Path) -> JobManager:
    # The prompts file is a server path under an input root the benchmark allows (no upload to time).
    return JobManager(store, services, TenantStorage(data_dir / "coordinator"), Tenants(shared_roots=(str(data_dir),)))


async def submit(manager: JobManager, job_id: str, spec: coordinator_pb2.JobSpec) -> None:
    await manager.submit(job_id, spec)


def watch(manager: JobManager, job_id: str) -> AsyncIterator[coordinator_pb2.Job]:
    return manager.watch(job_id)


async def stream_samples(manager: JobManager, store: JobStore, job_id: str) -> AsyncIterator[coordinator_pb2.StreamSamplesResponse]:
    """StreamSamples(follow) as a client gets it, through the servicer (no gRPC transport: it would time the network)."""

    async def opened() -> Coordinator:
        return Coordinator(store=store, channels=[], manager=manager, storage=TenantStorage(Path()), tenants=Tenants())

    coordinator = Resource("the job store", opened)
    await coordinator.load()
    request = coordinator_pb2.StreamSamplesRequest(job_id=job_id, follow=True, include_dropped=True)
    async for response in CoordinatorServicer(coordinator).StreamSamples(request, cast(Any, None)):
        yield response


async def export(manager: JobManager, job_id: str) -> list[coordinator_pb2.ExportedFile]:
    return await manager.export(job_id)


async def close(manager: JobManager, store: JobStore) -> None:
    await manager.close()
    await store.close()


# --- instruments ---


class CommitClock:
    """The store, with the time each stage result's write came back (it is then
    durable), in order: the k-th time is when the store held k results."""

    def __init__(self, store: JobStore) -> None:
        # Any: it wraps today's store too, whose put_result returns None where issue 11's returns a bool.
        self._store: Any = store
        self.times: array[float] = array("d")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def put_result(self, *args: Any, **kwargs: Any) -> Any:
        wrote = await self._store.put_result(*args, **kwargs)
        if wrote is not False:  # today's store returns None; issue 11's says whether it wrote
            self.times.append(time.perf_counter())
        return wrote


class LoopLag:
    """A timer task that sleeps LAG_INTERVAL_S and records how late it wakes."""

    def __init__(self) -> None:
        self.drifts: array[float] = array("d")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.drifts.append(max(0.0, time.perf_counter() - before - LAG_INTERVAL_S))

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def percentile(values: Any, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def peak_rss_mib() -> float:
    """The process's peak resident set so far: the larger of the kernel's two
    accounts of it (VmHWM and ru_maxrss, both KiB on Linux), which can differ by a few pages."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return max(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


async def watch_events(manager: JobManager, job_id: str) -> list[tuple[float, int, int]]:
    """(time, results the event counts, state) of every WatchJob event until the job ends."""
    events = []
    async for job in watch(manager, job_id):
        events.append((time.perf_counter(), sum(stage.done for stage in job.stages), int(job.state)))
    return events


def watch_delays(commits: array[float], events: list[tuple[float, int, int]]) -> list[float]:
    """For every result, the time from its commit to the first event that counts it."""
    delays = []
    event = 0
    for k, committed in enumerate(commits, 1):
        while event < len(events) and events[event][1] < k:
            event += 1
        if event == len(events):
            raise RuntimeError(f"no Watch event counted result {k:,} of {len(commits):,}")
        delays.append(events[event][0] - committed)
    return delays


async def follow(manager: JobManager, store: JobStore, job_id: str) -> tuple[int, float | None, float]:
    """(records, time of the first, time of the last) a StreamSamples(follow) client received."""
    count, first, last = 0, None, time.perf_counter()
    async for _ in stream_samples(manager, store, job_id):
        count += 1
        last = time.perf_counter()
        first = first if first is not None else last
    return count, first, last


async def no_follower() -> tuple[int, float | None, float]:
    return 0, None, time.perf_counter()


def write_prompts(path: Path, items: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for index in range(items):
            out.write(json.dumps({"prompt": f"Load-test prompt {index}: say it shorter."}) + "\n")


# --- one store's run, in its own process ---


async def measure(kind: str, items: int, in_flight: int, workdir: Path, store_dir: Path, follower_during_job: bool) -> dict[str, Any]:
    prompts = workdir / "prompts.jsonl"
    write_prompts(prompts, items)
    store = CommitClock(open_store(kind, store_dir / "jobs.sqlite"))
    manager = start_manager(cast(JobStore, store), loadtest_services.loadtest_services(), workdir)
    settle_heap()  # as a serving process does once it has loaded (runtime/server.py)
    lag = LoopLag()
    lag.start()
    spec = coordinator_pb2.JobSpec(
        constitutional=coordinator_pb2.ConstitutionalSpec(prompts_path=str(prompts), rounds=1),
        max_in_flight=in_flight,
        seed=1,
    )
    started = time.perf_counter()
    await submit(manager, JOB_ID, spec)
    watcher = asyncio.create_task(watch_events(manager, JOB_ID))
    # A StreamSamples(follow) client alongside the job (or none: the job with Watch only).
    follower = asyncio.create_task(follow(manager, cast(JobStore, store), JOB_ID) if follower_during_job else no_follower())
    events = await watcher
    ended = events[-1][0]
    state = events[-1][2]
    if state != coordinator_pb2.JOB_STATE_SUCCEEDED:
        job = await manager.get(JOB_ID)
        raise RuntimeError(f"the job ended {coordinator_pb2.JobState.Name(job.state)}: {job.error}")
    followed, _, follow_last = await follower
    job_lag = list(lag.drifts)
    rss_after_job = peak_rss_mib()

    export_started = time.perf_counter()
    files = await export(manager, JOB_ID)
    export_s = time.perf_counter() - export_started

    replay_started = time.perf_counter()
    replayed, _, replay_last = await follow(manager, cast(JobStore, store), JOB_ID)
    replay_s = replay_last - replay_started
    await lag.stop()
    await close(manager, cast(JobStore, store))

    commits = store.times
    delays = watch_delays(commits, events)
    last_commit = commits[-1]
    return {
        "store": kind,
        "follower_during_job": follower_during_job,
        "items": items,
        "in_flight": in_flight,
        "results": len(commits),
        "run_s": ended - started,
        "durable_results_per_s": len(commits) / (last_commit - started),
        "finish_after_last_result_s": ended - last_commit,
        "loop_lag_p99_ms": percentile(job_lag, 0.99) * 1000,
        "loop_lag_max_ms": max(job_lag, default=0.0) * 1000,
        "loop_lag_max_incl_export_ms": max(lag.drifts, default=0.0) * 1000,
        "peak_rss_after_job_mib": rss_after_job,
        "peak_rss_mib": peak_rss_mib(),
        "watch_events": len(events),
        "watch_delay_p50_s": percentile(delays, 0.5),
        "watch_delay_p99_s": percentile(delays, 0.99),
        "watch_delay_max_s": max(delays, default=0.0),
        "follow_records": followed,
        # Negative when the follower had everything before the job's end (its dataset is written last).
        "follow_behind_last_result_s": follow_last - last_commit,
        "follow_records_per_s": followed / (follow_last - started) if followed else 0.0,
        "replay_records": replayed,
        "replay_records_per_s": replayed / replay_s if replay_s > 0 else 0.0,
        "export_s": export_s,
        "export_rows": {f.kind: f.rows for f in files if f.kind.endswith("_jsonl")},
    }


def worker(kind: str, items: int, in_flight: int, store_parent: Path | None, result: Path, follower_during_job: bool) -> None:
    with (
        tempfile.TemporaryDirectory(prefix=f"control-plane-{kind}-") as workdir,
        tempfile.TemporaryDirectory(prefix=f"control-plane-store-{kind}-", dir=store_parent) as store_dir,
    ):
        figures = asyncio.run(measure(kind, items, in_flight, Path(workdir), Path(store_dir), follower_during_job))
    result.write_text(json.dumps(figures))


# --- the comparison ---


def run_worker(kind: str, items: int, in_flight: int, store_parent: Path | None, follower_during_job: bool = True) -> dict[str, Any]:
    """One store's figures, measured in a process of its own (its own peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="control-plane-result-") as folder:
        result = Path(folder) / "figures.json"
        command = [sys.executable, "-m", "benchmarks.control_plane", "--worker", kind, "--items", str(items), "--in-flight", str(in_flight)]
        command += ["--result", str(result)] + (["--store-dir", str(store_parent)] if store_parent else [])
        command += [] if follower_during_job else ["--no-follower"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        return cast(dict[str, Any], json.loads(result.read_text()))


def verdict(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = {}
    for name, (comparison, bound) in TARGETS.items():
        value = figures[name]
        met = value >= bound if comparison == ">=" else value <= bound
        checks[name] = {"value": value, "target": f"{comparison} {bound:g}", "met": met}
    return checks


def table(runs: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]]) -> str:
    names = [name for name in runs["current"] if name not in ("store", "export_rows", "follower_during_job")]
    kinds = list(runs)
    lines = [f"{'figure':<36}" + "".join(f"{kind:>16}" for kind in kinds) + f"{'target':>14}  met"]
    for name in names:
        cells = "".join(f"{runs[kind].get(name, float('nan')):>16,.3f}" for kind in kinds)
        check = checks.get(name)
        lines.append(f"{name:<36}{cells}" + (f"{check['target']:>14}  {'yes' if check['met'] else 'NO'}" if check else ""))
    for kind in kinds:
        lines.append(f"export rows ({kind}): {runs[kind]['export_rows']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="items of the job on the current store")
    parser.add_argument("--baseline-items", type=int, default=5_000, help="items on today's store (0: skip it); compared as rates")
    parser.add_argument("--in-flight", type=int, default=256, help="the job's max_in_flight (bounds [1, 256])")
    parser.add_argument(
        "--store-dir", type=Path, help="where the job store's file goes (default: the temporary folder); /dev/shm takes fsync out"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--worker", choices=("current", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-follower", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--watch-only", action="store_true", help="also run the current store with no StreamSamples follower during the job"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.items, args.in_flight, args.store_dir, args.result, not args.no_follower)
        return
    runs = {"current": run_worker("current", args.items, args.in_flight, args.store_dir)}
    if args.watch_only:
        runs["watch_only"] = run_worker("current", args.items, args.in_flight, args.store_dir, follower_during_job=False)
    if args.baseline_items:
        runs["baseline"] = run_worker("baseline", args.baseline_items, args.in_flight, args.store_dir)
    checks = verdict(runs["current"])
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "store_dir": str(args.store_dir) if args.store_dir else "a temporary folder",
        "targets": checks,
        "all_met": all(check["met"] for check in checks.values()),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(runs, checks))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
