"""Authentication over real gRPC sockets: bearer tokens (static and JWT),
roles per method, the on-behalf-of header, audit lines, TLS and mutual TLS,
and the CLI's refusal to serve without an auth configuration."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import structlog
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from jwt.algorithms import RSAAlgorithm

from autodidact.backends.llm import Generation, GenerationRequest, ModelDescription, TokenScore
from autodidact.backends.llm.base import GeneratedSample
from autodidact.client import health_stub
from autodidact.coordinator.service import CoordinatorSettings, coordinator_component
from autodidact.generator.service import generator_component
from autodidact.runtime import auth
from autodidact.runtime.auth import AuthSettings, StaticToken, object_of_request, required_role
from autodidact.runtime.channels import ClientCredentials, TokenFile, create_channel, set_default_client_credentials
from autodidact.runtime.component import Component
from autodidact.runtime.principal import ADMIN, ON_BEHALF_OF_HEADER, SERVICE, SUBMITTER, VIEWER, Principal, acting_as
from autodidact.runtime.server import ServiceHost
from autodidact.runtime.settings import ServerSettings
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.conftest import details_of, free_port, text_request

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
ISSUER = "https://issuer.test"
AUDIENCE = "autodidact"
GENERATE = "/autodidact.v1.GeneratorService/Generate"

# token -> (subject, tenant, roles), in the auth file by sha256.
TOKENS = {
    "viewer-" + "v" * 30: ("dashboard", "team-a", [VIEWER]),
    "submitter-" + "s" * 30: ("bot", "team-a", [SUBMITTER]),
    "service-" + "x" * 30: ("services", "platform", [SERVICE]),
}
VIEWER_TOKEN, SUBMITTER_TOKEN, SERVICE_TOKEN = TOKENS


class EchoBackend:
    """A model that answers every prompt with "echo": the generator needs one,
    and what it says does not matter to authentication."""

    description = ModelDescription(backend="echo", model="echo", context_length=2048)

    async def generate(self, request: GenerationRequest) -> Generation:
        return Generation(tuple(GeneratedSample("echo", "stop", seed, 1) for seed in request.seeds), prompt_tokens=1)

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        return []

    async def tokenize(self, text: str) -> list[int]:
        return [1] * len(text.split())

    async def close(self) -> None:
        return None


async def load_echo() -> EchoBackend:
    return EchoBackend()


def write_auth_file(path: Path, tokens: dict[str, tuple[str, str, list[str]]], subjects: dict[str, Any] | None = None) -> Path:
    entries = [auth.auth_file_entry(token, subject, tenant, roles) for token, (subject, tenant, roles) in tokens.items()]
    path.write_text(yaml.safe_dump({"tokens": entries, "subjects": subjects or {}}))
    return path


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def auth_settings(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> AuthSettings:
    jwk = json.loads(RSAAlgorithm.to_jwk(signing_key.public_key())) | {"kid": "k1", "use": "sig", "alg": "RS256"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    subjects = {"system:serviceaccount:jobs:runner": {"tenant": "team-k", "roles": [SUBMITTER]}}
    return AuthSettings(
        auth_file=write_auth_file(tmp_path / "auth.yaml", TOKENS, subjects),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwks_file=tmp_path / "jwks.json",
    )


StartHost = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_host() -> AsyncIterator[StartHost]:
    """Starts a host of `component` (default: a generator with the echo model) with `auth`; returns its target."""
    hosts: list[ServiceHost] = []

    async def start(auth_settings: AuthSettings | None, component: Component | None = None) -> str:
        host = ServiceHost([component or generator_component(load_echo)], ServerSettings(grace_seconds=0, auth=auth_settings))
        hosts.append(host)
        await host.start()
        await host.wait_ready()
        return f"127.0.0.1:{host.port}"

    yield start
    for host in hosts:
        await host.stop(grace=0)


@pytest.fixture
def audit_lines(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """The audit lines written while the test runs."""
    capture = structlog.testing.LogCapture()
    monkeypatch.setattr(
        auth, "log", structlog.wrap_logger(structlog.PrintLogger(), processors=[capture], wrapper_class=structlog.BoundLogger)
    )
    return capture.entries


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def generate(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi"), metadata=metadata, timeout=10)


async def model_info(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await generator_pb2_grpc.GeneratorServiceStub(channel).GetModelInfo(
            generator_pb2.GetModelInfoRequest(), metadata=metadata, timeout=10
        )


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, f"{caught.value.code().name}: {details_of(caught.value)}"
    return details_of(caught.value)


def make_jwt(key: Any, *, algorithm: str = "RS256", kid: str = "k1", **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 600, "tenant": "team-a", "roles": [SUBMITTER]}
    claims |= overrides
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], key: bytes | None) -> str:
    """A token PyJWT refuses to make: alg none, or HS256 keyed with the public key."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600, "tenant": "team-a", "roles": [ADMIN]}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing_input}.{signature}"


