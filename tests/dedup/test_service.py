"""The dedup service over real gRPC with the embedded MiniLM embedder."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio

from autodidact.runtime.channels import create_channel
from autodidact.v1 import dedup_pb2, dedup_pb2_grpc
from tests.conftest import details_of
from tests.stack import start_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dedup(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("dedup")
    stack = await start_stack(data_dir, ("dedup",))
    async with create_channel(stack.target("dedup")) as channel:
        yield dedup_pb2_grpc.DedupServiceStub(channel), stack, data_dir
    await stack.stop()


def batch(
    namespace: str, *texts: str, batch_id: str = "", threshold: float | None = None, prefix: str = "t"
) -> dedup_pb2.FilterBatchRequest:
    request = dedup_pb2.FilterBatchRequest(
        namespace=namespace, items=[dedup_pb2.DedupItem(id=f"{prefix}{i}", text=t) for i, t in enumerate(texts)], batch_id=batch_id
    )
    if threshold is not None:
        request.threshold = threshold
    return request


async def test_paraphrases_are_dropped_and_different_tasks_kept(dedup):
    stub, _, _ = dedup
    response = await stub.FilterBatch(
        batch(
            "para",
            "Write a poem about the sea.",
            "Sort the numbers in ascending order.",
            "Compose a poem about the ocean.",
            "Translate the sentence into French.",
            "Write a short poem about the sea.",
            threshold=0.8,
        )
    )
    kept = [v.kept for v in response.verdicts]
    assert kept == [True, True, False, True, False]
    assert response.verdicts[4].nearest_id == "t0" and response.verdicts[4].similarity >= 0.8
    assert response.namespace_size == 3
    later = await stub.FilterBatch(batch("para", "Put these numbers in ascending order.", prefix="u", threshold=0.8))
    assert not later.verdicts[0].kept and later.verdicts[0].nearest_id == "t1"


async def test_a_retried_batch_id_returns_the_same_verdicts_and_adds_nothing(dedup):
    stub, _, _ = dedup
    request = batch("retry", "Name three rivers in Africa.", "List three African rivers.", batch_id="job/r1")
    first = await stub.FilterBatch(request)
    again = await stub.FilterBatch(request)
    assert again == first and again.namespace_size == 1
    other_items = batch("retry", "Something else entirely here.", batch_id="job/r1")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.FilterBatch(other_items)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_dry_run_judges_without_adding(dedup):
    stub, _, _ = dedup
    response = await stub.FilterBatch(
        dedup_pb2.FilterBatchRequest(namespace="dry", items=[dedup_pb2.DedupItem(id="a", text="Explain photosynthesis.")], dry_run=True)
    )
    assert response.verdicts[0].kept and response.namespace_size == 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (batch("bad name!", "x"), "namespace: must be 1 to 128 characters"),
        (dedup_pb2.FilterBatchRequest(namespace="ok"), "items: must have at least 1 item"),
        (batch("ok", "a", threshold=1.5), "threshold: must be between 0 and 1, got 1.5"),
        (dedup_pb2.FilterBatchRequest(namespace="ok", items=[dedup_pb2.DedupItem(id="a", text="x")] * 2), "items[1].id: 'a' appears twice"),
        (dedup_pb2.FilterBatchRequest(namespace="ok", items=[dedup_pb2.DedupItem(id="a", text="")]), "items[0].text: must not be empty"),
        (batch("ok", *["x"] * 4097), "items: must have at most 4,096 items"),
    ],
)
async def test_bad_requests_name_the_field(dedup, request_, message):
    stub, _, _ = dedup
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.FilterBatch(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details_of(raised.value)


async def test_an_id_already_in_the_namespace_is_refused(dedup):
    stub, _, _ = dedup
    await stub.FilterBatch(batch("ids", "Describe a cat."))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.FilterBatch(batch("ids", "Describe a dog."))
    assert "items[0].id: 't0' is already in namespace 'ids'" in details_of(raised.value)


async def test_get_namespace(dedup):
    stub, _, _ = dedup
    await stub.FilterBatch(batch("info", "Summarize the text.", "Count the vowels."))
    info = await stub.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="info"))
    assert (info.size, info.index_kind, info.dimension) == (2, "flat", 384) and "MiniLM" in info.embedder
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="never-made"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_namespaces_survive_a_restart(dedup):
    stub, _, data_dir = dedup
    await stub.FilterBatch(batch("durable", "Write a limerick about a cat.", "Convert 10 miles to kilometres."))
    restarted = await start_stack(data_dir, ("dedup",))
    try:
        async with create_channel(restarted.target("dedup")) as channel:
            again = dedup_pb2_grpc.DedupServiceStub(channel)
            info = await again.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="durable"))
            assert info.size == 2
            response = await again.FilterBatch(batch("durable", "Write a limerick about a kitten.", prefix="n"))
            assert not response.verdicts[0].kept and response.verdicts[0].nearest_id == "t0"
    finally:
        await restarted.stop()
