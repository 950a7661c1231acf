"""The LLM port over Text Generation Inference, through huggingface_hub's
AsyncInferenceClient (the maintained client; the `text-generation` package is
deprecated).

- TGI has no `n`: one request per sample, each with its own seed.
- Prompt log-probabilities come from `decoder_input_details`, which needs TGI
  launched with `--enable-prefill-logprobs`; the first prompt token has none.
- TGI has no presence penalty: a request with one is refused rather than
  silently sampled differently (use openai_compat with vLLM for it).
- Constrained sampling: a JSON schema goes out as TGI's `grammar`
  ({"type": "json", "value": schema}; `response_format` for chat). TGI has
  no GBNF grammars (only JSON and regular expressions), so a request with
  `sampling.grammar` is refused naming the backend.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from huggingface_hub import AsyncInferenceClient, TextGenerationInputGrammarType
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OverloadedError, TextGenerationError, ValidationError

from autodidact.backends.llm._offsets import scores_after_context
from autodidact.backends.llm.base import (
    FinishReason,
    GeneratedSample,
    Generation,
    GenerationRequest,
    ModelDescription,
    Sampling,
    TokenScore,
)
from autodidact.backends.remote import RETRYABLE_STATUS, Refused, RemoteSettings, Retryable, get_json, with_backoff
from autodidact.errors import FailedPrecondition, InvalidArgument

BACKEND = "tgi"


class TgiLLM:
    def __init__(self, settings: RemoteSettings, client: AsyncInferenceClient, description: ModelDescription) -> None:
        self._settings = settings
        self._client = client
        self._description = description

    @classmethod
    async def load(cls, settings: RemoteSettings) -> TgiLLM:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            info = await with_backoff(
                BACKEND, settings, lambda: get_json(session, f"{settings.url.rstrip('/')}/info", settings.timeout_seconds)
            )
        client = AsyncInferenceClient(base_url=settings.url, timeout=settings.timeout_seconds)
        description = ModelDescription(
            backend=BACKEND,
            model=settings.model or str(info.get("model_id", "unknown")),
            context_length=int(info.get("max_total_tokens") or settings.context_length),
        )
        return cls(settings, client, description)

    @property
    def description(self) -> ModelDescription:
        return self._description

    async def _call(self, request: Any, field: str = "prompt") -> Any:
        async def attempt() -> Any:
            try:
                return await request()
            except InferenceTimeoutError as exc:
                raise Retryable(str(exc)) from exc
            except ValidationError as exc:  # TGI's typed refusal of the request (HTTP 422)
                raise Refused(422, str(exc)[:500]) from exc
            except OverloadedError as exc:  # TGI's 429: its queue is full
                raise Retryable(f"{type(exc).__name__}: {exc}", overloaded=True) from exc
            except TextGenerationError as exc:  # generation failed on the server
                raise Retryable(f"{type(exc).__name__}: {exc}") from exc
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status in RETRYABLE_STATUS:
                    raise Retryable(f"HTTP {status}: {exc}", overloaded=status == 429) from exc
                raise Refused(status, str(exc)[:500]) from exc
            except OSError as exc:  # connection refused, reset
                raise Retryable(f"{type(exc).__name__}: {exc}") from exc

        return await with_backoff(BACKEND, self._settings, attempt, field)

    async def generate(self, request: GenerationRequest) -> Generation:
        sampling = request.sampling
        if sampling.presence_penalty:
            raise InvalidArgument(
                "sampling.presence_penalty", "the tgi backend has no presence penalty; send 0, or use openai_compat (vLLM)"
            )
        if sampling.grammar:
            raise InvalidArgument(
                "sampling.grammar",
                "the tgi backend cannot honour a GBNF grammar (TGI takes only JSON schemas and regular expressions); "
                "send sampling.json_schema, or use the llamacpp or openai_compat (vLLM, SGLang) backend",
            )
        if isinstance(request.prompt, str):
            samples = await asyncio.gather(*(self._text_sample(request.prompt, sampling, seed) for seed in request.seeds))
        else:
            messages = [{"role": t.role, "content": t.content} for t in request.prompt]
            samples = await asyncio.gather(*(self._chat_sample(messages, sampling, seed) for seed in request.seeds))
        return Generation(samples=tuple(s for s, _ in samples), prompt_tokens=samples[0][1] if samples else 0)

    async def _text_sample(self, prompt: str, sampling: Sampling, seed: int) -> tuple[GeneratedSample, int]:
        output = await self._call(
            lambda: self._client.text_generation(
                prompt,
                details=True,
                decoder_input_details=True,
                max_new_tokens=sampling.max_tokens,
                seed=seed,
                stop=list(sampling.stop) or None,
                grammar=_json_grammar(sampling),
                **_sampling_parameters(sampling),
            )
        )
        details = output.details
        text = output.generated_text
        stopped_by_sequence = details.finish_reason == "stop_sequence"
        if stopped_by_sequence:  # TGI returns the stop sequence; the contract does not
            for stop in sampling.stop:
                if text.endswith(stop):
                    text = text[: -len(stop)]
                    break
        finish: FinishReason = "length" if details.finish_reason == "length" else "stop"
        sample = GeneratedSample(text=text, finish_reason=finish, seed=seed, completion_tokens=details.generated_tokens)
        return sample, len(details.prefill or [])

    async def _chat_sample(self, messages: list[dict[str, str]], sampling: Sampling, seed: int) -> tuple[GeneratedSample, int]:
        parameters = _sampling_parameters(sampling)
        parameters.pop("do_sample", None)
        parameters.pop("top_k", None)
        output = await self._call(
            lambda: self._client.chat_completion(
                messages,
                max_tokens=sampling.max_tokens,
                seed=seed,
                stop=list(sampling.stop) or None,
                temperature=sampling.temperature,
                # TGI's chat endpoint takes its grammar type here too; huggingface_hub annotates only OpenAI's formats.
                response_format=_json_grammar(sampling),  # type: ignore[arg-type]
                **{k: v for k, v in parameters.items() if k != "temperature"},
            )
        )
        choice = output.choices[0]
        finish: FinishReason = "length" if choice.finish_reason == "length" else "stop"
        usage = output.usage
        sample = GeneratedSample(
            text=choice.message.content or "", finish_reason=finish, seed=seed, completion_tokens=usage.completion_tokens
        )
        return sample, usage.prompt_tokens

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        prompt = context + text
        output = await self._call(
            lambda: self._client.text_generation(prompt, details=True, decoder_input_details=True, max_new_tokens=1, do_sample=False),
            field="text",
        )
        prefill = output.details.prefill or []
        if not prefill:
            raise FailedPrecondition(
                f"{BACKEND} at {self._settings.url} returned no prompt tokens: launch TGI with --enable-prefill-logprobs"
            )
        return scores_after_context(prompt, len(context), [(t.text, t.id, t.logprob) for t in prefill])

    async def tokenize(self, text: str) -> list[int]:
        return [t.token_id for t in await self.logprobs(text)]

    async def close(self) -> None:
        await self._client.close()


def _json_grammar(sampling: Sampling) -> TextGenerationInputGrammarType | None:
    """TGI's grammar for a JSON schema (the generator checked it is a JSON object); a dict on the wire."""
    return TextGenerationInputGrammarType(type="json", value=json.loads(sampling.json_schema)) if sampling.json_schema else None


def _sampling_parameters(sampling: Sampling) -> dict[str, Any]:
    """TGI's validation: temperature > 0 only when sampling, top_p < 1, top_k > 0."""
    parameters: dict[str, Any] = {"do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        parameters["temperature"] = sampling.temperature
    if sampling.top_p < 1.0:
        parameters["top_p"] = sampling.top_p
    if sampling.top_k > 0:
        parameters["top_k"] = sampling.top_k
    if sampling.frequency_penalty:
        parameters["frequency_penalty"] = sampling.frequency_penalty
    return parameters
