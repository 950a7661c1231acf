"""LOAD-TEST DOUBLE of the model services, for benchmarks/control_plane.py only.

In-process stand-ins for the gRPC stubs the coordinator calls (the critic's
Revise, the generator's GetModelInfo) that answer at once, so that a benchmark
job measures the coordinator and its store, not a model. The answers are
deterministic and small, shaped like the real ones (every field a recipe reads
is set). This module lives under benchmarks/ on purpose: nothing in services/
or the CLI can select it, so no deployment can run on it.

Each call yields to the event loop once, as a real gRPC call would, so the
coordinator's tasks interleave as they do in production.
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn, cast

from autodidact.coordinator.recipes.base import Services
from autodidact.v1 import common_pb2, critic_pb2, generator_pb2

MODEL = common_pb2.ModelInfo(backend="loadtest-double", model="loadtest-double", context_length=8192)
CONSTITUTION = critic_pb2.ConstitutionRef(name="loadtest-double", version="1")


class LoadTestCritic:
    """LOAD-TEST DOUBLE of CriticServiceStub: Revise answers at once with one
    round per requested round, each revising the previous response."""

    def __init__(self) -> None:
        self.calls = 0

    async def Revise(self, request: critic_pb2.ReviseRequest, timeout: float | None = None) -> critic_pb2.ReviseResponse:
        self.calls += 1
        await asyncio.sleep(0)  # a real call is awaited I/O: let other tasks run
        initial = f"draft {request.seed}"
        rounds = [
            critic_pb2.RevisionRound(
                principle="loadtest", critique="shorter", revision=f"revision {number} of {request.seed}", seed=request.seed
            )
            for number in range(1, request.rounds + 1)
        ]
        return critic_pb2.ReviseResponse(
            initial_response=initial,
            rounds=rounds,
            final_revision=rounds[-1].revision if rounds else initial,
            constitution=CONSTITUTION,
            seed=request.seed,
            model=MODEL,
        )


class LoadTestGenerator:
    """LOAD-TEST DOUBLE of GeneratorServiceStub: only GetModelInfo (the job
    manager asks it at submit); the benchmark recipe generates nothing."""

    async def GetModelInfo(
        self, request: generator_pb2.GetModelInfoRequest, timeout: float | None = None
    ) -> generator_pb2.GetModelInfoResponse:
        await asyncio.sleep(0)
        return generator_pb2.GetModelInfoResponse(model=MODEL, max_samples=64)


class Unused:
    """LOAD-TEST DOUBLE of a service the benchmark recipe never calls: any call fails loudly."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, method: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            raise AssertionError(f"the benchmark called {self._name}.{method}, which its load-test double does not answer")

        return refuse


def loadtest_services() -> Services:
    """The coordinator's Services with every stub a LOAD-TEST DOUBLE."""
    return Services(
        generator=cast(Any, LoadTestGenerator()),
        dedup=cast(Any, Unused("dedup")),
        scorer=cast(Any, Unused("scorer")),
        tool_executor=cast(Any, Unused("tool_executor")),
        critic=cast(Any, LoadTestCritic()),
        patience_seconds=1.0,
    )