# --- refusals ---


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "no bearer token"),
        (bearer("garbage-token-value"), "token not recognised"),
        (bearer("a.b.c"), "token not recognised"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "not a bearer token"),
    ],
)
async def test_calls_without_a_valid_token_are_unauthenticated(start_host, auth_settings, metadata, message):
    target = await start_host(auth_settings)
    for call in (generate(target, metadata), model_info(target, metadata)):
        text = await refused(call, grpc.StatusCode.UNAUTHENTICATED)
        assert message in text
        assert "garbage" not in text and "dXNlcjpwYXNz" not in text  # the credential is never echoed


async def test_static_tokens_carry_their_roles(start_host, auth_settings):
    target = await start_host(auth_settings)
    await model_info(target, bearer(VIEWER_TOKEN))
    message = await refused(generate(target, bearer(VIEWER_TOKEN)), grpc.StatusCode.PERMISSION_DENIED)
    assert message == "Generate needs the submitter role; 'dashboard' has viewer"
    await generate(target, bearer(SUBMITTER_TOKEN))
    await generate(target, bearer(SERVICE_TOKEN))  # service may do what an admin may


async def test_a_rs256_jwt_from_the_jwks_file_is_accepted(start_host, auth_settings, signing_key, audit_lines):
    target = await start_host(auth_settings)
    await generate(target, bearer(make_jwt(signing_key)))
    assert audit_lines[-1] | {"log_level": None} == {
        "event": "audit",
        "log_level": None,
        "tenant": "team-a",
        "principal": "alice",
        "method": GENERATE,
        "object": "",
        "code": "OK",
    }
    # A token with only viewer in its roles claim (as a space-separated scope string).
    await refused(generate(target, bearer(make_jwt(signing_key, roles="viewer"))), grpc.StatusCode.PERMISSION_DENIED)


async def test_a_kubernetes_serviceaccount_token_gets_its_tenant_from_the_auth_file(start_host, auth_settings, signing_key, audit_lines):
    target = await start_host(auth_settings)
    await generate(target, bearer(make_jwt(signing_key, sub="system:serviceaccount:jobs:runner", tenant=None, roles=None)))
    assert audit_lines[-1]["tenant"] == "team-k"
    unmapped = make_jwt(signing_key, sub="system:serviceaccount:other:x", tenant=None, roles=None)
    assert "has no tenant" in await refused(generate(target, bearer(unmapped)), grpc.StatusCode.PERMISSION_DENIED)


