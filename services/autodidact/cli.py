"""The `autodidact` command.

autodidact serve SERVICE [--port PORT]   host one service (needs an auth configuration or --insecure)
autodidact up [--base-port N]            host every implemented service, loopback ports N to N+5,
                                         with a fresh session token in <data-dir>/session.token
autodidact generate "PROMPT"             sample from a running generator
autodidact run RECIPE.yaml               run a recipe as a job, with progress and a summary
autodidact report JOB_ID                 a job's report (one self-contained HTML file), even while it runs
autodidact token --tenant T --subject S --role R
                                         a new static token (stdout) and its auth-file entry (stderr)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from autodidact.runtime.auth import DEFAULT_OPEN_METHODS, AuthSettings, StaticToken, new_token
from autodidact.runtime.logging import configure_logging
from autodidact.runtime.principal import ADMIN, DEFAULT_TENANT, ROLES, SERVICE
from autodidact.runtime.settings import ServerSettings

if TYPE_CHECKING:  # each command imports the service graph only when it runs
    from autodidact.runtime.channels import ClientCredentials
    from autodidact.stack import StackOptions

# Where `up` writes its session token (under --data-dir) and where clients look for it.
SESSION_TOKEN = "session.token"
NO_AUTH_ERROR = (
    "error: serve needs an auth configuration (--auth-file, or --jwks-file / --jwks-url with --jwt-issuer and "
    "--jwt-audience) or --insecure to serve without authentication"
)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AUTODIDACT_{name}", default)


def _env_path(name: str) -> Path | None:
    value = _env(name)
    return Path(value) if value else None


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _shard(text: str) -> Any:
    """--shard's value: a dedup.routing.Shard, or None for an unsharded server."""
    if not text:
        return None
    from autodidact.dedup.routing import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_auth_args(parser: argparse.ArgumentParser) -> None:
    """Who may call this server, TLS, and this process's own identity towards other services."""
    group = parser.add_argument_group("authentication and TLS (env AUTODIDACT_<FLAG>, e.g. AUTODIDACT_AUTH_FILE)")
    group.add_argument(
        "--insecure",
        action="store_true",
        default=_env_flag("INSECURE"),
        help="serve without authentication: every call acts as tenant 'default' with the admin role",
    )
    group.add_argument(
        "--auth-file",
        type=Path,
        default=_env_path("AUTH_FILE"),
        help="YAML: `tokens` (static bearer tokens by sha256, see `autodidact token`) and `subjects` (JWT subjects' tenant and roles)",
    )
    group.add_argument("--jwt-issuer", default=_env("JWT_ISSUER", ""), help="the `iss` JWTs must carry")
    group.add_argument("--jwt-audience", default=_env("JWT_AUDIENCE", ""), help="the `aud` JWTs must carry")
    group.add_argument("--jwks-file", type=Path, default=_env_path("JWKS_FILE"), help="the issuer's public keys (JWKS JSON)")
    group.add_argument("--jwks-url", default=_env("JWKS_URL", ""), help="where to fetch the issuer's public keys (JWKS)")
    group.add_argument("--jwt-tenant-claim", default=_env("JWT_TENANT_CLAIM", "tenant"), help="claim naming the tenant (default tenant)")
    group.add_argument("--jwt-roles-claim", default=_env("JWT_ROLES_CLAIM", "roles"), help="claim listing the roles (default roles)")
    group.add_argument(
        "--open-methods",
        default=_env("OPEN_METHODS", ",".join(DEFAULT_OPEN_METHODS)),
        help="comma-separated method prefixes served without authentication (default: health and reflection)",
    )
    group.add_argument("--tls-cert", type=Path, default=_env_path("TLS_CERT"), help="serve TLS with this certificate (PEM)")
    group.add_argument("--tls-key", type=Path, default=_env_path("TLS_KEY"), help="the certificate's private key (PEM)")
    group.add_argument(
        "--tls-client-ca", type=Path, default=_env_path("TLS_CLIENT_CA"), help="mutual TLS: clients need a certificate this CA signed"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=_env_path("TOKEN_FILE"),
        help="this service's own bearer token for its calls to other services (re-read when it changes)",
    )
    group.add_argument("--tls-ca", type=Path, default=_env_path("TLS_CA"), help="call other services over TLS, verified with this CA")


