"""The tool-executor over real gRPC: its sandbox, search, and the generator behind QA."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import pytest_asyncio

from autodidact.runtime.channels import create_channel
from autodidact.tool_executor.calculator import Limits
from autodidact.tool_executor.sandbox import Sandbox, SandboxSettings
from autodidact.v1 import tool_executor_pb2 as te
from autodidact.v1 import tool_executor_pb2_grpc
from tests.conftest import details_of
from tests.stack import start_stack
from tests.tool_executor.test_calculator import ESCAPES, EXHAUSTIONS

pytestmark = pytest.mark.asyncio(loop_scope="module")
E = te.ToolErrorCode


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tools(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tools")
    stack = await start_stack(data_dir, ("generator", "tool-executor"))
    async with create_channel(stack.target("tool-executor")) as channel:
        yield tool_executor_pb2_grpc.ToolExecutorServiceStub(channel), stack, data_dir
    await stack.stop()


def calls(*pairs: tuple[str, str], **context: str) -> te.ExecuteToolsRequest:
    return te.ExecuteToolsRequest(
        calls=[te.ToolCall(id=f"c{i}", tool=tool, input=text) for i, (tool, text) in enumerate(pairs)],
        context=te.ToolContext(**context),
    )


async def test_every_escape_and_exhaustion_is_a_typed_error_within_100ms_and_the_service_keeps_serving(tools):
    stub, _, _ = tools
    await stub.ExecuteTools(calls(("Calculator", "1 + 1")))  # connects the channel; not part of any call's time
    for expression in ESCAPES + EXHAUSTIONS:
        text = expression[:4096]
        started = time.perf_counter()
        response = await stub.ExecuteTools(calls(("Calculator", text)))
        elapsed = time.perf_counter() - started
        result = response.results[0]
        assert result.WhichOneof("outcome") == "error", expression
        assert result.error.code in (E.TOOL_ERROR_CODE_PARSE, E.TOOL_ERROR_CODE_NOT_ALLOWED, E.TOOL_ERROR_CODE_TOO_LARGE), expression
        assert elapsed < 0.1, (expression[:40], elapsed)
        ok = await stub.ExecuteTools(calls(("Calculator", "400 / 1400")))
        assert ok.results[0].output == "0.29"


async def test_a_batch_mixes_results_and_errors_in_order(tools):
    stub, _, _ = tools
    response = await stub.ExecuteTools(
        calls(
            ("Calculator", "48/2"),
            ("Calculator", "1/0"),
            ("Nope", "1"),
            ("Calendar", ""),
            ("Calendar", "today"),
            reference_date="2023-03-09",
        )
    )
    outcomes = [r.output if r.WhichOneof("outcome") == "output" else E.Name(r.error.code) for r in response.results]
    assert outcomes == [
        "24",
        "TOOL_ERROR_CODE_UNDEFINED",
        "TOOL_ERROR_CODE_UNKNOWN_TOOL",
        "Thursday, March 9, 2023",
        "TOOL_ERROR_CODE_PARSE",
    ]
    assert [r.id for r in response.results] == ["c0", "c1", "c2", "c3", "c4"]


async def test_search_finds_the_document_and_survives_a_restart(tools):
    stub, _, data_dir = tools
    documents = [
        te.Document(id="paris", text="Paris is the capital and largest city of France."),
        te.Document(id="nile", text="The Nile is a major river in northeastern Africa."),
        te.Document(id="everest", text="Mount Everest is Earth's highest mountain above sea level."),
    ]
    indexed = await stub.IndexDocuments(te.IndexDocumentsRequest(collection="facts", documents=documents))
    assert indexed.collection_size == 3
    response = await stub.ExecuteTools(calls(("Search", "highest mountain"), ("Search", "zzyzx qwerty"), collection="facts"))
    assert response.results[0].output.startswith("Mount Everest")
    assert response.results[1].error.code == E.TOOL_ERROR_CODE_UNDEFINED
    # A new tool-executor on the same data dir still has the collection.
    restarted = await start_stack(data_dir, ("tool-executor",))
    try:
        async with create_channel(restarted.target("tool-executor")) as channel:
            again = await tool_executor_pb2_grpc.ToolExecutorServiceStub(channel).ExecuteTools(
                calls(("Search", "capital of France"), collection="facts")
            )
        assert again.results[0].output.startswith("Paris")
    finally:
        await restarted.stop()


async def test_qa_asks_the_generator_with_the_retrieved_passage(tools):
    stub, _, _ = tools
    response = await stub.ExecuteTools(calls(("QA", "What is the capital of France?"), ("MT", "bonjour"), collection="facts"))
    for result in response.results:
        assert result.WhichOneof("outcome") == "output" and result.output.strip(), result


async def test_list_tools_gives_prompts_with_the_document_placeholder(tools):
    stub, _, _ = tools
    listed = await stub.ListTools(te.ListToolsRequest())
    names = [t.name for t in listed.tools]
    assert names == ["Calculator", "Calendar", "Search", "QA", "MT"]
    for tool in listed.tools:
        assert tool.few_shot_prompt.count("{text}") == 1 and tool.prompt_version


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (te.ExecuteToolsRequest(), "calls"),
        (calls(*[("Calculator", "1")] * 257), "calls"),
        (te.ExecuteToolsRequest(calls=[te.ToolCall(id="a", tool="Calculator", input="1")] * 2), "calls[1].id"),
        (calls(("Calculator", "1" * 5000)), "calls[0].input"),
        (calls(("Calculator", "1"), reference_date="March 9"), "context.reference_date"),
        (calls(("Search", "x"), collection="Bad Name!"), "context.collection"),
    ],
)
async def test_malformed_requests_are_refused_naming_the_field(tools, request_, field):
    stub, _, _ = tools
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ExecuteTools(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(raised.value).startswith(f"{field}:")


async def test_a_runaway_worker_is_killed_at_the_timeout_and_replaced():
    """With the size bounds lifted (they normally refuse this first), the sandbox's own limits still hold."""
    sandbox = Sandbox(SandboxSettings(workers=1, timeout_seconds=0.3, calculator=Limits(max_bits=10**12)))
    await sandbox.start()
    try:
        started = time.perf_counter()
        runaway = await sandbox.run("calculator", "3 ** 999999999")
        assert runaway.error_kind == "timeout" and time.perf_counter() - started < 1.0
        assert (await sandbox.run("calculator", "2 + 2")).output == "4"  # a fresh worker answers
        results = await asyncio.gather(*(sandbox.run("calculator", f"{i} * 2") for i in range(5)))
        assert [r.output for r in results] == [str(2 * i) for i in range(5)]
    finally:
        await sandbox.close()


async def test_a_worker_over_its_memory_limit_costs_one_call():
    sandbox = Sandbox(SandboxSettings(workers=1, timeout_seconds=5, memory_bytes=64 * 2**20, calculator=Limits(max_bits=10**12)))
    await sandbox.start()
    try:
        outcome = await sandbox.run("calculator", "7 ** (10 ** 9)")
        assert outcome.output is None and outcome.error_kind in ("crashed", "timeout")
        assert (await sandbox.run("calculator", "6 * 7")).output == "42"
    finally:
        await sandbox.close()
