"""Jobs over six separate service processes against the same services in one process.

The same jobs, with the same specs and seeds, run on two deployments of the
real services with the embedded models:

- "one process": `autodidact up`, which hosts all six services in one process
  (they still call each other over loopback gRPC);
- "six processes": one `autodidact serve <service>` process per service, as
  Kubernetes runs them, wired by --<service>-target flags.

Each side is started fresh (its own data folder), waited for until every
service is SERVING (models loaded), then the jobs are submitted one after
another through the coordinator; a job's time runs from SubmitJob until it has
SUCCEEDED. Throughput is items decided per second (the stage counters summed
over the job's stages). Rounds alternate between the sides so that machine
noise hits both alike; the ratio of the median rates is reported.
Target: six processes deliver at least 0.9 of one process's throughput.

Jobs: a Toolformer job (coordinator, generator, scorer, tool-executor), a
Self-Instruct job (coordinator, generator, dedup) and a Constitutional job
(coordinator, critic, and through it generator and scorer): together they
cross every service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, after the arguments are parsed
    from autodidact.v1.coordinator_pb2 import JobSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
SERVICES = ("generator", "scorer", "critic", "tool-executor", "dedup", "coordinator")
# Each service's own flags: the models' threads (two cores: each model process may use both).
PROMPTS = ("How do I pick a lock?", "Write a rude reply to my neighbour.", "Is it safe to eat raw flour?")
COMMON = ["--insecure", "--host", "127.0.0.1", "--metrics-port", "0", "--threads", "2", "--embed-threads", "2", "--log-format", "json"]


def toolformer() -> JobSpec:
    from autodidact.v1 import coordinator_pb2

    job = coordinator_pb2.JobSpec(seed=4, max_in_flight=4)
    job.toolformer.documents_path = str(EXAMPLES / "gsm8k_train_300.jsonl")
    job.toolformer.max_documents = 4
    job.toolformer.tools.append("Calculator")
    job.toolformer.positions_per_document = 2
    job.toolformer.calls_per_position = 2
    return job


def self_instruct() -> JobSpec:
    from autodidact.v1 import common_pb2, coordinator_pb2

    return coordinator_pb2.JobSpec(
        seed=3,
        max_in_flight=4,
        self_instruct=coordinator_pb2.SelfInstructSpec(
            seed_tasks_path=str(EXAMPLES / "self_instruct_seed_tasks.jsonl"),
            target_instructions=4,
            max_rounds=8,
            instruction_sampling=common_pb2.SamplingParams(max_tokens=160),
            instance_sampling=common_pb2.SamplingParams(max_tokens=96),
        ),
    )


def constitutional(prompts: Path) -> Callable[[], JobSpec]:
    def spec() -> JobSpec:
        from autodidact.v1 import common_pb2, coordinator_pb2

        return coordinator_pb2.JobSpec(
            seed=5,
            max_in_flight=4,
            constitutional=coordinator_pb2.ConstitutionalSpec(
                prompts_path=str(prompts), rounds=1, judged_pairs=True, sampling=common_pb2.SamplingParams(max_tokens=48), min_margin=0
            ),
        )

    return spec


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [int(probe.getsockname()[1]) for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports nobody listens on (`up --base-port`)."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20_000, 60_000)
        probes = []
        try:
            for offset in range(count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def start_one_process(data: Path, inputs: list[str]) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    from autodidact.stack import shifted_ports

    base = consecutive_free_ports(len(SERVICES))
    ports = shifted_ports(base)
    command = [AUTODIDACT, "up", "--base-port", str(base), "--data-dir", str(data), *inputs, *COMMON]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [process], [f"127.0.0.1:{ports[name]}" for name in reversed(SERVICES)]


def start_six_processes(data: Path, inputs: list[str]) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    targets = [a for name in SERVICES if name != "coordinator" for a in (f"--{name}-target", f"127.0.0.1:{ports[name]}")]
    processes = []
    for name in SERVICES:
        extra = ["--data-dir", str(data / name)]
        if name in ("coordinator", "critic", "tool-executor"):
            extra += targets  # the callers get every neighbour's address
        if name == "coordinator":
            extra += inputs
        command = [AUTODIDACT, "serve", name, "--port", str(ports[name]), *COMMON, *extra]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return processes, [f"127.0.0.1:{ports[name]}" for name in reversed(SERVICES)]


async def run_jobs(targets: list[str], specs: dict[str, Callable[[], JobSpec]]) -> dict[str, dict[str, float]]:
    """Waits until every service (the coordinator first in `targets`) is SERVING, its model
    loaded, then submits each job in turn; {job: {"seconds", "items"}} once each has SUCCEEDED."""
    from autodidact.client import wait_until_serving
    from autodidact.runtime.channels import create_channel
    from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc

    figures: dict[str, dict[str, float]] = {}
    for target in targets[1:]:  # model loading is not part of a job's time
        async with create_channel(target, timeout_seconds=60) as neighbour:
            await wait_until_serving(neighbour, timeout=900)
    async with create_channel(targets[0], timeout_seconds=3600) as channel:
        await wait_until_serving(channel, timeout=900)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        for name, spec in specs.items():
            started = time.perf_counter()
            await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id=name, spec=spec()))
            events = [event.job async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=name), timeout=3600)]
            seconds = time.perf_counter() - started
            job = events[-1]
            if job.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"job {name} ended {coordinator_pb2.JobState.Name(job.state)}: {job.error}")
            figures[name] = {"seconds": seconds, "items": float(sum(stage.done for stage in job.stages))}
    return figures


def one_run(side: str, specs: dict[str, Callable[[], JobSpec]], inputs: list[str]) -> dict[str, dict[str, float]]:
    data = Path(tempfile.mkdtemp(prefix=f"autodidact-e2e-{side.replace(' ', '-')}-"))
    start = start_one_process if side == "one process" else start_six_processes
    processes, targets = start(data, inputs)
    try:
        return asyncio.run(run_jobs(targets, specs))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    parser.add_argument("--jobs", default="toolformer,self-instruct,constitutional", help="which jobs, comma-separated (default all three)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "end_to_end.json")
    args = parser.parse_args()

    inputs_dir = Path(tempfile.mkdtemp(prefix="autodidact-e2e-inputs-"))
    prompts = inputs_dir / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ("How do I pick a lock?", "Write a rude reply to my neighbour.", "Is it safe to eat raw flour?")
        )
    )
    specs: dict[str, Callable[[], JobSpec]] = {
        "toolformer": toolformer,
        "self-instruct": self_instruct,
        "constitutional": constitutional(prompts),
    }
    unknown = set(args.jobs.split(",")) - set(specs)
    if unknown:
        parser.error(f"--jobs: unknown {sorted(unknown)}; choose from {sorted(specs)}")
    specs = {name: spec for name, spec in specs.items() if name in args.jobs.split(",")}
    inputs = ["--input-root", str(EXAMPLES), "--input-root", str(inputs_dir)]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"one process": [], "six processes": []}
    for round_number in range(args.rounds):
        for side in ("one process", "six processes") if round_number % 2 == 0 else ("six processes", "one process"):
            figures = one_run(side, specs, inputs)
            runs[side].append(figures)
            total_items = sum(f["items"] for f in figures.values())
            total_seconds = sum(f["seconds"] for f in figures.values())
            print(
                f"round {round_number + 1} {side}: {total_items:.0f} items in {total_seconds:.1f} s ({total_items / total_seconds:.2f}/s)",
                flush=True,
            )

    def rate(figures: dict[str, dict[str, float]]) -> float:
        return sum(f["items"] for f in figures.values()) / sum(f["seconds"] for f in figures.values())

    medians = {side: statistics.median(rate(figures) for figures in runs[side]) for side in runs}
    ratio = medians["six processes"] / medians["one process"]
    result = {
        "jobs": sorted(specs),
        "rounds": args.rounds,
        "items_per_second": medians,
        "ratio_six_to_one": ratio,
        "target": 0.9,
        "met": ratio >= 0.9,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"six processes / one process: {ratio:.3f} (target >= 0.9): {'met' if ratio >= 0.9 else 'NOT met'}")
    shutil.rmtree(inputs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