def _add_coordinator_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("coordinator")
    group.add_argument("--tenants-file", type=Path, default=_env_path("TENANTS_FILE"), help="YAML: quotas and input roots per tenant")
    group.add_argument(
        "--store-dsn",
        default=_env("STORE_DSN", ""),
        help="postgresql://… : keep jobs in PostgreSQL instead of DATA_DIR/coordinator/jobs.sqlite "
        "(pass it as AUTODIDACT_STORE_DSN: a flag's value shows in the process list)",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=float(_env("LEASE_SECONDS", "30") or 30),
        help="how long a coordinator holds a job unless it renews (every third of it); another replica "
        "on the same --store-dsn takes over a dead one's jobs after this (default 30)",
    )
    roots = _env("INPUT_ROOT")
    group.add_argument(
        "--input-root",
        action="append",
        default=[root for root in roots.split(",") if root] if roots else [],
        help="a server folder or s3:// prefix every tenant's jobs may read (repeatable; env: comma-separated; default none)",
    )
    group.add_argument(
        "--export-url", default=_env("EXPORT_URL", ""), help="s3://bucket/prefix: exports also go there, fetched by presigned URL"
    )
    group.add_argument(
        "--export-url-ttl",
        type=float,
        default=float(_env("EXPORT_URL_TTL", "3600") or 3600),
        help="seconds a presigned export URL stays valid (default 3600)",
    )


def _add_client_auth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=_env("TOKEN"),
        help=f"bearer token (default: env AUTODIDACT_TOKEN, else the <data-dir>/{SESSION_TOKEN} that `autodidact up` wrote)",
    )
    parser.add_argument("--tls-ca", type=Path, default=_env_path("TLS_CA"), help="talk TLS, verifying the server with this CA (PEM)")
    parser.add_argument(
        "--tls-client-cert", type=Path, default=_env_path("TLS_CLIENT_CERT"), help="mutual TLS: this client's certificate (PEM)"
    )
    parser.add_argument("--tls-client-key", type=Path, default=_env_path("TLS_CLIENT_KEY"), help="mutual TLS: its private key (PEM)")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning, error")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=_env("LOG_FORMAT", "auto"),
        help="auto: JSON unless stderr is a terminal",
    )


def _add_server_args(parser: argparse.ArgumentParser, default_host: str) -> None:
    from autodidact.backends.registry import EMBEDDER_PORT, LLM_PORT

    defaults = ServerSettings()
    parser.add_argument("--host", default=_env("HOST", default_host), help=f"address to bind (default {default_host})")
    metrics = _env("METRICS_PORT")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(metrics) if metrics else None,
        help="Prometheus /metrics port; 0 turns it off (default: the service's, 9464 to 9469, see README; `up`: 9464)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=defaults.max_concurrent_rpcs,
        help=f"unary calls in progress at once per service; more get RESOURCE_EXHAUSTED (default {defaults.max_concurrent_rpcs})",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=defaults.max_concurrent_streams,
        help=f"response streams (WatchJob, StreamSamples, health Watch) at once per service (default {defaults.max_concurrent_streams})",
    )
    parser.add_argument(
        "--max-message-mib", type=float, default=defaults.max_message_bytes / 2**20, help="largest message in MiB (default 8)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_seconds,
        help=f"seconds in-flight calls get after SIGTERM (default {defaults.grace_seconds:g})",
    )
    parser.add_argument(
        "--model", default=_env("MODEL"), help="GGUF file for the embedded backend (default: bundled SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--context-length", type=int, default=2048, help="tokens per llama.cpp context (default 2048)")
    parser.add_argument("--contexts", type=int, default=1, help="llama.cpp contexts, i.e. generations at once (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per context; 0: cores / contexts")
    parser.add_argument("--max-samples", type=int, default=64, help="largest n accepted by Generate (default 64, at most 64)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", ".autodidact") or ".autodidact"),
        help="where the coordinator's job store and the dedup namespaces live (default .autodidact)",
    )
    parser.add_argument("--embed-threads", type=int, default=0, help="torch threads of the embedder; 0: every core")
    parser.add_argument(
        LLM_PORT.flag,
        choices=LLM_PORT.choices,
        default=_env("LLM_BACKEND", LLM_PORT.default),
        help=f"generator and scorer backend; {LLM_PORT.help()}",
    )
    parser.add_argument(LLM_PORT.url_flag, default=_env("LLM_URL", ""), help="a remote backend's server, e.g. http://tgi:80")
    parser.add_argument(
        "--llm-model", default=_env("LLM_MODEL", ""), help="openai_compat: model name to request (default: the server's first)"
    )
    parser.add_argument(
        EMBEDDER_PORT.flag,
        choices=EMBEDDER_PORT.choices,
        default=_env("EMBEDDER", EMBEDDER_PORT.default),
        help=f"dedup embedder; {EMBEDDER_PORT.help()}",
    )
    constitutions_dir = _env("CONSTITUTIONS_DIR")
    parser.add_argument(
        "--constitutions-dir",
        type=Path,
        default=Path(constitutions_dir) if constitutions_dir else None,
        help="critic: a folder of constitution files (*.yaml) added to the built-in ones",
    )
    parser.add_argument(EMBEDDER_PORT.url_flag, default=_env("EMBEDDER_URL", ""), help="a remote embedder's server, e.g. http://tei:80")
    _add_auth_args(parser)
    _add_coordinator_args(parser)
    _add_logging_args(parser)


