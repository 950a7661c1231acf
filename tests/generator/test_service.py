"""The generator over real gRPC on loopback, with the embedded SmolLM2 model."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from autodidact.coordinator.recipes.toolformer import CALCULATOR_GRAMMAR
from autodidact.runtime.channels import create_channel
from autodidact.runtime.interceptors import REQUEST_ID_HEADER
from autodidact.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.conftest import details_of, text_request

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=12)


async def test_generate_returns_n_samples_with_consecutive_seeds(generator):
    response = await generator.Generate(text_request("Once upon a time", n=3, seed=40))
    assert [s.seed for s in response.samples] == [40, 41, 42]
    assert response.seed == 40
    assert all(s.text and s.completion_tokens > 0 for s in response.samples)
    assert response.usage.completion_tokens == sum(s.completion_tokens for s in response.samples)
    assert response.usage.prompt_tokens > 0
    assert response.model.backend == "llamacpp" and response.model.model.endswith(".gguf")
    assert len({s.text for s in response.samples}) > 1, "different seeds gave identical samples"


async def test_a_run_repeats_exactly_and_any_sample_can_be_redrawn_alone(generator):
    request = text_request("The three primary colours are", n=3, seed=7)
    first = await generator.Generate(request)
    # Another request in between must not change anything (no state leaks between calls).
    await generator.Generate(text_request("Unrelated text about the sea", n=2, seed=99))
    again = await generator.Generate(request)
    assert [s.text for s in again.samples] == [s.text for s in first.samples]
    alone = await generator.Generate(text_request("The three primary colours are", n=1, seed=9))
    assert alone.samples[0].text == first.samples[2].text


async def test_unset_seed_is_returned_and_reproduces_the_call(generator):
    drawn = await generator.Generate(text_request("In the morning I", n=2))
    replay = await generator.Generate(text_request("In the morning I", n=2, seed=drawn.seed))
    assert [s.text for s in replay.samples] == [s.text for s in drawn.samples]


async def test_chat_prompt_uses_the_models_chat_template(generator):
    question = "What is the capital of France?"
    chat = common_pb2.Chat(messages=[common_pb2.ChatMessage(role="user", content=question)])
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=24)
    as_chat = await generator.Generate(generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=chat), sampling=sampling))
    as_text = await generator.Generate(text_request(question, sampling=sampling))
    assert as_chat.samples[0].text
    # SmolLM2's template adds a default system turn and role markers around the message.
    assert as_chat.usage.prompt_tokens >= as_text.usage.prompt_tokens + 15


async def test_max_tokens_and_stop_sequences_are_honoured(generator):
    capped = await generator.Generate(
        text_request("Count: 1, 2, 3,", seed=1, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=5))
    )
    assert capped.samples[0].completion_tokens == 5
    assert capped.samples[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    stopped = await generator.Generate(
        text_request("Count: 1, 2, 3,", seed=1, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=40, stop=[" 6"]))
    )
    sample = stopped.samples[0]
    assert sample.finish_reason == common_pb2.FINISH_REASON_STOP
    assert " 6" not in sample.text and "5" in sample.text


def is_calculator_call(text: str) -> bool:
    """What CALCULATOR_GRAMMAR accepts: Calculator( an arithmetic expression of numbers, + - * /, parentheses, spaces )."""
    match = re.fullmatch(r"Calculator\(([-+*/(). 0-9]+)\)", text)
    if not match:
        return False
    try:
        ast.parse(match.group(1).strip(), mode="eval")
    except SyntaxError:
        return False
    return True


async def test_a_grammar_constrained_sample_is_always_grammar_conforming_and_repeats_by_seed(generator):
    prompt = "Add calculator calls.\nInput:\nShe sold 48/2 = 24 clips.\nOutput:\nShe sold 48/2 = ["
    sampling = common_pb2.SamplingParams(temperature=1.0, max_tokens=32, grammar=CALCULATOR_GRAMMAR)
    free = await generator.Generate(
        text_request(prompt, n=4, seed=5, sampling=common_pb2.SamplingParams(temperature=1.0, max_tokens=16, stop=["]", "\n"]))
    )
    constrained = await generator.Generate(text_request(prompt, n=4, seed=5, sampling=sampling))
    # Unconstrained, the small model writes prose as often as calls; constrained, it never does.
    assert not all(is_calculator_call(s.text) for s in free.samples)
    for sample in constrained.samples:
        assert is_calculator_call(sample.text) or sample.finish_reason == common_pb2.FINISH_REASON_LENGTH, sample.text
        assert sample.text.startswith("Calculator(")
    assert sum(s.finish_reason == common_pb2.FINISH_REASON_STOP for s in constrained.samples) >= 3
    # Same seed, same sample: the grammar state starts afresh for every sample.
    again = await generator.Generate(text_request(prompt, n=4, seed=5, sampling=sampling))
    assert [s.text for s in again.samples] == [s.text for s in constrained.samples]
    alone = await generator.Generate(text_request(prompt, n=1, seed=7, sampling=sampling))
    assert alone.samples[0].text == constrained.samples[2].text


async def test_a_json_schema_constrained_sample_is_json_the_schema_accepts(generator):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": False}
    sampling = common_pb2.SamplingParams(temperature=1.0, max_tokens=40, json_schema=json.dumps(schema))
    response = await generator.Generate(text_request("Q: What is 2 + 3? Reply in JSON.\nA:", n=3, seed=2, sampling=sampling))
    for sample in response.samples:
        assert sample.finish_reason == common_pb2.FINISH_REASON_STOP, sample.text
        parsed = json.loads(sample.text)
        assert set(parsed) == {"answer"} and isinstance(parsed["answer"], int)


async def test_get_model_info(generator):
    info = await generator.GetModelInfo(generator_pb2.GetModelInfoRequest())
    assert info.model.context_length == 2048 and info.max_samples == 64


def huge_prompt() -> generator_pb2.GenerateRequest:
    # ~50 MiB: far past the 8 MiB message limit.
    return text_request("x" * (50 * 1024 * 1024))


BAD_REQUESTS = [
    (text_request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt.text: must not be empty"),
    (generator_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt: is required"),
    (text_request("hi", n=1_000_000), grpc.StatusCode.INVALID_ARGUMENT, "n: must be between 1 and 64"),
    (text_request("hi", sampling=common_pb2.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (
        text_request("hi", sampling=common_pb2.SamplingParams(max_tokens=100_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.max_tokens: must be between 1 and 2,048",
    ),
    # Fits the static bound, but not with the prompt in front of it: only the backend can tell.
    (
        text_request("word " * 1500, sampling=common_pb2.SamplingParams(max_tokens=1000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds the model context of 2048 tokens",
    ),
    (
        text_request("hi", sampling=common_pb2.SamplingParams(stop=["s"] * 10_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.stop: must have at most 16 items",
    ),
    (huge_prompt(), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    (
        text_request("hi", sampling=common_pb2.SamplingParams(grammar='root ::= "x" )')),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.grammar: is not a GBNF grammar: line 1, column 14: expected a newline or the end",
    ),
    (
        text_request("hi", sampling=common_pb2.SamplingParams(grammar="root ::= digit")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.grammar: line 1, column 10: rule `digit` is used but never defined",
    ),
    (
        text_request("hi", sampling=common_pb2.SamplingParams(json_schema="[1, 2]")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.json_schema: must be a JSON object",
    ),
    # A JSON object llama.cpp's schema converter cannot turn into a grammar: only the backend can tell.
    (
        text_request("hi", sampling=common_pb2.SamplingParams(json_schema='{"$ref": "#/nowhere"}')),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.json_schema: llamacpp cannot turn this schema into a grammar",
    ),
]


@pytest.mark.parametrize(("request_", "code", "message"), BAD_REQUESTS, ids=lambda v: getattr(v, "name", None) or "")
async def test_bad_input_is_refused_clearly_and_the_next_call_succeeds(generator, request_, code, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generator.Generate(request_)
    assert raised.value.code() == code
    assert message in details_of(raised.value)
    good = await generator.Generate(text_request("Hello", seed=1, sampling=GREEDY))
    assert good.samples[0].text


async def test_request_id_is_returned_and_a_given_one_is_kept(generator):
    call = generator.Generate(text_request("Hi", seed=1, sampling=GREEDY), metadata=((REQUEST_ID_HEADER, "job-17/item-3"),))
    await call
    assert dict(await call.trailing_metadata())[REQUEST_ID_HEADER] == "job-17/item-3"
    call = generator.Generate(text_request("", seed=1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert len(dict(raised.value.trailing_metadata())[REQUEST_ID_HEADER]) == 32


async def test_rpc_metrics_count_codes_per_method(generator):
    method = "/autodidact.v1.GeneratorService/Generate"

    def count(code: str) -> float:
        return REGISTRY.get_sample_value("autodidact_rpc_requests_total", {"method": method, "code": code}) or 0.0

    ok, invalid = count("OK"), count("INVALID_ARGUMENT")
    await generator.Generate(text_request("Hi", seed=1, sampling=GREEDY))
    with pytest.raises(grpc.aio.AioRpcError):
        await generator.Generate(text_request(""))
    assert count("OK") == ok + 1
    assert count("INVALID_ARGUMENT") == invalid + 1
    tokens = REGISTRY.get_sample_value("autodidact_generated_tokens_total", {"backend": "llamacpp"})
    assert tokens and tokens > 0


async def test_deadline_from_the_channel_applies_and_the_server_keeps_serving(start_generator):
    host = await start_generator()
    long_request = text_request("Chapter one.", seed=3, sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=1.0))
    async with create_channel(f"127.0.0.1:{host.port}", timeout_seconds=0.3) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(long_request)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
    async with create_channel(f"127.0.0.1:{host.port}", timeout_seconds=60) as channel:
        # The abandoned generation stops at its next token, so this one is not stuck behind it.
        started = time.monotonic()
        response = await generator_pb2_grpc.GeneratorServiceStub(channel).Generate(text_request("Hi", seed=1, sampling=GREEDY))
        assert response.samples[0].text
        assert time.monotonic() - started < 5


async def test_calls_beyond_the_concurrency_limit_are_refused_at_once(start_generator):
    host = await start_generator(max_concurrent_rpcs=2)
    request = text_request("Chapter one.", seed=3, sampling=common_pb2.SamplingParams(max_tokens=200, temperature=1.0))
    async with create_channel(f"127.0.0.1:{host.port}", timeout_seconds=120) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)

        async def timed_call() -> tuple[grpc.StatusCode, float]:
            started = time.monotonic()
            try:
                await stub.Generate(request)
                return grpc.StatusCode.OK, time.monotonic() - started
            except grpc.aio.AioRpcError as exc:
                return exc.code(), time.monotonic() - started

        results = await asyncio.wait_for(asyncio.gather(*(timed_call() for _ in range(6))), timeout=120)
    codes = [code for code, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 2, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes
    refused_after = [seconds for code, seconds in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert max(refused_after) < 0.5, f"refusals took {refused_after}s: they queued"