def bad_tokens(signing_key: rsa.RSAPrivateKey) -> dict[str, tuple[str, str]]:
    public_pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": (make_jwt(signing_key, exp=int(time.time()) - 120), "token expired"),
        "wrong audience": (make_jwt(signing_key, aud="someone-else"), "token audience not accepted"),
        "wrong issuer": (make_jwt(signing_key, iss="https://evil.test"), "token issuer not accepted"),
        "foreign key": (make_jwt(other_key), "token signature does not verify"),
        "unknown key id": (make_jwt(other_key, kid="k2"), "key this server does not know"),
        "no exp": (make_jwt(signing_key, exp=None), "lacks the 'exp' claim"),
        "alg none": (forged({"alg": "none", "kid": "k1"}, None), "algorithm not accepted"),
        "HS256 keyed with the public key": (forged({"alg": "HS256", "kid": "k1", "typ": "JWT"}, public_pem), "algorithm not accepted"),
        "bad tenant claim": (make_jwt(signing_key, tenant="Team/A"), "tenant must be"),
    }


async def test_bad_jwts_are_refused_naming_nothing_secret(start_host, auth_settings, signing_key):
    target = await start_host(auth_settings)
    for name, (token, message) in bad_tokens(signing_key).items():
        code = grpc.StatusCode.PERMISSION_DENIED if name == "bad tenant claim" else grpc.StatusCode.UNAUTHENTICATED
        text = await refused(generate(target, bearer(token)), code)
        assert message in text, name
        assert token not in text and "BEGIN" not in text, name


async def test_keys_can_come_from_a_jwks_url(start_host, auth_settings, signing_key, tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        target = await start_host(AuthSettings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url=url))
        await generate(target, bearer(make_jwt(signing_key)))
        other = make_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid="k2")
        assert "key this server does not know" in await refused(generate(target, bearer(other)), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        server.shutdown()
        server.server_close()
    target = await start_host(AuthSettings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url=f"http://127.0.0.1:{free_port()}/jwks"))
    message = await refused(generate(target, bearer(make_jwt(signing_key))), grpc.StatusCode.UNAVAILABLE)
    assert "cannot reach the key set" in message


async def test_made_up_key_ids_do_not_make_every_call_fetch_the_key_set(start_host, signing_key, tmp_path):
    import http.server
    import threading

    jwk = json.loads(RSAAlgorithm.to_jwk(signing_key.public_key())) | {"kid": "k1", "use": "sig", "alg": "RS256"}
    body = json.dumps({"keys": [jwk]}).encode()
    fetches = 0

    class KeySet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            nonlocal fetches
            fetches += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeySet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        target = await start_host(AuthSettings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url=url))
        await generate(target, bearer(make_jwt(signing_key)))
        for n in range(6):  # an attacker's tokens, each naming a key id nobody issued
            await refused(generate(target, bearer(make_jwt(signing_key, kid=f"made-up-{n}"))), grpc.StatusCode.UNAUTHENTICATED)
        await generate(target, bearer(make_jwt(signing_key)))  # the real key still verifies, from the cache
    finally:
        server.shutdown()
        server.server_close()
    assert fetches <= 2, fetches  # the first fetch, and one refetch for an unknown key id within the interval


# --- tenants, audit, open methods ---


async def test_only_a_service_may_name_the_tenant_it_acts_for(start_host, auth_settings, audit_lines):
    target = await start_host(auth_settings)
    on_behalf = ((ON_BEHALF_OF_HEADER, "team-b"),)
    await generate(target, bearer(SERVICE_TOKEN) + on_behalf)
    assert (audit_lines[-1]["tenant"], audit_lines[-1]["principal"]) == ("team-b", "services")
    await generate(target, bearer(SUBMITTER_TOKEN) + on_behalf)
    assert (audit_lines[-1]["tenant"], audit_lines[-1]["principal"]) == ("team-a", "bot")  # ignored
    await refused(generate(target, (*bearer(SERVICE_TOKEN), (ON_BEHALF_OF_HEADER, "../x"))), grpc.StatusCode.PERMISSION_DENIED)


async def test_a_jwt_cannot_claim_the_service_role(start_host, auth_settings, signing_key):
    target = await start_host(auth_settings)
    token = make_jwt(signing_key, roles=[SERVICE])
    message = await refused(generate(target, (*bearer(token), (ON_BEHALF_OF_HEADER, "team-b"))), grpc.StatusCode.PERMISSION_DENIED)
    assert "granted only by the auth file" in message


