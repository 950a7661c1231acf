"""Adaptive concurrency per stage (issue 13, part 5): a job's stage against a
generator that takes fewer calls at once than the job would send, with the
stage's adaptive (AIMD) limit against fixed limits, in the same run.

The generator is a DOUBLE (a servicer that answers every Generate after a
fixed latency, no model) behind the real server interceptors, whose bound on
calls in progress (`--server-calls`) answers one more RESOURCE_EXHAUSTED at
once, as a real server does. The job side is the real JobContext, store and
retries: each item is one `generate` stage of one Generate call.

- fixed n: max_in_flight n and a limit that never moves; a refused call backs
  off 0.5 s doubling to 10 s (the behaviour before adaptive limits);
- adaptive: max_in_flight `--max-in-flight` (above the server's bound), the
  stage's limit adapting with the shipped decrease factor, and with others
  given by `--decrease` for comparison.

Figures per setting: items/s, its ratio to the best fixed setting, calls sent
per item (refused ones included), items failed, the limit at the end.
Target (issue 13): adaptive >= 0.9 of the best fixed setting, no item failed.

    .venv/bin/python benchmarks/adaptive_concurrency.py [--items 320] [--latency 0.05] [--server-calls 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import structlog

from autodidact.coordinator.concurrency import DECREASE, AimdLimit
from autodidact.coordinator.recipes.base import Decision, JobContext, Services, StageResult
from autodidact.coordinator.store import SqliteJobStore
from autodidact.runtime.interceptors import server_interceptors
from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc

STAGE = "generate"
FIXED = (1, 2, 4, 8, 16, 32)


class GeneratorDouble(generator_pb2_grpc.GeneratorServiceServicer):
    """DOUBLE of the generator: every Generate answers after `latency` seconds."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def Generate(self, request: generator_pb2.GenerateRequest, context: Any) -> generator_pb2.GenerateResponse:
        await asyncio.sleep(self.latency)
        return generator_pb2.GenerateResponse(samples=[common_pb2.Sample(text=request.prompt.text)])

    async def GetModelInfo(self, request: generator_pb2.GetModelInfoRequest, context: Any) -> generator_pb2.GetModelInfoResponse:
        return generator_pb2.GetModelInfoResponse()  # not called here: Generate is what is measured


async def run_job(folder: Path, stub: Any, items: int, max_in_flight: int, decrease: float | None) -> dict[str, Any]:
    """One job of `items` items; `decrease` None: a fixed limit of max_in_flight."""
    name = f"{max_in_flight}-{decrease}"
    store = SqliteJobStore(folder / f"{name}.sqlite")
    services = Services(stub, None, None, None, None, patience_seconds=120)  # type: ignore[arg-type]  # only the generator is called
    adaptive = decrease is not None
    ctx = JobContext(name, 0, store, services, max_in_flight, lambda: None, max_error_fraction=0.0, fresh=True, adaptive=adaptive)
    if decrease is not None and decrease != DECREASE:
        ctx.limits[STAGE] = AimdLimit(max_in_flight, decrease=decrease)  # another factor, for comparison
    calls = 0

    async def work(index: int) -> bool:
        request = generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=f"item {index}"))

        async def generate() -> generator_pb2.GenerateResponse:
            nonlocal calls
            calls += 1
            response: generator_pb2.GenerateResponse = await stub.Generate(request, timeout=30)
            return response

        async def compute() -> StageResult:
            response = await ctx.call(generate, "generator (double)")
            return StageResult({"text": response.samples[0].text}, Decision(True))

        result = await ctx.stage(f"i{index}", STAGE, compute)
        return bool(result.decision and result.decision.kept)

    started = time.perf_counter()
    kept = await ctx.each_item(items, work)
    seconds = time.perf_counter() - started
    await store.close()
    return {
        "setting": f"adaptive (decrease {decrease:g})" if adaptive else f"fixed {max_in_flight}",
        "max_in_flight": max_in_flight,
        "decrease": decrease,
        "seconds": round(seconds, 3),
        "items_per_second": round(items / seconds, 1),
        "calls_per_item": round(calls / items, 2),
        "failed_items": items - sum(kept),
        "final_limit": ctx.limits[STAGE].limit,
    }


async def scenario(args: argparse.Namespace, server_calls: int) -> dict[str, Any]:
    server = grpc.aio.server(interceptors=server_interceptors(max_calls=server_calls))
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorDouble(args.latency), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runs = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            with tempfile.TemporaryDirectory() as folder:
                for n in args.fixed:
                    runs.append(await run_job(Path(folder), stub, args.items, n, None))
                    print(runs[-1], flush=True)
                for decrease in dict.fromkeys([DECREASE, *args.decrease]):
                    runs.append(await run_job(Path(folder), stub, args.items, args.max_in_flight, decrease))
                    print(runs[-1], flush=True)
    finally:
        await server.stop(0)
    best = max((run for run in runs if run["decrease"] is None), key=lambda run: run["items_per_second"])
    for run in runs:
        run["ratio_to_best_fixed"] = round(run["items_per_second"] / best["items_per_second"], 3)
    shipped = next(run for run in runs if run["decrease"] == DECREASE)
    return {
        "server_calls": server_calls,
        "ideal_items_per_second": round(server_calls / args.latency, 1),
        "best_fixed": best["setting"],
        "adaptive_ratio_to_best_fixed": shipped["ratio_to_best_fixed"],
        "target_met": shipped["ratio_to_best_fixed"] >= 0.9 and shipped["failed_items"] == 0,
        "runs": runs,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = [await scenario(args, server_calls) for server_calls in args.server_calls]
    return {
        "benchmark": "adaptive_concurrency",
        "items": args.items,
        "latency_seconds": args.latency,
        "max_in_flight": args.max_in_flight,
        "shipped_decrease": DECREASE,
        "scenarios": scenarios,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=320)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the double takes per call")
    parser.add_argument("--server-calls", type=int, nargs="+", default=[4, 16], help="the server's bound on calls in progress")
    parser.add_argument("--max-in-flight", type=int, default=32, help="the adaptive job's max_in_flight")
    parser.add_argument("--fixed", type=int, nargs="+", default=list(FIXED))
    parser.add_argument("--decrease", type=float, nargs="*", default=[0.5], help="other decrease factors to compare")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaptive_concurrency.json")
    args = parser.parse_args()
    # Every refused call logs a line (and each backoff a warning); the figures are what this run is for.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    report = asyncio.run(main(args))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for found in report["scenarios"]:
        print(
            f"server bound {found['server_calls']}: adaptive {found['adaptive_ratio_to_best_fixed']:.2f} of the best fixed "
            f"({found['best_fixed']}); target met: {found['target_met']}"
        )
