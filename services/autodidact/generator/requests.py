"""Turns Generate requests into backend requests, enforcing the bounds
documented in protos/autodidact/v1/common.proto and generator.proto, and
backend results into responses."""

from __future__ import annotations

import random
from dataclasses import dataclass

from autodidact.backends.llm import ChatTurn, Generation, GenerationRequest, ModelDescription, Prompt, Sampling
from autodidact.errors import InvalidArgument
from autodidact.generator.grammar import check_grammar, check_json_schema
from autodidact.v1 import common_pb2, generator_pb2
from autodidact.validation import check_count, check_length, check_one_of, check_open_low_range, check_range

MAX_PROMPT_CHARS = 65_536
MAX_CHAT_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 128
MAX_TOP_K = 1000
MAX_GRAMMAR_CHARS = 16_384
MAX_JSON_SCHEMA_CHARS = 16_384
UINT32 = 2**32

DEFAULT_SAMPLING = Sampling()


@dataclass(frozen=True)
class GeneratorLimits:
    """Server-side bounds; may only be tighter than the contract's."""

    max_samples: int = 64


def parse_prompt(prompt: common_pb2.Prompt, field: str = "prompt") -> Prompt:
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(field, "is required: set prompt.text or prompt.chat")
    if kind == "text":
        check_length(f"{field}.text", prompt.text, 1, MAX_PROMPT_CHARS)
        return prompt.text
    messages = prompt.chat.messages
    check_count(f"{field}.chat.messages", messages, 1, MAX_CHAT_MESSAGES)
    turns = []
    for i, message in enumerate(messages):
        check_one_of(f"{field}.chat.messages[{i}].role", message.role, CHAT_ROLES)
        check_length(f"{field}.chat.messages[{i}].content", message.content, 1, MAX_PROMPT_CHARS)
        turns.append(ChatTurn(role=message.role, content=message.content))
    total = sum(len(t.content) for t in turns)
    if total > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"{field}.chat.messages", f"must hold at most {MAX_PROMPT_CHARS:,} characters in all, got {total:,}")
    return tuple(turns)


def parse_sampling(params: common_pb2.SamplingParams, context_length: int, field: str = "sampling") -> Sampling:
    temperature = params.temperature if params.HasField("temperature") else DEFAULT_SAMPLING.temperature
    check_range(f"{field}.temperature", temperature, 0.0, 2.0)
    top_p = params.top_p if params.HasField("top_p") else DEFAULT_SAMPLING.top_p
    check_open_low_range(f"{field}.top_p", top_p, 0.0, 1.0)
    check_range(f"{field}.top_k", params.top_k, 0, MAX_TOP_K)
    max_tokens = params.max_tokens or DEFAULT_SAMPLING.max_tokens
    check_range(f"{field}.max_tokens", max_tokens, 1, context_length)
    check_count(f"{field}.stop", params.stop, 0, MAX_STOP_SEQUENCES)
    for i, stop in enumerate(params.stop):
        check_length(f"{field}.stop[{i}]", stop, 1, MAX_STOP_CHARS)
    check_range(f"{field}.presence_penalty", params.presence_penalty, -2.0, 2.0)
    check_range(f"{field}.frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    constraint = params.WhichOneof("constraint")
    if constraint == "grammar":
        check_length(f"{field}.grammar", params.grammar, 1, MAX_GRAMMAR_CHARS)
        check_grammar(f"{field}.grammar", params.grammar)
    elif constraint == "json_schema":
        check_length(f"{field}.json_schema", params.json_schema, 2, MAX_JSON_SCHEMA_CHARS)
        check_json_schema(f"{field}.json_schema", params.json_schema)
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=params.top_k,
        max_tokens=max_tokens,
        stop=tuple(params.stop),
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        grammar=params.grammar,
        json_schema=params.json_schema,
    )


def parse_generate_request(request: generator_pb2.GenerateRequest, model: ModelDescription, limits: GeneratorLimits) -> GenerationRequest:
    n = request.n or 1
    check_range("n", n, 1, limits.max_samples)
    base_seed = request.seed if request.HasField("seed") else random.randrange(UINT32)
    return GenerationRequest(
        prompt=parse_prompt(request.prompt),
        sampling=parse_sampling(request.sampling, model.context_length),
        seeds=tuple((base_seed + i) % UINT32 for i in range(n)),
    )


def model_info(model: ModelDescription) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(backend=model.backend, model=model.model, context_length=model.context_length)


FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


def generate_response(request: GenerationRequest, generation: Generation, model: ModelDescription) -> generator_pb2.GenerateResponse:
    return generator_pb2.GenerateResponse(
        samples=[
            common_pb2.Sample(
                text=s.text,
                finish_reason=FINISH_REASONS[s.finish_reason],
                seed=s.seed,
                completion_tokens=s.completion_tokens,
            )
            for s in generation.samples
        ],
        model=model_info(model),
        usage=common_pb2.Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
        seed=request.seeds[0],
    )


# Callers that do not know the model (recipes, the critic) leave tighter
# token bounds to the generator, which knows its model's context.
SAMPLING_TOKEN_BOUND = 32_768


def sampling_with_defaults(given: common_pb2.SamplingParams, defaults: common_pb2.SamplingParams, field: str) -> common_pb2.SamplingParams:
    """A recipe's sampling: the spec's fields over the recipe's defaults, validated."""
    merged = common_pb2.SamplingParams()
    merged.CopyFrom(defaults)
    for descriptor, value in given.ListFields():
        if descriptor.name == "stop":
            del merged.stop[:]
            merged.stop.extend(value)
        else:
            setattr(merged, descriptor.name, value)
    parse_sampling(merged, SAMPLING_TOKEN_BOUND, field)  # validates; raises InvalidArgument naming the field
    return merged
