"""The remote backends.

- openai_compat: against a real OpenAI-compatible server on loopback
  (llama-cpp-python's server with the bundled SmolLM2 model).
- tgi and tei: neither server can run here (no GPU, no network to fetch their
  images or models), so they are tested against a loopback HTTP server that
  replays their protocol. The exchanges below are transcribed from the
  servers' documented APIs (TGI 3.x `/` and `/info`, TEI 1.x `/embed` and
  `/info`), not captured from live servers.
- Constrained sampling on vLLM and SGLang: against the same replaying
  server, checking the request fields each documents (vLLM's
  `structured_outputs`, SGLang's `ebnf` and `json_schema`); on llama.cpp's
  server (`grammar`) against the real llama-cpp-python server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from autodidact.backends.embed.tei import TeiEmbedder
from autodidact.backends.llm import ChatTurn, GenerationRequest, Sampling
from autodidact.backends.llm.llamacpp import bundled_model_path
from autodidact.backends.llm.openai_compat import OpenAICompatLLM
from autodidact.backends.llm.tgi import TgiLLM
from autodidact.backends.remote import RemoteSettings
from autodidact.errors import InvalidArgument, Unavailable
from tests.conftest import free_port


def fast_retries(url: str) -> RemoteSettings:
    """Settings for a scripted server: failures are retried quickly, so a test of retries takes milliseconds."""
    return RemoteSettings(url=url, max_attempts=3, initial_backoff_seconds=0.01, timeout_seconds=30)


class Replay:
    """A loopback HTTP server answering each path from a script, recording requests."""

    # A route gets the request's JSON body (None for a GET) and answers (status, JSON).
    def __init__(self, routes: dict[str, Callable[[Any], tuple[int, Any]]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, Any]] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.path, body))
        status, answer = self.routes[request.path](body)
        return web.json_response(answer, status=status)

    async def __aenter__(self) -> Replay:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()


# --- TEI ---

TEI_INFO = {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_dtype": "float16", "max_client_batch_size": 32, "version": "1.8.0"}


def tei_embed(body: dict[str, Any]) -> tuple[int, Any]:
    # TEI answers one vector per input; these are deterministic stand-ins, not MiniLM's.
    return 200, [[float(len(text)), 1.0, 0.0, 2.0] for text in body["inputs"]]


async def test_tei_embeds_in_chunks_of_its_batch_limit_and_returns_unit_vectors():
    async with Replay({"/info": lambda _: (200, TEI_INFO), "/embed": tei_embed}) as tei:
        embedder = await TeiEmbedder.load(fast_retries(tei.url))
        try:
            assert (embedder.description.model, embedder.description.dimension) == ("sentence-transformers/all-MiniLM-L6-v2", 4)
            vectors = await embedder.embed([f"text {i}" for i in range(70)])
        finally:
            await embedder.close()
    assert vectors.shape == (70, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    batches = [body for path, body in tei.requests if path == "/embed"][1:]  # after the dimension probe
    assert [len(b["inputs"]) for b in batches] == [32, 32, 6]
    assert all(b["normalize"] and b["truncate"] for b in batches)
    assert sorted(i for b in batches for i in b["inputs"]) == sorted(f"text {i}" for i in range(70))


async def test_tei_overload_is_retried_and_a_refusal_names_the_backend():
    answers = iter([(429, {"error": "Model is overloaded", "error_type": "overloaded"}), None])

    def overloaded_once(body: dict[str, Any]) -> tuple[int, Any]:
        scripted = next(answers, None)
        return scripted if scripted else tei_embed(body)

    async with Replay({"/info": lambda _: (200, TEI_INFO), "/embed": tei_embed}) as tei:
        embedder = await TeiEmbedder.load(fast_retries(tei.url))
        tei.routes["/embed"] = overloaded_once
        assert (await embedder.embed(["a", "b"])).shape == (2, 4)
        tei.routes["/embed"] = lambda _: (413, {"error": "batch size 2 > maximum allowed batch size 1", "error_type": "validation"})
        with pytest.raises(InvalidArgument, match=r"items: tei at http://127.0.0.1:\d+ refused it: HTTP 413: .*maximum allowed batch size"):
            await embedder.embed(["a", "b"])
        tei.routes["/embed"] = lambda _: (503, {"error": "unhealthy"})
        with pytest.raises(Unavailable, match=r"tei at .*: HTTP 503.*after 3 attempts"):
            await embedder.embed(["a"])
        await embedder.close()


async def test_tei_down_at_start_is_unavailable_naming_it():
    with pytest.raises(Unavailable, match=r"tei at http://127.0.0.1:\d+: ClientConnectorError"):
        await TeiEmbedder.load(fast_retries(f"http://127.0.0.1:{free_port()}"))


# --- TGI ---

TGI_INFO = {"model_id": "HuggingFaceTB/SmolLM2-1.7B-Instruct", "max_input_tokens": 4095, "max_total_tokens": 4096, "version": "3.3.6"}


def tgi_generate(body: dict[str, Any]) -> tuple[int, Any]:
    """TGI's `/` route: a list with one generation; prefill when decoder_input_details."""
    parameters = body["parameters"]
    prefill = [
        {"id": 1, "text": "<|im_start|>", "logprob": None},
        {"id": 504, "text": "The", "logprob": -3.2},
        {"id": 2767, "text": " cat", "logprob": -7.1},
        {"id": 7018, "text": " sat", "logprob": -2.4},
    ]
    if parameters.get("max_new_tokens") == 1 and not parameters.get("do_sample"):
        text, finish, generated = " on", "length", 1
    else:
        text, finish, generated = f" sample {parameters['seed']} END", "stop_sequence", 4
    return 200, [
        {
            "generated_text": text,
            "details": {
                "finish_reason": finish,
                "generated_tokens": generated,
                "seed": parameters.get("seed"),
                "prefill": prefill if parameters.get("decoder_input_details") else [],
                "tokens": [{"id": 9, "text": text, "logprob": -0.4, "special": False}],
                "top_tokens": None,
                "best_of_sequences": None,
            },
        }
    ]


