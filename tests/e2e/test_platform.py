"""Two tenants against real processes: authentication, isolation, roles and quotas.

All six services here are real `autodidact serve` processes with authentication on:
static tokens from an auth file and RS256 JWTs verified against a JWKS file,
the services calling each other with their own service token. The coordinator
is pointed at a generator and a critic that are not there (the model services
run only for the authentication checks), so a constitutional job stays
RUNNING (waiting out its patience) for as long as the tests need a job in
progress; the dedup and tool-executor it calls are real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from autodidact.client import wait_until_serving
from autodidact.runtime.channels import create_channel
from autodidact.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    critic_pb2,
    critic_pb2_grpc,
    dedup_pb2,
    dedup_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    tool_executor_pb2,
    tool_executor_pb2_grpc,
)
from tests.conftest import details_of, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
ISSUER = "https://issuer.autodidact.test"
AUDIENCE = "autodidact"

# Static tokens: (token, subject, tenant, roles).
STATIC = {
    "service": ("svc-token-" + "s" * 32, "autodidact-services", "autodidact", ["service"]),
    "b": ("b-token-" + "b" * 32, "team-b-bot", "team-b", ["submitter"]),
    "b_admin": ("b-admin-" + "c" * 32, "team-b-admin", "team-b", ["admin"]),
    "a_viewer": ("a-viewer-" + "v" * 32, "team-a-dashboard", "team-a", ["viewer"]),
    "q": ("q-token-" + "q" * 32, "quota-bot", "team-q", ["submitter"]),
}
QUOTAS_Q = {"running_jobs": 1, "stored_bytes": 4000, "upload_bytes": 2500, "items_per_job": 5}


@dataclass
class Platform:
    coordinator: str
    dedup: str
    tool_executor: str
    tokens: dict[str, str]
    logs: Path  # each service's log: <name>.log
    models: dict[str, str]  # generator, scorer, critic: name -> target


def _auth_file(path: Path) -> None:
    entries = [
        {"sha256": hashlib.sha256(token.encode()).hexdigest(), "subject": subject, "tenant": tenant, "roles": roles}
        for token, subject, tenant, roles in STATIC.values()
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))


def _jwt(key: rsa.RSAPrivateKey, tenant: str, roles: list[str], expires_in: float = 600, audience: str = AUDIENCE) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": audience, "sub": f"{tenant}-user", "iat": now, "exp": now + int(expires_in)}
    claims |= {"tenant": tenant, "roles": roles}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-key"})


def _serve(name: str, port: int, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [
                AUTODIDACT,
                "serve",
                name,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--threads",
                "2",
                "--embed-threads",
                "2",
                "--log-format",
                "json",
                *args,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("platform")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "test-key", "use": "sig", "alg": "RS256"}
    (root / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    _auth_file(root / "auth.yaml")
    (root / "service.token").write_text(STATIC["service"][0])
    (root / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"team-q": {"quotas": QUOTAS_Q}}}))
    auth = ["--auth-file", str(root / "auth.yaml"), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    auth += ["--jwks-file", str(root / "jwks.json"), "--token-file", str(root / "service.token")]
    ports = {name: free_port() for name in ("coordinator", "dedup", "tool-executor", "generator", "scorer", "critic")}
    absent = f"127.0.0.1:{free_port()}"  # nothing listens there: the coordinator's jobs wait for the generator and the critic
    model_services = ["--generator-target", f"127.0.0.1:{ports['generator']}", "--scorer-target", f"127.0.0.1:{ports['scorer']}"]
    processes = [
        # The model services run too, for the authentication checks of all six; the coordinator is not pointed at them.
        _serve("generator", ports["generator"], auth, root / "generator.log"),
        _serve("scorer", ports["scorer"], auth, root / "scorer.log"),
        _serve("critic", ports["critic"], [*auth, *model_services], root / "critic.log"),
        _serve("dedup", ports["dedup"], [*auth, "--data-dir", str(root / "dedup")], root / "dedup.log"),
        _serve("tool-executor", ports["tool-executor"], [*auth, "--data-dir", str(root / "tools")], root / "tools.log"),
        _serve(
            "coordinator",
            ports["coordinator"],
            [
                *auth,
                "--data-dir",
                str(root / "coordinator"),
                "--tenants-file",
                str(root / "tenants.yaml"),
                "--dedup-target",
                f"127.0.0.1:{ports['dedup']}",
                "--tool-executor-target",
                f"127.0.0.1:{ports['tool-executor']}",
                "--generator-target",
                absent,
                "--scorer-target",
                absent,
                "--critic-target",
                absent,
            ],
            root / "coordinator.log",
        ),
    ]
    tokens = {name: token for name, (token, *_) in STATIC.items()}
    tokens |= {
        "a": _jwt(key, "team-a", ["submitter"]),
        "a_admin": _jwt(key, "team-a", ["admin"]),
        "expired": _jwt(key, "team-a", ["admin"], expires_in=-120),
        "wrong_audience": _jwt(key, "team-a", ["admin"], audience="someone-else"),
        "other_key": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 600, "tenant": "team-a", "roles": ["admin"]},
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256",
            headers={"kid": "test-key"},
        ),
    }
    try:
        targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        models = {name: targets[name] for name in ("generator", "scorer", "critic")}
        yield Platform(targets["coordinator"], targets["dedup"], targets["tool-executor"], tokens, root, models)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stubs(platform: Platform) -> AsyncIterator[dict[str, Any]]:
    targets = {"coordinator": platform.coordinator, "dedup": platform.dedup, "tool_executor": platform.tool_executor, **platform.models}
    channels = {name: create_channel(target, timeout_seconds=120) for name, target in targets.items()}
    for channel in channels.values():
        await wait_until_serving(channel, timeout=180)  # health is open
    yield {
        "coordinator": coordinator_pb2_grpc.CoordinatorServiceStub(channels["coordinator"]),
        "dedup": dedup_pb2_grpc.DedupServiceStub(channels["dedup"]),
        "tool_executor": tool_executor_pb2_grpc.ToolExecutorServiceStub(channels["tool_executor"]),
        "generator": generator_pb2_grpc.GeneratorServiceStub(channels["generator"]),
        "scorer": scorer_pb2_grpc.ScorerServiceStub(channels["scorer"]),
        "critic": critic_pb2_grpc.CriticServiceStub(channels["critic"]),
    }
    for channel in channels.values():
        await channel.close()


async def refused(call: Any, code: grpc.StatusCode) -> str:
    """Awaits `call` (a unary call or a response stream) and returns the message of the refusal with `code`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert caught.value.code() == code, f"{caught.value.code().name}: {details_of(caught.value)}"
    return details_of(caught.value)