async def test_an_opened_method_acts_for_no_tenant(start_host, auth_settings, tmp_path):
    """An operator opens a coordinator method: a call without a token reaches nobody's data,
    not the default tenant's with the admin role (what no principal at all would mean)."""
    opened_method = "/autodidact.v1.CoordinatorService/GetDataset"
    opened = AuthSettings(**{**vars(auth_settings), "open_methods": (*auth_settings.open_methods, opened_method)})
    target = await start_host(opened, coordinator_component(CoordinatorSettings(data_dir=tmp_path / "coordinator")))
    body = b'{"prompt": "hello"}\n'
    header = coordinator_pb2.UploadDatasetHeader(
        name="p.jsonl", format=coordinator_pb2.DATASET_FORMAT_JSONL, sha256=hashlib.sha256(body).hexdigest(), size_bytes=len(body)
    )
    async with create_channel(target, timeout_seconds=30) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        call = stub.UploadDataset(metadata=bearer(SUBMITTER_TOKEN))
        await call.write(coordinator_pb2.UploadDatasetRequest(header=header))
        await call.write(coordinator_pb2.UploadDatasetRequest(chunk=body))
        await call.done_writing()
        dataset = (await call).dataset
        request = coordinator_pb2.GetDatasetRequest(dataset_id=dataset.dataset_id)
        assert (await stub.GetDataset(request, metadata=bearer(SUBMITTER_TOKEN))).dataset.sha256 == dataset.sha256
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetDataset(request)  # open, so no UNAUTHENTICATED: but it is nobody's call
        assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


async def test_health_and_reflection_stay_open(start_host, auth_settings):
    target = await start_host(auth_settings)
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_one_audit_line_per_call_that_may_change_something(start_host, auth_settings, audit_lines):
    target = await start_host(auth_settings)
    await model_info(target, bearer(VIEWER_TOKEN))  # a viewer's call: none
    assert audit_lines == []
    await refused(generate(target, bearer(VIEWER_TOKEN)), grpc.StatusCode.PERMISSION_DENIED)
    await refused(generate(target, bearer("nope")), grpc.StatusCode.UNAUTHENTICATED)
    assert [(line["tenant"], line["principal"], line["code"]) for line in audit_lines] == [
        ("team-a", "dashboard", "PERMISSION_DENIED"),
        ("", "", "UNAUTHENTICATED"),
    ]
    assert all(line["method"] == GENERATE for line in audit_lines)


async def test_the_audit_line_names_the_object_of_the_request(start_host, auth_settings, audit_lines, tmp_path):
    component = coordinator_component(CoordinatorSettings(data_dir=tmp_path / "coordinator"))
    target = await start_host(auth_settings, component)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        call = stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id="job-7"), metadata=bearer(SUBMITTER_TOKEN), timeout=10)
        await refused(call, grpc.StatusCode.NOT_FOUND)
    line = audit_lines[-1]
    assert (line["method"], line["object"], line["code"]) == ("/autodidact.v1.CoordinatorService/CancelJob", "job-7", "NOT_FOUND")


