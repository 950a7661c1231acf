"""A service refusing one document's Toolformer work drops that document, its
(document, tool) item and its calls with filter `error`; the other documents go
on. Run against deterministic DOUBLES of the tool-executor, scorer and generator
(the real services run in the integration and e2e tests)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from autodidact.coordinator.recipes import toolformer
from autodidact.coordinator.recipes.base import TooManyErrors
from autodidact.v1 import common_pb2, coordinator_pb2, generator_pb2, scorer_pb2, tool_executor_pb2
from tests.coordinator.recipes.harness import assert_lineage_agrees, job_context, run_recipe

DOCUMENTS = ["Tom had 3 apples and bought 4 more, so he had 7 apples.", "Ann paid 5 dollars for 2 pens and 3 dollars more, 8 dollars."]


def refused(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ToolsDouble:
    def __init__(self, refuse_text: str) -> None:
        self.refuse_text = refuse_text

    async def ListTools(self, request, timeout=None):
        spec = tool_executor_pb2.ToolSpec(
            name="Calculator", few_shot_prompt="Input: {text}\nOutput:", prompt_version="v1", takes_input=True
        )
        return tool_executor_pb2.ListToolsResponse(tools=[spec])

    async def ExecuteTools(self, request, timeout=None):
        results = []
        for call in request.calls:
            left, right = call.input.split("+")
            results.append(tool_executor_pb2.ToolResult(id=call.id, output=str(int(left) + int(right))))
        return tool_executor_pb2.ExecuteToolsResponse(results=results)


class ScorerDouble:
    """Offers one position per document; refuses to filter the document that holds `refuse_text`."""

    def __init__(self, refuse_text: str) -> None:
        self.refuse_text = refuse_text

    async def MarkerProbabilities(self, request, timeout=None):
        position = scorer_pb2.MarkerPosition(char_offset=request.text.index(",") + 1, token_index=5, probability=0.9)
        return scorer_pb2.MarkerProbabilitiesResponse(positions=[position], positions_considered=10)

    async def FilterToolCalls(self, request, timeout=None):
        if self.refuse_text in request.text:
            raise refused("text: refused by the double")
        decisions = [
            scorer_pb2.ToolCallDecision(
                id=c.id, keep=True, loss_with_result=1.0, loss_without_call=2.0, loss_minus=2.0, loss_without_result=2.0
            )
            for c in request.candidates
        ]
        return scorer_pb2.FilterToolCallsResponse(decisions=decisions)


class GeneratorDouble:
    async def Generate(self, request, timeout=None):
        samples = [common_pb2.Sample(text=f"Calculator({2 + i}+{3 + i})", seed=request.seed + i) for i in range(request.n)]
        return generator_pb2.GenerateResponse(samples=samples)


def params(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    spec = coordinator_pb2.ToolformerSpec(documents_path=str(path), tools=["Calculator"], positions_per_document=1, calls_per_position=2)
    return toolformer.Toolformer().resolve(spec, "job")


def run(tmp_path, refuse_text: str, max_error_fraction: float):
    services = {"tool_executor": ToolsDouble(refuse_text), "scorer": ScorerDouble(refuse_text), "generator": GeneratorDouble()}
    return run_recipe(tmp_path, services, toolformer.Toolformer(), params(tmp_path), max_error_fraction=max_error_fraction)


def test_a_refused_filter_drops_that_document_with_filter_error_and_the_others_go_on(tmp_path):
    summary, store = run(tmp_path, "Ann", max_error_fraction=0.5)
    assert summary == {"documents": 2, "augmented": 1}
    records = {r.item_id: r for r in assert_lineage_agrees(store, toolformer.Toolformer(), summary)}
    assert records["doc00000"].kept and not records["doc00001"].kept
    refused_items = sorted(i for i in records if i.startswith("doc00001"))
    assert len(refused_items) == 4  # the document, its (document, tool) item and its two calls
    for item_id in refused_items:
        stage, decision = records[item_id].lineage[-1]
        assert decision.filter == "error" and "text: refused by the double" in decision.reason, (item_id, stage, decision)


def test_more_refused_documents_than_the_budget_fail_the_job(tmp_path):
    with pytest.raises(TooManyErrors, match=re.escape("1 of 2 items errored, more than max_error_fraction 0.1")):
        run(tmp_path, "Ann", max_error_fraction=0.1)


class Counting:
    """Wraps a service DOUBLE and counts the calls of every method but ListTools (asked on every run)."""

    def __init__(self, double: object) -> None:
        self.double, self.calls = double, 0

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.double, name)

        async def counted(request: Any, timeout: float | None = None) -> Any:
            self.calls += name != "ListTools"
            return await method(request, timeout)

        return counted


def test_a_resumed_job_replays_every_stored_step_and_calls_no_service_again(tmp_path):
    summary, store = run(tmp_path, "no document holds this", max_error_fraction=0.1)
    before = asyncio.run(store.results("job"))
    services = {
        name: Counting(double)
        for name, double in {"tool_executor": ToolsDouble(""), "scorer": ScorerDouble("-"), "generator": GeneratorDouble()}.items()
    }
    again = asyncio.run(toolformer.Toolformer().run(job_context(store, services), params(tmp_path)))
    assert again == summary and asyncio.run(store.results("job")) == before
    assert {name: service.calls for name, service in services.items()} == {"tool_executor": 0, "scorer": 0, "generator": 0}