PROMPTS = "".join(json.dumps({"prompt": f"How do I bake bread number {i}?"}) + "\n" for i in range(3))


def waiting_job(prompts: str = PROMPTS) -> coordinator_pb2.JobSpec:
    """A constitutional job with inline prompts; it waits for the absent generator until cancelled."""
    spec = coordinator_pb2.JobSpec(seed=1, max_in_flight=1)
    spec.constitutional.prompts_path = "inline:prompts"
    spec.constitutional.rounds = 1
    spec.inline_inputs["prompts"] = prompts
    return spec


async def upload(stub: Any, token: str, data: bytes, name: str = "prompts.jsonl") -> coordinator_pb2.UploadDatasetResponse:
    return await upload_with(stub, bearer(token), data, name)


async def upload_with(stub: Any, metadata: Any, data: bytes, name: str = "prompts.jsonl") -> coordinator_pb2.UploadDatasetResponse:
    """Uploads `data` in 1,000-byte chunks; the call's status is what the coordinator answered (runner.upload's way)."""
    header = coordinator_pb2.UploadDatasetHeader(
        name=name, format=coordinator_pb2.DATASET_FORMAT_JSONL, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )
    call = stub.UploadDataset(metadata=metadata)
    try:
        await call.write(coordinator_pb2.UploadDatasetRequest(header=header))
        for start in range(0, len(data), 1000):
            await call.write(coordinator_pb2.UploadDatasetRequest(chunk=data[start : start + 1000]))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # refused before the end: the status below says why
    return await call