def test_objects_and_roles_by_method_name():
    assert object_of_request(coordinator_pb2.GetJobRequest(job_id="j1")) == "j1"
    assert object_of_request(generator_pb2.GetModelInfoRequest()) == ""
    with auth.AuditScope() as scope:
        auth.audit_request(coordinator_pb2.GetJobRequest(job_id="j1"))
        auth.audit_object("ds-9")  # a handler names what it made
        assert scope.named == "ds-9"
    auth.audit_object("outside any call")  # no effect, no error
    expected = {
        "/autodidact.v1.CoordinatorService/GetJob": VIEWER,
        "/autodidact.v1.CoordinatorService/WatchJob": VIEWER,
        "/autodidact.v1.CoordinatorService/DownloadExport": VIEWER,
        "/autodidact.v1.GeneratorService/GetModelInfo": VIEWER,
        "/autodidact.v1.DedupService/GetNamespace": VIEWER,
        "/autodidact.v1.ToolExecutorService/ListTools": VIEWER,
        "/autodidact.v1.DedupService/ShareNamespace": ADMIN,
        "/autodidact.v1.CoordinatorService/SubmitJob": SUBMITTER,
        "/autodidact.v1.CoordinatorService/UploadDataset": SUBMITTER,
        "/autodidact.v1.CoordinatorService/DeleteDataset": SUBMITTER,
        "/autodidact.v1.CoordinatorService/ListReviews": VIEWER,
        "/autodidact.v1.CoordinatorService/SubmitReviews": SUBMITTER,
    }
    assert {method: required_role(method) for method in expected} == expected


async def test_insecure_mode_binds_anonymous_and_still_audits(start_host, audit_lines):
    target = await start_host(AuthSettings(insecure=True))
    await generate(target)
    assert (audit_lines[-1]["tenant"], audit_lines[-1]["principal"], audit_lines[-1]["code"]) == ("default", "anonymous", "OK")


# --- the auth file and the client side ---