def _parser() -> argparse.ArgumentParser:
    from autodidact.stack import BASE_PORT, DEFAULT_PORTS

    parser = argparse.ArgumentParser(prog="autodidact", description="Language models write and filter their own training data.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="host one service")
    serve.add_argument("service", choices=sorted(DEFAULT_PORTS))
    serve.add_argument("--port", type=int, help="port (default: the service's, see README)")
    serve.add_argument(
        "--generator-target",
        default=_env("GENERATOR_TARGET", f"localhost:{DEFAULT_PORTS['generator']}"),
        help="coordinator: where the generator is (default localhost:50051)",
    )
    serve.add_argument(
        "--dedup-target",
        default=_env("DEDUP_TARGET", f"localhost:{DEFAULT_PORTS['dedup']}"),
        help="coordinator: where the dedup service is (default localhost:50055); for a sharded one, "
        "every shard's address in shard order, comma-separated",
    )
    serve.add_argument(
        "--shard",
        type=_shard,
        default=_shard(_env("SHARD", "") or ""),
        help="dedup: this server's INDEX/COUNT among the shards (e.g. 0/3); it serves only the namespaces it owns (default: all)",
    )
    serve.add_argument(
        "--scorer-target",
        default=_env("SCORER_TARGET", f"localhost:{DEFAULT_PORTS['scorer']}"),
        help="coordinator: where the scorer is (default localhost:50052)",
    )
    serve.add_argument(
        "--critic-target",
        default=_env("CRITIC_TARGET", f"localhost:{DEFAULT_PORTS['critic']}"),
        help="coordinator: where the critic is (default localhost:50053)",
    )
    serve.add_argument(
        "--tool-executor-target",
        default=_env("TOOL_EXECUTOR_TARGET", f"localhost:{DEFAULT_PORTS['tool-executor']}"),
        help="coordinator: where the tool-executor is (default localhost:50054)",
    )
    _add_server_args(serve, default_host="0.0.0.0")

    up = commands.add_parser("up", help="host every implemented service in one process on loopback")
    up.add_argument(
        "--base-port",
        type=int,
        default=BASE_PORT,
        help=f"ports: this one and the next five, in the order of the README's table (default {BASE_PORT})",
    )
    _add_server_args(up, default_host="127.0.0.1")

    run = commands.add_parser("run", help="run a recipe file as a job: progress, dataset files, summary")
    run.add_argument("recipe", type=Path, help="YAML: the JSON mapping of JobSpec (see examples/)")
    run.add_argument("--coordinator", help="host:port of a running coordinator; default: run the stack in this process")
    run.add_argument("--job-id", help="default: the file name and a hash of its content (running it again resumes)")
    run.add_argument("--out", type=Path, help="where the dataset is downloaded (default out/JOB_ID)")
    run.add_argument(
        "--data-dir", type=Path, default=Path(".autodidact"), help="in-process stack: store and namespaces (default .autodidact)"
    )
    run.add_argument("--threads", type=int, default=0, help="in-process stack: CPU threads for the models; 0: every core")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_client_auth_args(run)
    _add_logging_args(run)

    generate = commands.add_parser("generate", help="sample from a running generator")
    generate.add_argument("prompt")
    generate.add_argument("--target", default=f"localhost:{DEFAULT_PORTS['generator']}")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    generate.add_argument("-n", type=int, default=1, help="samples (default 1)")
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    generate.add_argument("--seed", type=int, help="base seed; sample i uses seed + i")
    generate.add_argument("--wait", type=float, default=0, help="seconds to wait for the generator to be SERVING")
    generate.add_argument("--timeout", type=float, default=300, help="deadline of the call in seconds")
    generate.add_argument("--json", action="store_true", help="print the response as JSON")
    _add_client_auth_args(generate)

    report = commands.add_parser("report", help="write a job's report: one HTML file that needs no network to view")
    report.add_argument("job_id")
    report.add_argument("--target", default=f"localhost:{DEFAULT_PORTS['coordinator']}", help="the coordinator (default localhost:50050)")
    report.add_argument("--out", type=Path, help="the HTML file to write (default JOB_ID-report.html)")
    report.add_argument("--timeout", type=float, default=600, help="deadline of each call in seconds (default 600)")
    _add_client_auth_args(report)

    review = commands.add_parser("review", help="export a job's items awaiting review (Label Studio tasks), or submit decisions")
    review.add_argument("job_id")
    action = review.add_mutually_exclusive_group(required=True)
    action.add_argument("--export", type=Path, metavar="TASKS_JSON", help="write the items awaiting review as Label Studio tasks")
    action.add_argument(
        "--submit", type=Path, metavar="FILE", help="send decisions: a Label Studio JSON export, or JSON lines of {item_id, kept, note}"
    )
    review.add_argument("--reviewer", default="", help="who decided, where the file does not say (default: your identity)")
    review.add_argument("--target", default=f"localhost:{DEFAULT_PORTS['coordinator']}", help="the coordinator (default localhost:50050)")
    review.add_argument("--timeout", type=float, default=60, help="deadline of each call in seconds (default 60)")
    _add_client_auth_args(review)

    token = commands.add_parser("token", help="make a static bearer token: the token on stdout, its auth-file entry on stderr")
    token.add_argument("--tenant", required=True, help="the tenant the token acts for")
    token.add_argument("--subject", required=True, help="who holds it (named in audit lines)")
    token.add_argument("--role", action="append", required=True, choices=ROLES, help="a role (repeatable)")
    return parser


def _options(args: argparse.Namespace) -> StackOptions:
    """What the flags say about backends and folders; the services' addresses are wired in later."""
    from autodidact.backends.embed.local import LocalEmbedderSettings
    from autodidact.backends.llm.llamacpp import LlamaCppSettings
    from autodidact.backends.remote import RemoteSettings
    from autodidact.coordinator.service import CoordinatorSettings
    from autodidact.critic.service import CriticSettings
    from autodidact.generator.requests import GeneratorLimits
    from autodidact.stack import StackOptions

    return StackOptions(
        llm_backend=args.llm_backend,
        llm_remote=RemoteSettings(url=args.llm_url, model=args.llm_model, context_length=args.context_length) if args.llm_url else None,
        embedder_backend=args.embedder,
        embedder_remote=RemoteSettings(url=args.embedder_url) if args.embedder_url else None,
        llamacpp=LlamaCppSettings(model_path=args.model, context_length=args.context_length, contexts=args.contexts, threads=args.threads),
        generator=GeneratorLimits(max_samples=args.max_samples),
        embedder=LocalEmbedderSettings(threads=args.embed_threads),
        critic=CriticSettings(constitutions_dir=args.constitutions_dir),
        dedup_shard=getattr(args, "shard", None),  # serve only: `up` runs one unsharded dedup
        coordinator=CoordinatorSettings(
            input_roots=tuple(args.input_root),
            tenants_file=args.tenants_file,
            store_dsn=args.store_dsn,
            lease_seconds=args.lease_seconds,
            export_url=args.export_url,
            export_url_ttl_seconds=args.export_url_ttl,
        ),
    ).under(args.data_dir)


def _auth_settings(args: argparse.Namespace) -> AuthSettings:
    """The server's auth flags; raises ValueError for a combination that cannot work."""
    settings = AuthSettings(
        insecure=args.insecure,
        auth_file=args.auth_file,
        jwt_issuer=args.jwt_issuer,
        jwt_audience=args.jwt_audience,
        jwks_file=args.jwks_file,
        jwks_url=args.jwks_url,
        jwt_tenant_claim=args.jwt_tenant_claim,
        jwt_roles_claim=args.jwt_roles_claim,
        open_methods=tuple(prefix.strip() for prefix in args.open_methods.split(",") if prefix.strip()),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )
    settings.check()
    return settings


def _write_session_token(data_dir: Path) -> str:
    """A fresh token for this `up` session, readable by this user only."""
    token = new_token()
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SESSION_TOKEN
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # an older file keeps its mode through O_CREAT
        file.write(token + "\n")
    return token


def _session(auth: AuthSettings, token: str) -> AuthSettings:
    """`auth` that also accepts `token` as tenant "default" with the admin and service roles (`up`, in-process `run`)."""
    return replace(
        auth, static_tokens=(*auth.static_tokens, StaticToken.of(token, "autodidact-session", DEFAULT_TENANT, frozenset({ADMIN, SERVICE})))
    )


def _server_identity(args: argparse.Namespace, token: str | None = None) -> ClientCredentials:
    """The credentials a server's own calls to other services carry: `token`
    (a session's), else its --token-file; its certificate too under TLS, for
    services that require mutual TLS."""
    from autodidact.runtime.channels import ClientCredentials, TokenFile

    source: str | TokenFile | None = token or (TokenFile(args.token_file) if args.token_file else None)
    # `up` calls its own services: a self-signed certificate is its own CA.
    tls_ca = args.tls_ca or (args.tls_cert if args.command == "up" else None)
    with_cert = tls_ca is not None and args.tls_cert is not None
    return ClientCredentials(source, tls_ca, args.tls_cert if with_cert else None, args.tls_key if with_cert else None)


def _is_loopback(target: str) -> bool:
    """True for a target on this machine: localhost, 127.x, ::1 (with or without a port)."""
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = host[1 : host.index("]")] if host.startswith("[") else host.rpartition(":")[0] or host
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _client_credentials(args: argparse.Namespace, target: str) -> ClientCredentials:
    """A CLI client's credentials: --token, else AUTODIDACT_TOKEN, else the session token `up` wrote."""
    from autodidact.runtime.channels import ClientCredentials

    token = args.token
    session = Path(getattr(args, "data_dir", None) or _env("DATA_DIR", ".autodidact") or ".autodidact") / SESSION_TOKEN
    # `up`'s session token (admin and service of its stack) goes only to a stack on this machine.
    if not token and session.is_file() and _is_loopback(target):
        token = session.read_text(encoding="utf-8").strip()
    return ClientCredentials(token or None, args.tls_ca, args.tls_client_cert, args.tls_client_key)


def _token(args: argparse.Namespace) -> int:
    """Prints a new token (stdout) and the auth-file `tokens:` entry that accepts it (stderr)."""
    import yaml

    from autodidact.runtime.auth import auth_file_entry, check_tenant

    try:
        check_tenant(args.tenant, "--tenant")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = new_token()
    entry = auth_file_entry(token, args.subject, args.tenant, sorted(set(args.role)))
    print(token)
    print("# add under `tokens:` in the auth file (it holds only the token's sha256)", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False), end="", file=sys.stderr)
    return 0


