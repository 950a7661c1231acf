"""The generator servicer: validate, call the backend, map the result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from autodidact.backends.llm import LLM
from autodidact.generator.requests import GeneratorLimits, generate_response, model_info, parse_generate_request
from autodidact.runtime.component import Component, Resource
from autodidact.runtime.metrics import GENERATED_SAMPLES, GENERATED_TOKENS, PROMPT_TOKENS
from autodidact.v1 import generator_pb2, generator_pb2_grpc

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, backend: Resource[LLM], limits: GeneratorLimits) -> None:
        self._backend = backend
        self._limits = limits

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> generator_pb2.GenerateResponse:
        backend = self._backend.get()
        model = backend.description
        parsed = parse_generate_request(request, model, self._limits)
        generation = await backend.generate(parsed)
        GENERATED_SAMPLES.labels(model.backend).inc(len(generation.samples))
        GENERATED_TOKENS.labels(model.backend).inc(generation.completion_tokens)
        PROMPT_TOKENS.labels(model.backend).inc(generation.prompt_tokens)
        return generate_response(parsed, generation, model)

    async def GetModelInfo(
        self, request: generator_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GetModelInfoResponse:
        return generator_pb2.GetModelInfoResponse(model=model_info(self._backend.get().description), max_samples=self._limits.max_samples)


def generator_component(load_backend: Callable[[], Awaitable[LLM]], limits: GeneratorLimits | None = None) -> Component:
    """The generator as a hostable component; `load_backend` runs after the port is bound."""
    backend = Resource("the model", load_backend)
    servicer = GeneratorServicer(backend, limits or GeneratorLimits())
    return Component(SERVICE_NAME, servicer, generator_pb2_grpc.add_GeneratorServiceServicer_to_server, backend)