async def test_the_auth_file_is_read_again_when_it_changes(start_host, auth_settings):
    target = await start_host(auth_settings)
    await generate(target, bearer(SUBMITTER_TOKEN))
    assert auth_settings.auth_file is not None
    write_auth_file(auth_settings.auth_file, {"rotated-" + "r" * 30: ("bot", "team-a", [SUBMITTER])})
    os.utime(auth_settings.auth_file, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))  # a new mtime, whatever the clock's grain
    await refused(generate(target, bearer(SUBMITTER_TOKEN)), grpc.StatusCode.UNAUTHENTICATED)
    await generate(target, bearer("rotated-" + "r" * 30))
    auth_settings.auth_file.write_text("tokens: [{broken")  # a bad rotation keeps the last good file
    os.utime(auth_settings.auth_file, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    await generate(target, bearer("rotated-" + "r" * 30))


async def test_channels_send_the_process_identity_and_the_tenant_acted_for(start_host, auth_settings, audit_lines, tmp_path):
    target = await start_host(auth_settings)
    token_file = tmp_path / "token"
    token_file.write_text(SUBMITTER_TOKEN + "\n")
    set_default_client_credentials(ClientCredentials(TokenFile(token_file)))
    try:
        async with create_channel(target, timeout_seconds=10) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            await stub.Generate(text_request("Hi"))
            assert audit_lines[-1]["principal"] == "bot"
            token_file.write_text(SERVICE_TOKEN)  # a rotated projected token
            os.utime(token_file, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
            with acting_as(Principal("team-c", "someone", frozenset({SUBMITTER}))):  # inside a served call or a job
                await stub.Generate(text_request("Hi"))
            assert (audit_lines[-1]["principal"], audit_lines[-1]["tenant"]) == ("services", "team-c")
    finally:
        set_default_client_credentials(None)
    async with create_channel(target, timeout_seconds=10) as channel:  # no default identity: no token
        await refused(generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi")), grpc.StatusCode.UNAUTHENTICATED)


async def test_client_streaming_calls_carry_the_token(start_host, auth_settings, tmp_path):
    target = await start_host(auth_settings, coordinator_component(CoordinatorSettings(data_dir=tmp_path / "coordinator")))

    async def chunks() -> AsyncIterator[coordinator_pb2.UploadDatasetRequest]:
        yield coordinator_pb2.UploadDatasetRequest()

    for credentials, allowed in ((ClientCredentials(SUBMITTER_TOKEN), True), (ClientCredentials(VIEWER_TOKEN), False)):
        async with create_channel(target, timeout_seconds=10, credentials=credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await coordinator_pb2_grpc.CoordinatorServiceStub(channel).UploadDataset(chunks())
        # An empty upload is refused by the servicer, past authentication, or by the role check.
        expected = grpc.StatusCode.PERMISSION_DENIED
        assert (caught.value.code() != expected) if allowed else (caught.value.code() == expected)
        assert caught.value.code() != grpc.StatusCode.UNAUTHENTICATED


# --- TLS ---


def self_signed(path: Path, name: str, ip: str | None = "127.0.0.1") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = path / f"{name}.crt", path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_round_trip_with_a_token(start_host, auth_settings, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    target = await start_host(AuthSettings(auth_file=auth_settings.auth_file, tls_cert=cert, tls_key=key))
    async with create_channel(target, timeout_seconds=10, credentials=ClientCredentials(SUBMITTER_TOKEN, tls_ca=cert)) as channel:
        await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi"))
    # Plaintext to a TLS port gets no answer.
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        await refused(
            stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), metadata=bearer(VIEWER_TOKEN), timeout=3), grpc.StatusCode.UNAVAILABLE
        )


async def test_mutual_tls_refuses_a_client_without_a_certificate(start_host, tmp_path):
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client", ip=None)
    target = await start_host(AuthSettings(insecure=True, tls_cert=server_cert, tls_key=server_key, tls_client_ca=client_cert))
    request = generator_pb2.GetModelInfoRequest()
    async with create_channel(target, timeout_seconds=3, credentials=ClientCredentials(tls_ca=server_cert)) as channel:
        await refused(generator_pb2_grpc.GeneratorServiceStub(channel).GetModelInfo(request), grpc.StatusCode.UNAVAILABLE)
    with_cert = ClientCredentials(tls_ca=server_cert, tls_cert=client_cert, tls_key=client_key)
    async with create_channel(target, timeout_seconds=10, credentials=with_cert) as channel:
        await generator_pb2_grpc.GeneratorServiceStub(channel).GetModelInfo(request)


# --- the CLI ---


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTODIDACT_")} | {"AUTODIDACT_LOG_FORMAT": "json"}
    return subprocess.run([AUTODIDACT, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "serve needs an auth configuration (--auth-file, or --jwks-file"),
        (["--jwks-file", "jwks.json"], "needs --jwt-issuer and --jwt-audience"),
        (["--insecure", "--tls-cert", "c.pem"], "TLS needs both --tls-cert and --tls-key"),
    ],
)
def test_serve_refuses_to_start_without_an_auth_configuration(flags, message):
    started = time.monotonic()
    result = cli("serve", "generator", "--port", str(free_port()), "--metrics-port", "0", *flags)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "--insecure" in lines[0] or flags
    assert time.monotonic() - started < 20  # refused before any model loads


async def test_autodidact_token_prints_a_token_and_its_auth_file_entry(start_host, tmp_path):
    result = cli("token", "--tenant", "team-z", "--subject", "ci", "--role", "submitter", "--role", "viewer")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    entries = yaml.safe_load(result.stderr)
    assert token not in result.stderr and len(token) >= 40
    assert entries == [
        {"sha256": hashlib.sha256(token.encode()).hexdigest(), "subject": "ci", "tenant": "team-z", "roles": ["submitter", "viewer"]}
    ]
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump({"tokens": entries}))
    target = await start_host(AuthSettings(auth_file=tmp_path / "auth.yaml"))
    await generate(target, bearer(token))


def test_the_session_token_is_private_to_its_user(tmp_path):
    from autodidact.cli import _session, _write_session_token

    (tmp_path / "session.token").write_text("old")
    os.chmod(tmp_path / "session.token", 0o644)
    token = _write_session_token(tmp_path)
    path = tmp_path / "session.token"
    assert path.read_text().strip() == token != "old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = _session(AuthSettings(), token).static_tokens
    assert entry == StaticToken.of(token, "autodidact-session", "default", frozenset({ADMIN, SERVICE}))


@pytest.fixture(autouse=True)
def no_default_credentials() -> Iterator[None]:
    yield
    set_default_client_credentials(None)
