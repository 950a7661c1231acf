"""Namespaces belong to tenants: isolation, sharing and the move of pre-tenancy namespaces.

Domain-level (DiversityFilter over a real NamespaceRegistry on disk) with a
stand-in embedder, so the tests are fast; the last ones go through the real
servicer over gRPC, with a principal bound from a test metadata key.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest
import pytest_asyncio

from autodidact.backends.embed import EmbedderDescription
from autodidact.dedup.defaults import NamespaceSettings
from autodidact.dedup.diversity import DiversityFilter
from autodidact.dedup.namespaces import Namespace, NamespaceRegistry
from autodidact.dedup.service import DedupBackend, DedupServicer, check_namespace, parse_share
from autodidact.errors import InvalidArgument, NotFound, PermissionDenied, StartupError
from autodidact.runtime.component import Resource
from autodidact.runtime.interceptors import ErrorInterceptor
from autodidact.runtime.principal import ADMIN, SERVICE, VIEWER, Principal, acting_as
from autodidact.v1 import dedup_pb2, dedup_pb2_grpc
from tests.conftest import details_of
from tests.dedup.principals import BindPrincipal, as_, principal

DIM = 16


class HashEmbedder:
    """Each text to a fixed unit vector of its hash: equal texts are duplicates, others nearly orthogonal."""

    description = EmbedderDescription("test", "hash", DIM)

    async def embed(self, texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8])).normal(size=DIM) for t in texts]
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    async def close(self) -> None:
        return None


A, B, C = principal("team-a"), principal("team-b"), principal("team-c")
A_ADMIN = principal("team-a", ADMIN)


@pytest.fixture
def diversity(tmp_path) -> DiversityFilter:
    return DiversityFilter(HashEmbedder(), NamespaceRegistry(tmp_path, DIM))


async def add(diversity: DiversityFilter, who: Principal, namespace: str, *texts: str, prefix: str = "t") -> list[bool]:
    with acting_as(who):
        result = await diversity.filter_batch(namespace, [f"{prefix}{i}" for i in range(len(texts))], list(texts), 0.9)
    return [v.kept for v in result.verdicts]


def describe(diversity: DiversityFilter, who: Principal, namespace: str) -> tuple[int, str]:
    with acting_as(who):
        return diversity.describe(namespace)


def share(diversity: DiversityFilter, who: Principal, namespace: str, tenant: str) -> list[str]:
    with acting_as(who):
        return diversity.share(namespace, tenant)


def not_found_message(call: Callable[[], object]) -> str:
    with pytest.raises(NotFound) as raised:
        call()
    return str(raised.value)


# --- isolation ---


async def test_the_same_name_in_two_tenants_is_two_independent_namespaces(diversity, tmp_path):
    assert await add(diversity, A, "ideas", "Write a poem about the sea.") == [True]
    # B's "ideas" is its own, empty: A's text is new there, and B's ids do not collide with A's.
    assert await add(diversity, B, "ideas", "Write a poem about the sea.", "Sort the numbers.") == [True, True]
    assert describe(diversity, A, "ideas")[0] == 1 and describe(diversity, B, "ideas")[0] == 2
    assert (tmp_path / "tenants" / "team-a" / "namespaces" / "ideas" / "log.sqlite").exists()
    assert (tmp_path / "tenants" / "team-b" / "namespaces" / "ideas" / "log.sqlite").exists()


async def test_another_tenant_can_neither_see_nor_plant_into_a_namespace(diversity, tmp_path):
    await add(diversity, A, "ideas", "Write a poem about the sea.")
    missing = not_found_message(lambda: describe(diversity, B, "team-a/never-made"))
    unshared = not_found_message(lambda: describe(diversity, B, "team-a/ideas"))
    # Refused exactly like a namespace that does not exist: its existence does not leak.
    assert missing == "namespace 'team-a/never-made' does not exist"
    assert unshared == "namespace 'team-a/ideas' does not exist"
    with pytest.raises(NotFound, match=r"^namespace 'team-a/ideas' does not exist$"):
        await add(diversity, B, "team-a/ideas", "Write a poem about the sea.", prefix="planted")
    with pytest.raises(NotFound):
        await add(diversity, B, "team-z/ideas", "x")  # nor is a folder made for a tenant merely named
    assert describe(diversity, A, "ideas") == (1, "flat")
    assert not (tmp_path / "tenants" / "team-z").exists()
    # B's own "ideas" does not exist until B makes it.
    assert not_found_message(lambda: describe(diversity, B, "ideas")) == "namespace 'ideas' does not exist"


async def test_a_tenant_may_name_its_own_namespace_with_its_tenant(diversity):
    await add(diversity, A, "ideas", "Write a poem about the sea.")
    assert describe(diversity, A, "team-a/ideas")[0] == 1


async def test_a_retried_batch_id_in_another_tenant_is_a_new_batch(diversity):
    with acting_as(A):
        first = await diversity.filter_batch("pool", ["x"], ["Name a river."], 0.9, batch_id="job-1/0")
    with acting_as(B):
        other = await diversity.filter_batch("pool", ["y"], ["Name a mountain."], 0.9, batch_id="job-1/0")
    assert [v.id for v in first.verdicts] == ["x"] and [v.id for v in other.verdicts] == ["y"]


# --- sharing ---


async def test_only_an_admin_shares_and_the_other_tenant_then_uses_owner_slash_name(diversity, tmp_path):
    await add(diversity, A, "ideas", "Write a poem about the sea.")
    for refused in (A, principal("team-a", VIEWER)):
        with pytest.raises(PermissionDenied, match="ShareNamespace needs the admin role"):
            share(diversity, refused, "ideas", "team-b")
    assert share(diversity, A_ADMIN, "ideas", "team-b") == ["team-b"]
    assert share(diversity, A_ADMIN, "ideas", "team-b") == ["team-b"]  # idempotent
    assert share(diversity, principal("team-a", SERVICE), "ideas", "team-c") == ["team-b", "team-c"]  # service ranks above admin
    assert describe(diversity, B, "team-a/ideas")[0] == 1
    # B filters against (and adds to) A's pool: A's text is a duplicate there.
    with acting_as(B):
        result = await diversity.filter_batch("team-a/ideas", ["b0", "b1"], ["Write a poem about the sea.", "Sort the numbers."], 0.9)
    first, second = result.verdicts
    assert (first.kept, first.nearest_id, second.kept) == (False, "t0", True)
    assert describe(diversity, A, "ideas")[0] == 2
    # The share survives a restart: it is on disk, beside the namespace.
    reopened = DiversityFilter(HashEmbedder(), NamespaceRegistry(tmp_path, DIM))
    assert describe(reopened, B, "team-a/ideas")[0] == 2
    assert not_found_message(lambda: describe(reopened, principal("team-d"), "team-a/ideas")) == "namespace 'team-a/ideas' does not exist"


async def test_share_refusals(diversity):
    await add(diversity, A, "ideas", "Write a poem about the sea.")
    share(diversity, A_ADMIN, "ideas", "team-b")
    with pytest.raises(NotFound, match="namespace 'never-made' does not exist"):
        share(diversity, A_ADMIN, "never-made", "team-b")
    with pytest.raises(InvalidArgument, match=r"^tenant: 'team-a' owns the namespace"):
        share(diversity, A_ADMIN, "ideas", "team-a")
    # A namespace shared with B is not B's to pass on.
    with pytest.raises(NotFound):
        share(diversity, principal("team-b", ADMIN), "team-a/ideas", "team-c")
    with pytest.raises(NotFound):
        describe(diversity, C, "team-a/ideas")


@pytest.mark.parametrize(
    ("namespace", "tenant", "field"),
    [
        ("", "team-b", "namespace"),
        ("team-a/ideas", "team-b", "namespace"),
        ("../x", "team-b", "namespace"),
        ("ideas", "", "tenant"),
        ("ideas", "Team-B", "tenant"),
        ("ideas", "team/b", "tenant"),
        ("ideas", "-b", "tenant"),
        ("ideas", "b" * 65, "tenant"),
    ],
)
def test_share_requests_name_the_bad_field(namespace, tenant, field):
    with pytest.raises(InvalidArgument) as raised:
        parse_share(dedup_pb2.ShareNamespaceRequest(namespace=namespace, tenant=tenant))
    assert raised.value.field == field


@pytest.mark.parametrize("name", ["ideas", "team-a/ideas", "t/x.y_z", "a" * 128])
def test_namespace_names_own_or_shared(name):
    check_namespace("namespace", name)


@pytest.mark.parametrize("name", ["", "/ideas", "team-a/", "a/b/c", "Team_A/ideas", "../ideas", "team-a/..", "bad name!", "a" * 129])
def test_bad_namespace_names_are_refused(name):
    with pytest.raises(InvalidArgument, match=r"^namespace: must be 1 to 128 characters"):
        check_namespace("namespace", name)


# --- the move of pre-tenancy namespaces ---


def legacy_namespace(root, name: str, *ids: str) -> None:
    """A namespace in the layout from before tenancy: <root>/namespaces/<name>."""
    ns = Namespace(root / "namespaces" / name, DIM, NamespaceSettings())
    vectors = np.eye(DIM, dtype=np.float32)[: len(ids)]
    ns.commit("", ns.judge(list(ids), vectors, threshold=0.9), vectors)
    ns.close()


def test_pre_tenancy_namespaces_move_to_the_default_tenant(tmp_path):
    legacy_namespace(tmp_path, "old", "a", "b")
    legacy_namespace(tmp_path, "older", "c")
    # A crash during an earlier start had moved one namespace already.
    (tmp_path / "tenants" / "default" / "namespaces").mkdir(parents=True)
    (tmp_path / "namespaces" / "older").rename(tmp_path / "tenants" / "default" / "namespaces" / "older")
    diversity = DiversityFilter(HashEmbedder(), NamespaceRegistry(tmp_path, DIM))
    assert not (tmp_path / "namespaces").exists()
    # ANONYMOUS (no authentication) is tenant "default": the namespaces are where they were for it.
    assert diversity.describe("old") == (2, "flat") and diversity.describe("older") == (1, "flat")
    assert not_found_message(lambda: describe(diversity, A, "old")) == "namespace 'old' does not exist"
    # Starting again finds nothing more to move.
    assert DiversityFilter(HashEmbedder(), NamespaceRegistry(tmp_path, DIM)).describe("old")[0] == 2


def test_a_namespace_in_both_layouts_stops_the_start(tmp_path):
    legacy_namespace(tmp_path, "old", "a")
    (tmp_path / "tenants" / "default" / "namespaces" / "old").mkdir(parents=True)
    with pytest.raises(StartupError, match=r"cannot move dedup namespace .*old.* that folder exists"):
        NamespaceRegistry(tmp_path, DIM)
    assert (tmp_path / "namespaces" / "old" / "log.sqlite").exists()  # nothing lost


# --- over gRPC: the status codes a caller sees ---


@pytest_asyncio.fixture
async def stub(tmp_path) -> AsyncIterator[dedup_pb2_grpc.DedupServiceStub]:
    embedder = HashEmbedder()

    async def open_backend() -> DedupBackend:
        namespaces = NamespaceRegistry(tmp_path, DIM)
        return DedupBackend(embedder, namespaces, DiversityFilter(embedder, namespaces))

    backend = Resource("the embedder", open_backend)
    await backend.load()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), BindPrincipal()])
    dedup_pb2_grpc.add_DedupServiceServicer_to_server(DedupServicer(backend), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield dedup_pb2_grpc.DedupServiceStub(channel)
    await server.stop(None)
    await backend.close()


async def refused(call: Awaitable[object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, details_of(raised.value)
    return details_of(raised.value)


async def test_over_grpc_isolation_and_sharing_have_their_status_codes(stub):
    item = [dedup_pb2.DedupItem(id="1", text="Write a poem about the sea.")]
    assert (await stub.FilterBatch(dedup_pb2.FilterBatchRequest(namespace="ideas", items=item), metadata=as_("team-a"))).verdicts[0].kept
    assert (await stub.FilterBatch(dedup_pb2.FilterBatchRequest(namespace="ideas", items=item), metadata=as_("team-b"))).verdicts[0].kept
    other = dedup_pb2.GetNamespaceRequest(namespace="team-a/ideas")
    never = dedup_pb2.GetNamespaceRequest(namespace="team-a/never-made")
    assert await refused(stub.GetNamespace(other, metadata=as_("team-b")), grpc.StatusCode.NOT_FOUND) == (
        await refused(stub.GetNamespace(never, metadata=as_("team-b")), grpc.StatusCode.NOT_FOUND)
    ).replace("never-made", "ideas")
    planted = dedup_pb2.FilterBatchRequest(namespace="team-a/ideas", items=[dedup_pb2.DedupItem(id="x", text="Plant.")])
    await refused(stub.FilterBatch(planted, metadata=as_("team-b")), grpc.StatusCode.NOT_FOUND)

    request = dedup_pb2.ShareNamespaceRequest(namespace="ideas", tenant="team-b")
    message = await refused(stub.ShareNamespace(request, metadata=as_("team-a")), grpc.StatusCode.PERMISSION_DENIED)
    assert "admin" in message
    assert list((await stub.ShareNamespace(request, metadata=as_("team-a", ADMIN))).tenants) == ["team-b"]
    assert (await stub.GetNamespace(other, metadata=as_("team-b", VIEWER))).size == 1
    await refused(stub.GetNamespace(other, metadata=as_("team-c")), grpc.StatusCode.NOT_FOUND)

    bad = dedup_pb2.ShareNamespaceRequest(namespace="ideas", tenant="Team B")
    assert (await refused(stub.ShareNamespace(bad, metadata=as_("team-a", ADMIN)), grpc.StatusCode.INVALID_ARGUMENT)).startswith(
        "tenant: must be a tenant name"
    )
    missing = dedup_pb2.ShareNamespaceRequest(namespace="never-made", tenant="team-b")
    await refused(stub.ShareNamespace(missing, metadata=as_("team-a", ADMIN)), grpc.StatusCode.NOT_FOUND)