async def test_tgi_sends_one_request_per_seed_and_strips_the_stop_sequence():
    async with Replay({"/info": lambda _: (200, TGI_INFO), "/": tgi_generate}) as tgi:
        llm = await TgiLLM.load(fast_retries(tgi.url))
        try:
            assert llm.description.context_length == 4096 and llm.description.model.endswith("1.7B-Instruct")
            generation = await llm.generate(
                GenerationRequest("The cat sat", Sampling(temperature=0.7, top_p=1.0, max_tokens=8, stop=(" END",)), seeds=(11, 12))
            )
        finally:
            await llm.close()
    assert [(s.text, s.seed, s.finish_reason, s.completion_tokens) for s in generation.samples] == [
        (" sample 11", 11, "stop", 4),
        (" sample 12", 12, "stop", 4),
    ]
    sent = [body["parameters"] for path, body in tgi.requests if path == "/"]
    assert sorted(p["seed"] for p in sent) == [11, 12]
    # TGI refuses top_p = 1.0 and temperature without do_sample: neither is sent that way.
    assert all(p["do_sample"] and p["temperature"] == pytest.approx(0.7) and "top_p" not in p and p["stop"] == [" END"] for p in sent)


async def test_tgi_prompt_logprobs_come_from_prefill_and_the_first_token_has_none():
    async with Replay({"/info": lambda _: (200, TGI_INFO), "/": tgi_generate}) as tgi:
        llm = await TgiLLM.load(fast_retries(tgi.url))
        try:
            whole = await llm.logprobs("The cat sat")
            after_context = await llm.logprobs(" cat sat", context="The")
        finally:
            await llm.close()
    assert [(s.token, s.logprob, s.char_offset) for s in whole] == [("The", -3.2, 0), (" cat", -7.1, 3), (" sat", -2.4, 7)]
    assert [(s.token, s.logprob, s.char_offset) for s in after_context] == [(" cat", -7.1, 0), (" sat", -2.4, 4)]
    sent = tgi.requests[-1][1]
    assert sent["inputs"] == "The cat sat" and sent["parameters"]["decoder_input_details"] and sent["parameters"]["max_new_tokens"] == 1