def _server_settings(args: argparse.Namespace, port: int, metrics_port: int | None, auth: AuthSettings) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=port,
        max_message_bytes=int(args.max_message_mib * 2**20),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_concurrent_streams=args.max_concurrent_streams,
        grace_seconds=args.grace,
        metrics_port=metrics_port,
        auth=auth,
    )


async def _serve(names: list[str], args: argparse.Namespace, auth: AuthSettings) -> None:
    from autodidact.runtime.server import ServiceHost, run_until_signalled
    from autodidact.stack import CALLS, DEFAULT_METRICS_PORTS, DEFAULT_PORTS, LocalStack, build_component, shifted_ports, wired

    options = _options(args)
    if args.command == "up":  # services call their neighbours on loopback
        ports = shifted_ports(args.base_port)
        # One process, one metrics registry: one endpoint, the coordinator's default port.
        metrics_port = DEFAULT_METRICS_PORTS["coordinator"] if args.metrics_port is None else args.metrics_port or None
        stack = LocalStack(options)
        for i, name in enumerate(names):
            # One metrics endpoint per process: the first host starts it.
            stack.add(name, _server_settings(args, ports[name], metrics_port if i == 0 else None, auth))
        hosts = list(stack.hosts.values())
    else:
        name = names[0]
        targets = {neighbour: getattr(args, f"{neighbour.replace('-', '_')}_target") for neighbour in CALLS[name]}
        # Each service has its own default, so several `serve` processes share a host.
        metrics_port = DEFAULT_METRICS_PORTS[name] if args.metrics_port is None else args.metrics_port or None
        port = args.port if args.port is not None else DEFAULT_PORTS[name]
        hosts = [ServiceHost([build_component(name, wired(options, targets))], _server_settings(args, port, metrics_port, auth))]
    await run_until_signalled(hosts)


