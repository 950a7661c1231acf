"""Search collections belong to tenants: isolation, sharing and the move of the pre-tenancy file.

Domain-level (ToolExecutor over real TenantCollections on disk; search needs no
sandbox worker) and then the real servicer over gRPC, with a principal bound
from a test metadata key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio

from autodidact.errors import InvalidArgument, NotFound, PermissionDenied, StartupError
from autodidact.runtime.component import Resource
from autodidact.runtime.interceptors import ErrorInterceptor
from autodidact.runtime.principal import ADMIN, SERVICE, VIEWER, Principal, acting_as
from autodidact.tool_executor.sandbox import Sandbox
from autodidact.tool_executor.search import SearchCollections, TenantCollections
from autodidact.tool_executor.service import (
    ToolExecutorServicer,
    Tools,
    check_searchable_collection,
    parse_index_request,
    parse_share_request,
)
from autodidact.tool_executor.tools import ToolExecutor, ToolOutcome
from autodidact.v1 import tool_executor_pb2 as te
from autodidact.v1 import tool_executor_pb2_grpc
from tests.conftest import details_of
from tests.dedup.principals import BindPrincipal, as_, principal

A, B = principal("team-a"), principal("team-b")
A_ADMIN = principal("team-a", ADMIN)
TRUE = ("d1", "The capital of Freedonia is Fredville.")
FORGED = ("d1", "The capital of Freedonia is Attackerville.")


@pytest.fixture
def executor(tmp_path) -> ToolExecutor:
    return ToolExecutor(Sandbox(), TenantCollections(tmp_path))  # search needs no sandbox worker: never started


def index(executor: ToolExecutor, who: Principal, collection: str, *documents: tuple[str, str]) -> int:
    with acting_as(who):
        return executor.index_documents(collection, list(documents))


async def search(executor: ToolExecutor, who: Principal, collection: str, query: str = "capital of Freedonia") -> ToolOutcome:
    with acting_as(who):
        (outcome,) = await executor.execute([("Search", query)], dt.date(2024, 1, 1), collection)
    return outcome


async def passage(executor: ToolExecutor, who: Principal, collection: str) -> str:
    """The text a search found ("" when it failed)."""
    return (await search(executor, who, collection)).output or ""


def share(executor: ToolExecutor, who: Principal, collection: str, tenant: str) -> list[str]:
    with acting_as(who):
        return executor.share_collection(collection, tenant)


# --- isolation ---


async def test_another_tenant_reindexing_a_document_id_never_changes_the_owners_collection(executor, tmp_path):
    """The attack of the issue: B indexed A's document id with its own text, and A's search returned it."""
    assert index(executor, A, "facts", TRUE) == 1
    assert index(executor, B, "facts", FORGED) == 1  # B's own "facts", independent of A's
    assert "Fredville" in await passage(executor, A, "facts")
    assert "Attackerville" in await passage(executor, B, "facts")
    assert (tmp_path / "tenants" / "team-a" / "search.sqlite").exists() and (tmp_path / "tenants" / "team-b" / "search.sqlite").exists()


async def test_an_unshared_collection_reads_like_a_missing_one(executor, tmp_path):
    index(executor, A, "facts", TRUE)
    unshared = await search(executor, B, "team-a/facts")
    missing = await search(executor, B, "team-a/never-made")
    assert unshared.output is None and unshared.error_kind == "undefined"
    assert (unshared.error, missing.error) == (
        "collection 'team-a/facts' has no documents",
        "collection 'team-a/never-made' has no documents",
    )
    assert (await search(executor, B, "facts")).error == "collection 'facts' has no documents"
    # QA with an unreachable collection gets no passage (and then needs the generator, absent here).
    with acting_as(B):
        (qa,) = await executor.execute([("QA", "What is the capital of Freedonia?")], dt.date(2024, 1, 1), "team-a/facts")
    assert qa.error_kind == "backend"
    # Probing a tenant's name makes no file for it.
    await search(executor, B, "team-z/facts")
    assert not (tmp_path / "tenants" / "team-z").exists()


async def test_a_tenant_may_name_its_own_collection_with_its_tenant(executor):
    index(executor, A, "facts", TRUE)
    assert "Fredville" in await passage(executor, A, "team-a/facts")


# --- sharing ---


async def test_only_an_admin_shares_and_the_other_tenant_then_searches_but_never_indexes(executor, tmp_path):
    index(executor, A, "facts", TRUE)
    for refused in (A, principal("team-a", VIEWER)):
        with pytest.raises(PermissionDenied, match="ShareCollection needs the admin role"):
            share(executor, refused, "facts", "team-b")
    assert share(executor, A_ADMIN, "facts", "team-b") == ["team-b"]
    assert share(executor, A_ADMIN, "facts", "team-b") == ["team-b"]  # idempotent
    assert share(executor, principal("team-a", SERVICE), "facts", "team-c") == ["team-b", "team-c"]  # service ranks above admin
    assert "Fredville" in await passage(executor, B, "team-a/facts")
    # What B indexes goes to B's own collection; the request field cannot name another tenant's (see the parser tests).
    index(executor, B, "facts", FORGED)
    assert "Fredville" in await passage(executor, B, "team-a/facts")
    assert "Fredville" in await passage(executor, A, "facts")
    # The share is durable: a restarted service still has it; a tenant it was not shared with still gets nothing.
    restarted = ToolExecutor(Sandbox(), TenantCollections(tmp_path))
    assert "Fredville" in await passage(restarted, B, "team-a/facts")
    assert (await search(restarted, principal("team-d"), "team-a/facts")).error == "collection 'team-a/facts' has no documents"


def test_share_refusals(executor):
    index(executor, A, "facts", TRUE)
    with pytest.raises(NotFound, match="collection 'never-made' does not exist"):
        share(executor, A_ADMIN, "never-made", "team-b")
    with pytest.raises(InvalidArgument, match=r"^tenant: 'team-a' owns the collection"):
        share(executor, A_ADMIN, "facts", "team-a")


@pytest.mark.parametrize(
    ("collection", "tenant", "field"),
    [
        ("", "team-b", "collection"),
        ("team-a/facts", "team-b", "collection"),
        ("Facts", "team-b", "collection"),
        ("facts", "", "tenant"),
        ("facts", "Team-B", "tenant"),
        ("facts", "team/b", "tenant"),
        ("facts", "b" * 65, "tenant"),
    ],
)
def test_share_requests_name_the_bad_field(collection, tenant, field):
    with pytest.raises(InvalidArgument) as raised:
        parse_share_request(te.ShareCollectionRequest(collection=collection, tenant=tenant))
    assert raised.value.field == field


def test_only_the_owner_indexes_a_collection_named_owner_slash_name_is_refused():
    request = te.IndexDocumentsRequest(collection="team-a/facts", documents=[te.Document(id="d1", text="x")])
    with pytest.raises(InvalidArgument, match=r"^collection: .*one of your tenant's collections"):
        parse_index_request(request)


@pytest.mark.parametrize("name", ["facts", "team-a/facts", "j0123abcd"])
def test_searchable_collection_names(name):
    check_searchable_collection("context.collection", name)


@pytest.mark.parametrize("name", ["/facts", "team-a/", "a/b/c", "Team_A/facts", "../facts", "x" * 65])
def test_bad_searchable_collection_names(name):
    with pytest.raises(InvalidArgument, match=r"^context\.collection: must be 1 to 64 characters"):
        check_searchable_collection("context.collection", name)


# --- the move of the pre-tenancy file ---


def test_the_pre_tenancy_collections_file_moves_to_the_default_tenant(tmp_path):
    legacy = SearchCollections(tmp_path / "search.sqlite")  # the layout from before tenancy, still in WAL mode
    legacy.add("facts", [TRUE])
    legacy.close()
    collections = TenantCollections(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tenants"]
    found = collections.searchable("default", "facts")
    assert found is not None and found[0].search(found[1], "Freedonia capital")[0].document_id == "d1"
    assert collections.searchable("team-a", "facts") is None
    collections.close()
    # Starting again finds nothing more to move.
    assert TenantCollections(tmp_path).searchable("default", "facts") is not None


async def test_after_the_move_anonymous_callers_search_as_before(tmp_path):
    legacy = SearchCollections(tmp_path / "search.sqlite")
    legacy.add("facts", [TRUE])
    legacy.close()
    executor = ToolExecutor(Sandbox(), TenantCollections(tmp_path))
    (outcome,) = await executor.execute([("Search", "capital of Freedonia")], dt.date(2024, 1, 1), "facts")  # ANONYMOUS: "default"
    assert "Fredville" in (outcome.output or "")


def test_a_collections_file_in_both_layouts_stops_the_start(tmp_path):
    SearchCollections(tmp_path / "search.sqlite").close()
    SearchCollections(tmp_path / "tenants" / "default" / "search.sqlite").close()
    with pytest.raises(StartupError, match=r"cannot move search collections .* that file exists"):
        TenantCollections(tmp_path)
    assert (tmp_path / "search.sqlite").exists()  # nothing moved, nothing lost


# --- over gRPC: the status codes a caller sees ---


@pytest_asyncio.fixture
async def stub(tmp_path) -> AsyncIterator[tool_executor_pb2_grpc.ToolExecutorServiceStub]:
    async def start() -> Tools:
        sandbox, collections = Sandbox(), TenantCollections(tmp_path)
        return Tools(sandbox, collections, None, ToolExecutor(sandbox, collections))

    tools = Resource("the tool sandbox", start)
    await tools.load()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), BindPrincipal()])
    tool_executor_pb2_grpc.add_ToolExecutorServiceServicer_to_server(ToolExecutorServicer(tools), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tool_executor_pb2_grpc.ToolExecutorServiceStub(channel)
    await server.stop(None)
    await tools.close()


def search_request(collection: str) -> te.ExecuteToolsRequest:
    return te.ExecuteToolsRequest(
        calls=[te.ToolCall(id="c", tool="Search", input="capital of Freedonia")], context=te.ToolContext(collection=collection)
    )


async def refused(call: Awaitable[object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, details_of(raised.value)
    return details_of(raised.value)


async def test_over_grpc_isolation_and_sharing_have_their_status_codes(stub):
    def documents(document: tuple[str, str]) -> list[te.Document]:
        return [te.Document(id=document[0], text=document[1])]

    await stub.IndexDocuments(te.IndexDocumentsRequest(collection="facts", documents=documents(TRUE)), metadata=as_("team-a"))
    await stub.IndexDocuments(te.IndexDocumentsRequest(collection="facts", documents=documents(FORGED)), metadata=as_("team-b"))
    assert "Fredville" in (await stub.ExecuteTools(search_request("facts"), metadata=as_("team-a"))).results[0].output
    unshared = (await stub.ExecuteTools(search_request("team-a/facts"), metadata=as_("team-b"))).results[0]
    assert unshared.error.code == te.TOOL_ERROR_CODE_UNDEFINED and unshared.error.message == "collection 'team-a/facts' has no documents"
    planted = te.IndexDocumentsRequest(collection="team-a/facts", documents=documents(FORGED))
    assert (await refused(stub.IndexDocuments(planted, metadata=as_("team-b")), grpc.StatusCode.INVALID_ARGUMENT)).startswith("collection:")

    request = te.ShareCollectionRequest(collection="facts", tenant="team-b")
    assert "admin" in await refused(stub.ShareCollection(request, metadata=as_("team-a")), grpc.StatusCode.PERMISSION_DENIED)
    assert list((await stub.ShareCollection(request, metadata=as_("team-a", ADMIN))).tenants) == ["team-b"]
    shared = (await stub.ExecuteTools(search_request("team-a/facts"), metadata=as_("team-b"))).results[0]
    assert "Fredville" in shared.output and "Attackerville" not in shared.output
    # Shared for search only: B still cannot index into it.
    await refused(stub.IndexDocuments(planted, metadata=as_("team-b", ADMIN)), grpc.StatusCode.INVALID_ARGUMENT)
    missing = te.ShareCollectionRequest(collection="never-made", tenant="team-b")
    await refused(stub.ShareCollection(missing, metadata=as_("team-a", ADMIN)), grpc.StatusCode.NOT_FOUND)
    bad = te.ShareCollectionRequest(collection="facts", tenant="")
    assert (await refused(stub.ShareCollection(bad, metadata=as_("team-a", ADMIN)), grpc.StatusCode.INVALID_ARGUMENT)).startswith("tenant:")
