"""A caller on another machine, against a real `autodidact up` process that
shares no path with it: the client's files are uploaded, the dataset is
downloaded, and nothing needs the coordinator to see the client's disk.
Then the same through an object store: the S3-compatible server here is
moto's standalone server (`moto_server`), a real HTTP endpoint on loopback;
the coordinator reads its input from s3:// under an allowed root and puts
the export there, and the client fetches it by presigned URL without
credentials.

The stack is `autodidact up` with its session token (authentication on):
the client is told the token through AUTODIDACT_TOKEN, as a remote caller
would be given one, not through a shared file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from autodidact.client import wait_until_serving
from autodidact.runtime.channels import ClientCredentials, create_channel
from autodidact.stack import shifted_ports
from autodidact.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.conftest import details_of, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
AUTODIDACT = str(BIN / "autodidact")
BUCKET = "autodidact-e2e"
QUESTIONS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?"},
]
RECIPE = (
    "self_consistency:\n"
    "  questions_path: data/questions.jsonl\n"  # relative to the recipe: a file of the client's
    "  max_questions: 2\n"
    "  paths_per_question: 2\n"
    "  sampling: {max_tokens: 32, temperature: 0.1}\n"
    "seed: 7\n"
)


@dataclass
class Server:
    coordinator: str
    token: str
    data_dir: Path
    s3_env: dict[str, str]


def _free_base_port() -> int:
    """A base port whose five neighbours are free too (`up` binds six)."""
    for _ in range(50):
        base = free_port()
        try:
            ports = shifted_ports(base)
        except ValueError:
            continue
        import socket

        try:
            for port in ports.values():
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no six free consecutive ports")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server-machine")
    s3_port = free_port()
    s3_env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    moto = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _put_objects(s3_env, {})  # the operator's bucket exists before the coordinator exports into it
    base = _free_base_port()
    data_dir = root / ".autodidact"
    with (root / "up.log").open("wb") as log:
        up = subprocess.Popen(
            [
                AUTODIDACT,
                "up",
                "--base-port",
                str(base),
                "--data-dir",
                str(data_dir),
                "--metrics-port",
                "0",
                "--threads",
                "2",
                "--embed-threads",
                "2",
                "--input-root",
                f"s3://{BUCKET}/inputs/",
                "--export-url",
                f"s3://{BUCKET}/exports",
                "--export-url-ttl",
                "600",
                "--log-format",
                "json",
            ],
            cwd=root,  # the server's own working folder: nothing of the client's is under it
            env={**os.environ, **s3_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        token_file = data_dir / "session.token"
        deadline = time.monotonic() + 120
        while not token_file.is_file() and time.monotonic() < deadline:
            assert up.poll() is None, (root / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        yield Server(f"127.0.0.1:{base}", token, data_dir, s3_env)
    finally:
        up.terminate()
        moto.terminate()
        for process in (up, moto):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _put_objects(s3_env: dict[str, str], objects: dict[str, bytes]) -> None:
    """Creates the bucket (once) and puts `objects` (key -> bytes) in it, as the data's owner would."""
    import fsspec

    saved = dict(os.environ)
    os.environ.update(s3_env)
    try:
        fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}", skip_instance_cache=True)
        deadline = time.monotonic() + 30
        while True:  # the server may still be starting
            try:
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for key, data in objects.items():
            with fs.open(f"{BUCKET}/{key}", "wb") as sink:
                sink.write(data)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _client(tmp_path: Path) -> Path:
    """The client machine's folder: a recipe and its input file, nowhere the server looks."""
    client = tmp_path / "client-machine"
    (client / "data").mkdir(parents=True)
    (client / "data" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (client / "recipe.yaml").write_text(RECIPE)
    return client


def _run(client: Path, server: Server, token: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTODIDACT_")}
    if token is not None:
        env["AUTODIDACT_TOKEN"] = token
    return subprocess.run(
        [AUTODIDACT, "run", "recipe.yaml", "--coordinator", server.coordinator, "--job-id", "remote-1", "--out", "dataset", *extra],
        cwd=client,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )


def test_run_uploads_the_inputs_and_downloads_the_dataset_with_no_shared_filesystem(server: Server, tmp_path: Path) -> None:
    client = _client(tmp_path)
    refused = _run(client, server, token=None)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr

    done = _run(client, server, token=server.token)
    assert done.returncode == 0, done.stdout + done.stderr
    dataset = client / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    for file in manifest["files"]:  # every file arrived whole, as the coordinator hashed it
        assert hashlib.sha256((dataset / file["name"]).read_bytes()).hexdigest() == file["sha256"], file["name"]
    lineage = [json.loads(line) for line in (dataset / "lineage.jsonl").read_text().splitlines()]
    assert sorted(row["item_id"] for row in lineage if "/" not in row["item_id"]) == ["q00000", "q00001"]  # both questions
    # The job names the upload, never the client's path; the server holds the bytes in its own storage.
    uploaded = "dataset:ds-" + hashlib.sha256((client / "data" / "questions.jsonl").read_bytes()).hexdigest()[:32]
    assert manifest["spec"]["selfConsistency"]["questionsPath"] == uploaded
    assert str(client) not in json.dumps(manifest)
    assert list(server.data_dir.glob("coordinator/tenants/default/datasets/ds-*.data"))


async def _s3_job(server: Server, questions_uri: str) -> coordinator_pb2.ExportJobResponse:
    credentials = ClientCredentials(server.token)
    async with create_channel(server.coordinator, timeout_seconds=600, credentials=credentials) as channel:
        await wait_until_serving(channel, timeout=300)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        spec = coordinator_pb2.JobSpec(seed=7)
        spec.self_consistency.questions_path = questions_uri
        spec.self_consistency.max_questions = 2
        spec.self_consistency.paths_per_question = 2
        spec.self_consistency.sampling.max_tokens = 32
        # Outside the allowed prefix: refused without a word about the bucket's contents.
        outside = coordinator_pb2.JobSpec()
        outside.CopyFrom(spec)
        outside.self_consistency.questions_path = f"s3://{BUCKET}/private/secrets.jsonl"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="s3-outside", spec=outside))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a readable file under an input root" in details_of(raised.value)

        submitted = await stub.SubmitJob(coordinator_pb2.SubmitJobRequest(job_id="s3-1", spec=spec))
        assert submitted.job.inputs[0].reference == questions_uri
        async for event in stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id="s3-1"), timeout=600):
            job = event.job
        assert job.state == coordinator_pb2.JOB_STATE_SUCCEEDED, job.error
        return await stub.ExportJob(coordinator_pb2.ExportJobRequest(job_id="s3-1"))