@pytest.mark.asyncio(loop_scope="module")
async def test_calls_without_valid_credentials_are_unauthenticated(stubs: dict[str, Any], platform: Platform) -> None:
    calls = {
        "coordinator": lambda md: stubs["coordinator"].ListJobs(coordinator_pb2.ListJobsRequest(), metadata=md),
        "dedup": lambda md: stubs["dedup"].FilterBatch(
            dedup_pb2.FilterBatchRequest(namespace="auth-check", items=[dedup_pb2.DedupItem(id="1", text="hello")]), metadata=md
        ),
        "tool_executor": lambda md: stubs["tool_executor"].ListTools(tool_executor_pb2.ListToolsRequest(), metadata=md),
        "generator": lambda md: stubs["generator"].GetModelInfo(generator_pb2.GetModelInfoRequest(), metadata=md),
        "scorer": lambda md: stubs["scorer"].ScoreText(
            scorer_pb2.ScoreTextRequest(items=[scorer_pb2.ScoredText(text="Hello there.")]), metadata=md
        ),
        "critic": lambda md: stubs["critic"].ListConstitutions(critic_pb2.ListConstitutionsRequest(), metadata=md),
        # Response streams and a client stream refuse the same way.
        "WatchJob": lambda md: stubs["coordinator"].WatchJob(coordinator_pb2.WatchJobRequest(job_id="any"), metadata=md),
        "StreamSamples": lambda md: stubs["coordinator"].StreamSamples(coordinator_pb2.StreamSamplesRequest(job_id="any"), metadata=md),
        "DownloadExport": lambda md: stubs["coordinator"].DownloadExport(
            coordinator_pb2.DownloadExportRequest(job_id="any", name="manifest.json"), metadata=md
        ),
        "UploadDataset": lambda md: upload_with(stubs["coordinator"], md, b'{"prompt": "x"}\n'),
    }
    bad = {
        "no token": (),
        "garbage": bearer("garbage"),
        "not bearer": (("authorization", "Basic dXNlcjpwYXNz"),),
        "expired JWT": bearer(platform.tokens["expired"]),
        "JWT for another audience": bearer(platform.tokens["wrong_audience"]),
        "JWT signed by another key": bearer(platform.tokens["other_key"]),
    }
    for service, call in calls.items():
        for what, metadata in bad.items():
            message = await refused(call(metadata), grpc.StatusCode.UNAUTHENTICATED)
            assert "garbage" not in message and STATIC["b"][0] not in message, (service, what, message)
        try:  # and a valid token gets through authentication (a stream may then find no job "any")
            result = call(bearer(platform.tokens["a"]))
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, (service, exc.code(), details_of(exc))


