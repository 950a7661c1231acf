"""The `autodidact` command.

autodidact serve SERVICE [--port PORT]   host one service
autodidact up [--base-port N]            host every implemented service, loopback ports N to N+5
autodidact generate "PROMPT"             sample from a running generator
autodidact run RECIPE.yaml               run a recipe as a job, with progress and a summary
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from autodidact.runtime.logging import configure_logging
from autodidact.runtime.settings import ServerSettings

if TYPE_CHECKING:  # each command imports the service graph only when it runs
    from autodidact.stack import StackOptions


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AUTODIDACT_{name}", default)


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
        help="coordinator: where the dedup service is (default localhost:50055)",
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
    run.add_argument("--out", type=Path, help="dataset folder (default out/JOB_ID; on a remote coordinator, its own default)")
    run.add_argument(
        "--data-dir", type=Path, default=Path(".autodidact"), help="in-process stack: store and namespaces (default .autodidact)"
    )
    run.add_argument("--threads", type=int, default=0, help="in-process stack: CPU threads for the models; 0: every core")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
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
    return parser


def _options(args: argparse.Namespace) -> StackOptions:
    """What the flags say about backends and folders; the services' addresses are wired in later."""
    from autodidact.backends.embed.local import LocalEmbedderSettings
    from autodidact.backends.llm.llamacpp import LlamaCppSettings
    from autodidact.backends.remote import RemoteSettings
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
    ).under(args.data_dir)


def _server_settings(args: argparse.Namespace, port: int, metrics_port: int | None) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=port,
        max_message_bytes=int(args.max_message_mib * 2**20),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_concurrent_streams=args.max_concurrent_streams,
        grace_seconds=args.grace,
        metrics_port=metrics_port,
    )


async def _serve(names: list[str], args: argparse.Namespace) -> None:
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
            stack.add(name, _server_settings(args, ports[name], metrics_port if i == 0 else None))
        hosts = list(stack.hosts.values())
    else:
        name = names[0]
        targets = {neighbour: getattr(args, f"{neighbour.replace('-', '_')}_target") for neighbour in CALLS[name]}
        # Each service has its own default, so several `serve` processes share a host.
        metrics_port = DEFAULT_METRICS_PORTS[name] if args.metrics_port is None else args.metrics_port or None
        port = args.port if args.port is not None else DEFAULT_PORTS[name]
        hosts = [ServiceHost([build_component(name, wired(options, targets))], _server_settings(args, port, metrics_port))]
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
    async with create_channel(args.target, timeout_seconds=args.timeout) as channel:
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


async def _run(args: argparse.Namespace) -> int:
    from autodidact.backends.embed.local import LocalEmbedderSettings
    from autodidact.backends.llm.llamacpp import LlamaCppSettings
    from autodidact.runner import RecipeError, default_job_id, load_recipe, run_in_process, run_job
    from autodidact.stack import StackOptions

    try:
        spec = load_recipe(args.recipe, args.out)
        job_id = args.job_id or default_job_id(args.recipe, spec)
        if args.out is None and not args.coordinator:
            spec.output_dir = str((Path("out") / job_id).resolve())
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.coordinator:
        return await run_job(args.coordinator, job_id, spec, show_progress=not args.quiet)
    options = StackOptions(llamacpp=LlamaCppSettings(threads=args.threads), embedder=LocalEmbedderSettings(threads=args.threads))
    return await run_in_process(spec, job_id, args.data_dir, options, show_progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[getattr(args, "log_format", "auto")]
    configure_logging(getattr(args, "log_level", "info"), json=json_logs)
    from autodidact.errors import StartupError

    if args.command == "generate":
        return asyncio.run(_generate(args))
    if args.command == "serve":
        names = [args.service]
    else:
        from autodidact.stack import IMPLEMENTED

        names = list(IMPLEMENTED)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        asyncio.run(_serve(names, args))
    except (ValueError, StartupError) as exc:  # a bad option or file, a port in use, a damaged store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
