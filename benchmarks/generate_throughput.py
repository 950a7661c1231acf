"""Tokens per second of Generate over gRPC against direct llama.cpp calls.

Both sides use the same model file, thread count, prompts (instructions of the
real Self-Instruct seed tasks), sampling parameters and seeds. The service
side is a real `autodidact serve generator` process called over loopback
gRPC; the direct side is llama-cpp-python's create_completion in this
process, as a user without autodidact would call it. Rounds alternate between
the two so that machine noise hits both alike; the ratio of median rates is
reported. Target: the service delivers at least 0.9 of the direct rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main, after the arguments are parsed
    from llama_cpp import Llama

    from autodidact.v1 import generator_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SEED_TASKS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def load_prompts(count: int) -> list[str]:
    path = Path(os.environ.get("AUTODIDACT_SEED_TASKS", SEED_TASKS))
    tasks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"Instruction: {task['instruction']}\nResponse:" for task in tasks[:count]]


def direct_round(llm: Llama, prompts: list[str], seeds: list[int], max_tokens: int, temperature: float) -> tuple[int, float]:
    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        for seed in seeds:
            out = llm.create_completion(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,
                seed=seed,
            )
            assert isinstance(out, dict)  # not streamed: one response, not an iterator of chunks
            tokens += out["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


async def service_round(
    stub: generator_pb2_grpc.GeneratorServiceAsyncStub, prompts: list[str], seeds: list[int], max_tokens: int, temperature: float
) -> tuple[int, float]:
    from autodidact.v1 import common_pb2, generator_pb2

    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        response = await stub.Generate(
            generator_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=prompt),
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature),
                n=len(seeds),
                seed=seeds[0],
            )
        )
        tokens += response.usage.completion_tokens
    return tokens, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("-n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from llama_cpp import Llama

    from autodidact.backends.llm.llamacpp import bundled_model_path
    from autodidact.client import wait_until_serving
    from autodidact.runtime.channels import create_channel
    from autodidact.v1 import generator_pb2_grpc

    prompts = load_prompts(args.prompts)
    seeds = list(range(1000, 1000 + args.n))
    model = bundled_model_path()
    direct = Llama(str(model), n_ctx=2048, n_threads=args.threads, verbose=False)
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "autodidact"),
            "serve",
            "generator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--threads",
            str(args.threads),
            "--log-level",
            "warning",
        ],
    )
    rates: dict[str, list[float]] = {"direct": [], "service": []}
    try:
        async with create_channel(f"127.0.0.1:{port}", timeout_seconds=600) as channel:
            await wait_until_serving(channel, timeout=120)
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            # Warm-up: page the model in on both sides.
            direct_round(direct, prompts[:1], seeds[:1], 8, args.temperature)
            await service_round(stub, prompts[:1], seeds[:1], 8, args.temperature)
            for round_ in range(args.rounds):
                for side in ("direct", "service") if round_ % 2 == 0 else ("service", "direct"):
                    if side == "direct":
                        tokens, seconds = direct_round(direct, prompts, seeds, args.max_tokens, args.temperature)
                    else:
                        tokens, seconds = await service_round(stub, prompts, seeds, args.max_tokens, args.temperature)
                    rates[side].append(tokens / seconds)
                    print(
                        f"round {round_ + 1} {side:8s} {tokens:5d} tokens in {seconds:6.2f} s = {tokens / seconds:6.1f} tok/s", flush=True
                    )
    finally:
        server.terminate()
        server.wait(timeout=60)

    direct_rate = statistics.median(rates["direct"])
    service_rate = statistics.median(rates["service"])
    ratio = service_rate / direct_rate
    result = {
        "model": model.name,
        "threads": args.threads,
        "prompts": len(prompts),
        "samples_per_prompt": args.n,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "direct_tokens_per_s": round(direct_rate, 1),
        "service_tokens_per_s": round(service_rate, 1),
        "ratio": round(ratio, 3),
        "target": 0.9,
        "met": ratio >= 0.9,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