@pytest.mark.asyncio(loop_scope="module")
async def test_another_tenant_sees_nothing_of_a_tenants_jobs_and_datasets(stubs: dict[str, Any], platform: Platform) -> None:
    coordinator = stubs["coordinator"]
    a, b = bearer(platform.tokens["a"]), bearer(platform.tokens["b"])
    dataset = (await upload(coordinator, platform.tokens["a"], PROMPTS.encode())).dataset
    spec = coordinator_pb2.JobSpec(seed=1, max_in_flight=1)
    spec.constitutional.prompts_path = f"dataset:{dataset.dataset_id}"
    spec.constitutional.rounds = 1
    submitted = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="shared-name", spec=spec), metadata=a)
    assert submitted.created
    assert [i.sha256 for i in submitted.job.inputs] == [dataset.sha256]

    job = coordinator_pb2.GetJobRequest(job_id="shared-name")
    ref = coordinator_pb2.GetDatasetRequest(dataset_id=dataset.dataset_id)
    not_found = {
        "GetJob": coordinator.GetJob(job, metadata=b),
        "WatchJob": coordinator.WatchJob(coordinator_pb2.WatchJobRequest(job_id="shared-name"), metadata=b),
        "StreamSamples": coordinator.StreamSamples(coordinator_pb2.StreamSamplesRequest(job_id="shared-name"), metadata=b),
        "ExportJob": coordinator.ExportJob(coordinator_pb2.ExportJobRequest(job_id="shared-name"), metadata=b),
        "CancelJob": coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="shared-name"), metadata=b),
        "RetryJob": coordinator.RetryJob(coordinator_pb2.RetryJobRequest(job_id="shared-name"), metadata=b),
        "DownloadExport": coordinator.DownloadExport(
            coordinator_pb2.DownloadExportRequest(job_id="shared-name", name="manifest.json"), metadata=b
        ),
        "ListReviews": coordinator.ListReviews(coordinator_pb2.ListReviewsRequest(job_id="shared-name"), metadata=b),
        "SubmitReviews": coordinator.SubmitReviews(
            coordinator_pb2.SubmitReviewsRequest(job_id="shared-name", reviews=[coordinator_pb2.ItemReview(item_id="p00000", kept=True)]),
            metadata=b,
        ),
        "GetDataset": coordinator.GetDataset(ref, metadata=b),
        "DeleteDataset": coordinator.DeleteDataset(coordinator_pb2.DeleteDatasetRequest(dataset_id=dataset.dataset_id), metadata=b),
    }
    messages = {name: await refused(call, grpc.StatusCode.NOT_FOUND) for name, call in not_found.items()}
    # A missing job reads exactly like another tenant's.
    missing = await refused(coordinator.GetJob(coordinator_pb2.GetJobRequest(job_id="no-such-job"), metadata=b), grpc.StatusCode.NOT_FOUND)
    assert messages["GetJob"] == missing.replace("no-such-job", "shared-name")
    assert not (await coordinator.ListJobs(coordinator_pb2.ListJobsRequest(), metadata=b)).jobs
    assert not (await coordinator.ListDatasets(coordinator_pb2.ListDatasetsRequest(), metadata=b)).datasets
    # B cannot name A's dataset in a job of its own either, and its own job of the same id is its own.
    stolen = coordinator_pb2.JobSpec()
    stolen.CopyFrom(spec)
    await refused(
        coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="b-job", spec=stolen), metadata=b), grpc.StatusCode.NOT_FOUND
    )
    own = await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="shared-name", spec=waiting_job()), metadata=b)
    assert own.created

    # A still has everything: cancel, export and download its job (a cancelled job exports what it finished).
    await coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="shared-name"), metadata=a)
    await coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="shared-name"), metadata=b)
    files = (await coordinator.ExportJob(coordinator_pb2.ExportJobRequest(job_id="shared-name"), metadata=a)).files
    manifest = next(f for f in files if f.kind == "manifest")
    download = coordinator.DownloadExport(coordinator_pb2.DownloadExportRequest(job_id="shared-name", name=manifest.name), metadata=a)
    chunks = [chunk async for chunk in download]
    body = b"".join(c.data for c in chunks)
    assert chunks[-1].last and chunks[-1].sha256 == hashlib.sha256(body).hexdigest() == manifest.sha256
    assert json.loads(body)["job_id"] == "shared-name"
    assert (await coordinator.GetDataset(ref, metadata=a)).dataset.sha256 == dataset.sha256
    # A viewer of A reads but does not act.
    viewer = bearer(platform.tokens["a_viewer"])
    assert (await coordinator.GetJob(job, metadata=viewer)).job.id == "shared-name"
    await refused(
        coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="shared-name"), metadata=viewer), grpc.StatusCode.PERMISSION_DENIED
    )
    await refused(upload(coordinator, platform.tokens["a_viewer"], b'{"prompt": "x"}\n'), grpc.StatusCode.PERMISSION_DENIED)
    # One audit line per mutating call: tenant, principal, method, object.
    audit = [
        line
        for line in map(json.loads, (platform.logs / "coordinator.log").read_text().splitlines())
        if line.get("event") == "audit" and line.get("method", "").endswith("/SubmitJob")
    ]
    assert any(line["tenant"] == "team-a" and line["principal"] == "team-a-user" and line["object"] == "shared-name" for line in audit), (
        audit
    )
    assert any(line["tenant"] == "team-b" and line["principal"] == "team-b-bot" and line["object"] == "b-job" for line in audit), audit


