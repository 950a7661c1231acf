"""The LLM port over an OpenAI-compatible server: vLLM, SGLang, llama.cpp's server.

- Text prompts go to /v1/completions, chat prompts to /v1/chat/completions,
  one request per sample so that every sample has its own seed.
- Prompt log-probabilities: /v1/completions with `echo` and `logprobs`, which
  returns every prompt token with its log-probability and character offset
  (the first token has none). Servers differ in how faithfully they compute
  these: llama-cpp-python 0.3.36's are misaligned (see docs/deploy.md), vLLM's
  are the production path.
- Constrained sampling has no standard field, so the request carries each
  server's own, chosen by the `owned_by` its /v1/models reports: vLLM
  (>= 0.10) `structured_outputs` {"grammar"} or {"json"}; SGLang `ebnf` or
  `json_schema`; any other server (llama.cpp's, llama-cpp-python's) the
  llama.cpp server fields `grammar` or `json_schema`. All three take GBNF
  (vLLM and SGLang through xgrammar).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from autodidact.backends.llm.base import (
    FinishReason,
    GeneratedSample,
    Generation,
    GenerationRequest,
    ModelDescription,
    Sampling,
    TokenScore,
)
from autodidact.backends.remote import RemoteSettings, get_json, post_json, with_backoff
from autodidact.errors import FailedPrecondition

BACKEND = "openai_compat"


def _vllm(sampling: Sampling) -> dict[str, Any]:
    if sampling.grammar:
        return {"structured_outputs": {"grammar": sampling.grammar}}
    return {"structured_outputs": {"json": json.loads(sampling.json_schema)}}


def _sglang(sampling: Sampling) -> dict[str, Any]:
    return {"ebnf": sampling.grammar} if sampling.grammar else {"json_schema": sampling.json_schema}


def _llamacpp_server(sampling: Sampling) -> dict[str, Any]:
    return {"grammar": sampling.grammar} if sampling.grammar else {"json_schema": json.loads(sampling.json_schema)}


# Request fields of a constraint, by the server's `owned_by` in /v1/models.
CONSTRAINT_FIELDS = {"vllm": _vllm, "sglang": _sglang}


class OpenAICompatLLM:
    def __init__(self, settings: RemoteSettings, session: aiohttp.ClientSession, description: ModelDescription, server: str = "") -> None:
        self._settings = settings
        self._constraint_fields = CONSTRAINT_FIELDS.get(server, _llamacpp_server)
        self._session = session
        self._description = description
        self._base = settings.url.rstrip("/")

    @classmethod
    async def load(cls, settings: RemoteSettings) -> OpenAICompatLLM:
        base = settings.url.rstrip("/")
        async with aiohttp.ClientSession() as session:
            models = await with_backoff(BACKEND, settings, lambda: get_json(session, f"{base}/v1/models", settings.timeout_seconds))
        served = (models.get("data") or [{}])[0]
        description = ModelDescription(
            backend=BACKEND,
            model=settings.model or str(served.get("id", "unknown")),
            # vLLM reports max_model_len; others do not, so the setting stands in.
            context_length=int(served.get("max_model_len") or settings.context_length),
        )
        return cls(settings, aiohttp.ClientSession(), description, server=str(served.get("owned_by", "")).lower())

    @property
    def description(self) -> ModelDescription:
        return self._description

    async def _post(self, path: str, payload: dict[str, Any], field: str = "prompt") -> Any:
        return await with_backoff(
            BACKEND, self._settings, lambda: post_json(self._session, f"{self._base}{path}", payload, self._settings.timeout_seconds), field
        )

    def _common(self, sampling: Sampling, seed: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._description.model,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
            "n": 1,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
        }
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if sampling.top_k:
            payload["top_k"] = sampling.top_k  # an extension vLLM, SGLang and llama.cpp accept
        if sampling.grammar or sampling.json_schema:
            payload |= self._constraint_fields(sampling)
        return payload

    async def generate(self, request: GenerationRequest) -> Generation:
        samples = await asyncio.gather(*(self._sample(request, seed) for seed in request.seeds))
        return Generation(samples=tuple(s for s, _ in samples), prompt_tokens=samples[0][1] if samples else 0)

    async def _sample(self, request: GenerationRequest, seed: int) -> tuple[GeneratedSample, int]:
        payload = self._common(request.sampling, seed)
        if isinstance(request.prompt, str):
            answer = await self._post("/v1/completions", {**payload, "prompt": request.prompt})
            text = answer["choices"][0]["text"]
        else:
            messages = [{"role": t.role, "content": t.content} for t in request.prompt]
            answer = await self._post("/v1/chat/completions", {**payload, "messages": messages})
            text = answer["choices"][0]["message"]["content"] or ""
        choice = answer["choices"][0]
        usage = answer.get("usage") or {}
        finish: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
        sample = GeneratedSample(text=text, finish_reason=finish, seed=seed, completion_tokens=int(usage.get("completion_tokens", 0)))
        return sample, int(usage.get("prompt_tokens", 0))

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        prompt = context + text
        answer = await self._post(
            "/v1/completions",
            {"model": self._description.model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1},
            field="text",
        )
        logprobs = answer["choices"][0].get("logprobs") or {}
        tokens, values, offsets = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("text_offset")
        if not tokens or values is None or offsets is None:
            raise FailedPrecondition(f"{BACKEND} at {self._settings.url} did not echo prompt log-probabilities")
        scored = []
        # Parallel lists from the server; one cut short ends the scan, as the generated token does.
        for token, value, offset in zip(tokens, values, offsets, strict=False):
            if offset >= len(prompt):
                break  # the one generated token
            if offset >= len(context):
                scored.append(TokenScore(token=token, token_id=-1, logprob=value, char_offset=offset - len(context)))
        return scored

    async def tokenize(self, text: str) -> list[int]:
        raise FailedPrecondition(f"{BACKEND}: tokenize is not part of the OpenAI API")

    async def close(self) -> None:
        await self._session.close()