async def test_tgi_refuses_a_presence_penalty_it_cannot_apply_and_retries_429():
    calls = iter([(429, {"error": "Model is overloaded", "error_type": "overloaded"})])

    def busy_once(body: dict[str, Any]) -> tuple[int, Any]:
        return next(calls, None) or tgi_generate(body)

    async with Replay({"/info": lambda _: (200, TGI_INFO), "/": busy_once}) as tgi:
        llm = await TgiLLM.load(fast_retries(tgi.url))
        try:
            with pytest.raises(InvalidArgument, match=re.escape("sampling.presence_penalty: the tgi backend has no presence penalty")):
                await llm.generate(GenerationRequest("x", Sampling(presence_penalty=2.0), seeds=(1,)))
            generation = await llm.generate(GenerationRequest("x", Sampling(temperature=0.0, max_tokens=4), seeds=(1,)))
            assert generation.samples[0].text
            tgi.routes["/"] = lambda _: (
                422,
                {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096", "error_type": "validation"},
            )
            with pytest.raises(InvalidArgument, match=r"prompt: tgi at .* refused it: .*must be <= 4096"):
                await llm.generate(GenerationRequest("x", Sampling(max_tokens=5000), seeds=(1,)))
        finally:
            await llm.close()
    assert sum(path == "/" for path, _ in tgi.requests) == 3  # the 429, its retry, the 422


CALL_GRAMMAR = 'root ::= "Calculator(" [0-9]{1,3} " + " [0-9]{1,3} ")"\n'
SCHEMA = '{"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'


async def test_tgi_sends_a_json_schema_as_its_grammar_and_refuses_gbnf_by_name():
    async with Replay({"/info": lambda _: (200, TGI_INFO), "/": tgi_generate}) as tgi:
        llm = await TgiLLM.load(fast_retries(tgi.url))
        try:
            await llm.generate(GenerationRequest("x", Sampling(max_tokens=4, json_schema=SCHEMA), seeds=(1,)))
            with pytest.raises(InvalidArgument, match=re.escape("sampling.grammar: the tgi backend cannot honour a GBNF grammar")):
                await llm.generate(GenerationRequest("x", Sampling(grammar=CALL_GRAMMAR), seeds=(1,)))
        finally:
            await llm.close()
    sent = [body["parameters"] for path, body in tgi.requests if path == "/"]
    assert len(sent) == 1  # the refused request never reached the server
    assert sent[0]["grammar"] == {"type": "json", "value": json.loads(SCHEMA)}


def openai_models(owned_by: str) -> Callable[[Any], tuple[int, Any]]:
    return lambda _: (200, {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": owned_by, "max_model_len": 4096}]})


def openai_completion(body: dict[str, Any]) -> tuple[int, Any]:
    return 200, {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": "Calculator(1 + 2)", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


@pytest.mark.parametrize(
    ("owned_by", "sampling", "fields"),
    [
        ("vllm", Sampling(grammar=CALL_GRAMMAR), {"structured_outputs": {"grammar": CALL_GRAMMAR}}),
        ("vllm", Sampling(json_schema=SCHEMA), {"structured_outputs": {"json": json.loads(SCHEMA)}}),
        ("sglang", Sampling(grammar=CALL_GRAMMAR), {"ebnf": CALL_GRAMMAR}),
        ("sglang", Sampling(json_schema=SCHEMA), {"json_schema": SCHEMA}),
        ("llamacpp", Sampling(grammar=CALL_GRAMMAR), {"grammar": CALL_GRAMMAR}),
        ("llamacpp", Sampling(json_schema=SCHEMA), {"json_schema": json.loads(SCHEMA)}),
        ("vllm", Sampling(), {}),
    ],
)
async def test_openai_compat_sends_each_servers_own_constraint_fields(owned_by, sampling, fields):
    async with Replay({"/v1/models": openai_models(owned_by), "/v1/completions": openai_completion}) as server:
        llm = await OpenAICompatLLM.load(fast_retries(server.url))
        try:
            await llm.generate(GenerationRequest("[", sampling, seeds=(1,)))
        finally:
            await llm.close()
    body = server.requests[-1][1]
    constraint_keys = {"structured_outputs", "ebnf", "json_schema", "grammar", "guided_grammar", "guided_json", "response_format"}
    assert {k: v for k, v in body.items() if k in constraint_keys} == fields


# --- openai_compat against a real server ---


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama_server() -> AsyncIterator[str]:
    port = free_port()
    # The server loads its model as the embedded backend does on AMX CPUs (see _without_amx_buffers), or it crashes there.
    launch = (
        "import runpy, sys; from autodidact.backends.llm.llamacpp import _without_amx_buffers; "
        "_without_amx_buffers().__enter__(); sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launch,
            "--model",
            str(bundled_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
            "--logits_all",
            "True",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.asyncio(loop_scope="module")
async def test_openai_compat_generates_text_and_chat_with_seeds_from_a_real_server(llama_server):
    llm = await OpenAICompatLLM.load(RemoteSettings(url=llama_server, timeout_seconds=120, max_attempts=40, initial_backoff_seconds=0.25))
    try:
        assert llm.description.backend == "openai_compat" and llm.description.model
        request = GenerationRequest("Once upon a time", Sampling(temperature=0.8, max_tokens=12), seeds=(5, 6))
        first, again = await llm.generate(request), await llm.generate(request)
        assert [s.seed for s in first.samples] == [5, 6]
        assert all(s.text and 0 < s.completion_tokens <= 12 for s in first.samples)
        assert [s.text for s in again.samples] == [s.text for s in first.samples]  # seeds are honoured
        chat = await llm.generate(
            GenerationRequest((ChatTurn("user", "Name a colour."),), Sampling(temperature=0, max_tokens=8), seeds=(1,))
        )
        assert chat.samples[0].text and chat.prompt_tokens > 5
        capped = await llm.generate(GenerationRequest("1, 2, 3,", Sampling(temperature=0, max_tokens=3), seeds=(1,)))
        assert capped.samples[0].finish_reason == "length"
    finally:
        await llm.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_openai_compat_grammar_constrains_a_real_llama_cpp_server(llama_server):
    llm = await OpenAICompatLLM.load(RemoteSettings(url=llama_server, timeout_seconds=120, max_attempts=40, initial_backoff_seconds=0.25))
    try:
        request = GenerationRequest(
            "She sold 48 and then 24 more, [", Sampling(temperature=1.0, max_tokens=16, grammar=CALL_GRAMMAR), seeds=(1, 2, 3)
        )
        generation = await llm.generate(request)
    finally:
        await llm.close()
    assert all(re.fullmatch(r"Calculator\(\d{1,3} \+ \d{1,3}\)", s.text) for s in generation.samples), [s.text for s in generation.samples]


@pytest.mark.asyncio(loop_scope="module")
async def test_openai_compat_prompt_logprobs_cover_exactly_the_scored_text(llama_server):
    llm = await OpenAICompatLLM.load(RemoteSettings(url=llama_server, timeout_seconds=120, max_attempts=40, initial_backoff_seconds=0.25))
    try:
        text = " sat on the mat."
        scores = await llm.logprobs(text, context="The cat")
    finally:
        await llm.close()
    # Token texts tile the scored text from offset 0; values are log-probabilities.
    assert "".join(s.token for s in scores) == text
    assert [s.char_offset for s in scores] == [sum(len(t.token) for t in scores[:i]) for i in range(len(scores))]
    assert all(s.logprob is not None and s.logprob <= 0 for s in scores)