@pytest.mark.asyncio(loop_scope="module")
async def test_namespaces_and_collections_are_the_tenants_own_until_an_admin_shares_them(stubs: dict[str, Any], platform: Platform) -> None:
    dedup, tools = stubs["dedup"], stubs["tool_executor"]
    a, b = bearer(platform.tokens["a"]), bearer(platform.tokens["b"])
    first = dedup_pb2.FilterBatchRequest(namespace="ideas", items=[dedup_pb2.DedupItem(id="1", text="Write a poem about the sea.")])
    assert (await dedup.FilterBatch(first, metadata=a)).verdicts[0].kept
    # B's "ideas" is B's own, empty namespace; A's is not reachable by name.
    planted = dedup_pb2.FilterBatchRequest(namespace="ideas", items=[dedup_pb2.DedupItem(id="x", text="Write a poem about the sea.")])
    assert (await dedup.FilterBatch(planted, metadata=b)).verdicts[0].kept
    for call in (
        dedup.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="team-a/ideas"), metadata=b),
        dedup.FilterBatch(dedup_pb2.FilterBatchRequest(namespace="team-a/ideas", items=planted.items), metadata=b),
    ):
        await refused(call, grpc.StatusCode.NOT_FOUND)
    assert (await dedup.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="ideas"), metadata=a)).size == 1
    # Sharing is an admin act.
    share = dedup_pb2.ShareNamespaceRequest(namespace="ideas", tenant="team-b")
    await refused(dedup.ShareNamespace(share, metadata=a), grpc.StatusCode.PERMISSION_DENIED)
    assert "team-b" in (await dedup.ShareNamespace(share, metadata=bearer(platform.tokens["a_admin"]))).tenants
    assert (await dedup.GetNamespace(dedup_pb2.GetNamespaceRequest(namespace="team-a/ideas"), metadata=b)).size == 1

    document = tool_executor_pb2.Document(id="d1", text="The capital of Freedonia is Fredville.")
    await tools.IndexDocuments(tool_executor_pb2.IndexDocumentsRequest(collection="facts", documents=[document]), metadata=a)
    forged = tool_executor_pb2.Document(id="d1", text="The capital of Freedonia is Attackerville.")
    await tools.IndexDocuments(tool_executor_pb2.IndexDocumentsRequest(collection="facts", documents=[forged]), metadata=b)

    def search(collection: str) -> tool_executor_pb2.ExecuteToolsRequest:
        call = tool_executor_pb2.ToolCall(id="c", tool="Search", input="capital of Freedonia")
        return tool_executor_pb2.ExecuteToolsRequest(calls=[call], context=tool_executor_pb2.ToolContext(collection=collection))

    result = (await tools.ExecuteTools(search("facts"), metadata=a)).results[0]
    assert "Fredville" in result.output and "Attackerville" not in result.output
    own = (await tools.ExecuteTools(search("facts"), metadata=b)).results[0]
    assert "Attackerville" in own.output
    # A's collection, unshared, is not B's to search: refused like one that does not exist.
    try:
        from_b = (await tools.ExecuteTools(search("team-a/facts"), metadata=b)).results[0]
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.code()
    else:
        assert not from_b.output and from_b.HasField("error"), from_b
    share_facts = tool_executor_pb2.ShareCollectionRequest(collection="facts", tenant="team-b")
    await refused(tools.ShareCollection(share_facts, metadata=a), grpc.StatusCode.PERMISSION_DENIED)
    await tools.ShareCollection(share_facts, metadata=bearer(platform.tokens["a_admin"]))
    shared = (await tools.ExecuteTools(search("team-a/facts"), metadata=b)).results[0]
    assert "Fredville" in shared.output and "Attackerville" not in shared.output


@pytest.mark.asyncio(loop_scope="module")
async def test_each_quota_trips_resource_exhausted_naming_it(stubs: dict[str, Any], platform: Platform) -> None:
    coordinator = stubs["coordinator"]
    q = bearer(platform.tokens["q"])
    line = json.dumps({"prompt": "Say something kind."}) + "\n"
    # upload_bytes: one dataset larger than the bound.
    message = await refused(upload(coordinator, platform.tokens["q"], line.encode() * 100), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "upload_bytes" in message and f"{QUOTAS_Q['upload_bytes']:,}" in message
    # stored_bytes: two datasets that fit one by one, not together.
    first = (line * 70).encode()
    second = (line.replace("kind", "true") * 70).encode()
    assert len(second) <= QUOTAS_Q["upload_bytes"] and QUOTAS_Q["stored_bytes"] < len(first) + len(second)
    await upload(coordinator, platform.tokens["q"], first)
    message = await refused(upload(coordinator, platform.tokens["q"], second), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "stored_bytes" in message and f"{QUOTAS_Q['stored_bytes']:,}" in message
    # items_per_job: more prompts than a job may plan.
    many = "".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(QUOTAS_Q["items_per_job"] + 1))
    message = await refused(
        coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="too-many", spec=waiting_job(many)), metadata=q),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "items_per_job" in message
    # running_jobs: a second job while the first waits.
    await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="first", spec=waiting_job()), metadata=q)
    message = await refused(
        coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="second", spec=waiting_job()), metadata=q),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "running_jobs" in message and "is 1" in message
    await coordinator.CancelJob(coordinator_pb2.CancelJobRequest(job_id="first"), metadata=q)
    assert (await coordinator.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="second", spec=waiting_job()), metadata=q)).created