def test_an_s3_round_trip_reads_the_input_from_the_bucket_and_exports_presigned_urls(server: Server) -> None:
    questions = "".join(json.dumps(q) + "\n" for q in QUESTIONS).encode()
    _put_objects(server.s3_env, {"inputs/questions.jsonl": questions, "private/secrets.jsonl": b'{"question": "SECRET"}\n'})

    exported = asyncio.run(_s3_job(server, f"s3://{BUCKET}/inputs/questions.jsonl"))
    by_name = {file.name: file for file in exported.files}
    assert {"paths.jsonl", "lineage.jsonl", "manifest.json"} <= set(by_name)
    for file in exported.files:
        # Fetched without credentials, as a caller with only the URL would.
        assert file.url.startswith(server.s3_env["AWS_ENDPOINT_URL"] + f"/{BUCKET}/exports/default/s3-1/{file.name}")
        assert file.url_expires_at.seconds > time.time() + 500
        body = urllib.request.urlopen(file.url, timeout=30).read()
        assert hashlib.sha256(body).hexdigest() == file.sha256 and len(body) == file.size_bytes, file.name
    manifest = json.loads(urllib.request.urlopen(by_name["manifest.json"].url, timeout=30).read())
    assert manifest["job_id"] == "s3-1" and manifest["spec"]["selfConsistency"]["questionsPath"].startswith("s3://")