async def _generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from autodidact.client import wait_until_serving
    from autodidact.runtime.channels import create_channel
    from autodidact.runtime.neighbours import rpc_error_text
    from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc

    if args.chat:
        prompt = common_pb2.Prompt(chat=common_pb2.Chat(messages=[common_pb2.ChatMessage(role="user", content=args.prompt)]))
    else:
        prompt = common_pb2.Prompt(text=args.prompt)
    sampling = common_pb2.SamplingParams(top_k=args.top_k, max_tokens=args.max_tokens, stop=args.stop)
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    request = generator_pb2.GenerateRequest(prompt=prompt, sampling=sampling, n=args.n)
    if args.seed is not None:
        request.seed = args.seed
    async with create_channel(args.target, timeout_seconds=args.timeout, credentials=_client_credentials(args, args.target)) as channel:
        try:
            if args.wait:
                await wait_until_serving(channel, timeout=args.wait)
            response = await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {rpc_error_text(exc)}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    print(
        f"model: {response.model.model} ({response.model.backend}); base seed {response.seed}; "
        f"{response.usage.prompt_tokens} prompt + {response.usage.completion_tokens} completion tokens"
    )
    for sample in response.samples:
        reason = common_pb2.FinishReason.Name(sample.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(f"\n--- sample seed={sample.seed} tokens={sample.completion_tokens} finish={reason}")
        print(sample.text.strip())
    return 0


async def _report(args: argparse.Namespace) -> int:
    """Builds the job's report here from GetJob and StreamSamples, so any job has one, a running one too."""
    import grpc

    from autodidact.coordinator.report import fetch_report
    from autodidact.runtime.channels import create_channel
    from autodidact.runtime.neighbours import rpc_error_text
    from autodidact.v1 import coordinator_pb2_grpc

    credentials = _client_credentials(args, args.target)
    async with create_channel(args.target, timeout_seconds=args.timeout, credentials=credentials) as channel:
        try:
            text = await fetch_report(coordinator_pb2_grpc.CoordinatorServiceStub(channel), args.job_id, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {rpc_error_text(exc)}", file=sys.stderr)
            return 1
    out = args.out or Path(f"{args.job_id}-report.html")
    out.write_text(text, encoding="utf-8")
    print(out)
    return 0


async def _review(args: argparse.Namespace) -> int:
    """Review gates from the command line: out to Label Studio, decisions back (reviews.py)."""
    import grpc

    from autodidact import reviews
    from autodidact.runtime.channels import create_channel
    from autodidact.runtime.neighbours import rpc_error_text
    from autodidact.v1 import coordinator_pb2_grpc

    decisions = []
    if args.submit:
        try:
            decisions = reviews.read_decisions(args.submit, args.reviewer, args.job_id)
        except reviews.ReviewFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    credentials = _client_credentials(args, args.target)
    async with create_channel(args.target, timeout_seconds=args.timeout, credentials=credentials) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        try:
            if args.export:
                tasks, last = await reviews.export_tasks(stub, args.job_id, args.timeout)
                args.export.write_text(json.dumps(tasks, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
                config = args.export.with_name(args.export.stem + ".label-config.xml")
                config.write_text(reviews.LABEL_CONFIG, encoding="utf-8")
                deadline = (
                    f"; unreviewed ones follow the job's policy at {last.deadline.ToDatetime():%Y-%m-%d %H:%M} UTC"
                    if last.HasField("deadline")
                    else ""
                )
                print(f"{len(tasks)} items awaiting review written to {args.export} (labeling config: {config}){deadline}")
                return 0
            outcomes, awaiting = await reviews.submit(stub, args.job_id, decisions, args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {rpc_error_text(exc)}", file=sys.stderr)
            return 1
    said = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    print(f"{len(decisions)} decisions sent: {said}; {awaiting} items still awaiting review")
    return 0


async def _run(args: argparse.Namespace) -> int:
    from autodidact.backends.embed.local import LocalEmbedderSettings
    from autodidact.backends.llm.llamacpp import LlamaCppSettings
    from autodidact.runner import RecipeError, default_job_id, load_recipe, prepare, run_in_process, run_job
    from autodidact.runtime.channels import ClientCredentials, set_default_client_credentials
    from autodidact.stack import StackOptions

    try:
        prepared = prepare(load_recipe(args.recipe))  # each local input file hashed once, here
        job_id = args.job_id or default_job_id(args.recipe, prepared)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("out") / job_id  # the dataset is downloaded here, wherever the coordinator runs
    if args.coordinator:
        set_default_client_credentials(_client_credentials(args, args.coordinator))
        return await run_job(args.coordinator, job_id, prepared, out, show_progress=not args.quiet)
    # The in-process stack listens on loopback ports that other local users could reach too:
    # it accepts only a token made for this run, which its services and this client send.
    token = new_token()
    set_default_client_credentials(ClientCredentials(token))
    server = ServerSettings(grace_seconds=5, auth=_session(AuthSettings(), token))
    options = StackOptions(llamacpp=LlamaCppSettings(threads=args.threads), embedder=LocalEmbedderSettings(threads=args.threads))
    return await run_in_process(prepared, job_id, args.data_dir, options, out, show_progress=not args.quiet, server=server)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[getattr(args, "log_format", "auto")]
    configure_logging(getattr(args, "log_level", "info"), json=json_logs)
    from autodidact.errors import StartupError

    if args.command == "token":
        return _token(args)
    if args.command == "generate":
        return asyncio.run(_generate(args))
    if args.command == "report":
        return asyncio.run(_report(args))
    if args.command == "review":
        return asyncio.run(_review(args))
    if args.command == "serve":
        names = [args.service]
    else:
        from autodidact.stack import IMPLEMENTED

        names = list(IMPLEMENTED)
    from autodidact.runtime.tracing import configure_tracing

    # Off unless the OTEL_* variables ask for it. One provider per process: `up` and `run` host several services.
    configure_tracing(f"autodidact-{args.service}" if args.command == "serve" else "autodidact")
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        auth = _auth_settings(args)
        # Secure by default: a served port answers only authenticated callers unless told otherwise.
        if args.command == "serve" and not auth.configured:
            print(NO_AUTH_ERROR, file=sys.stderr)
            return 2
        from autodidact.runtime.channels import set_default_client_credentials
        from autodidact.stack import CALLS

        if args.command == "serve" and CALLS[args.service] and not (auth.insecure or args.token_file):
            # Not refused: the services it calls may run --insecure. Said once, at start, rather than per failed call.
            structlog.get_logger("autodidact.cli").warning(
                "no --token-file: this service's calls to other services carry no token", calls=list(CALLS[args.service])
            )
        session = None
        if args.command == "up" and not auth.insecure:
            session = _write_session_token(args.data_dir)
            auth = _session(auth, session)
        set_default_client_credentials(_server_identity(args, session))
        asyncio.run(_serve(names, args, auth))
    except (ValueError, StartupError) as exc:  # a bad option or file, a port in use, a damaged store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
