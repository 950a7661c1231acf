"""The embedded llama.cpp adapter, directly (no gRPC)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from llama_cpp import Llama

from autodidact.backends.llm import GenerationRequest, Sampling
from autodidact.backends.llm.llamacpp import LlamaCppLLM, LlamaCppSettings, bundled_model_path
from autodidact.errors import InvalidArgument
from tests.conftest import MODEL


@pytest.fixture
async def llm():
    backend = await LlamaCppLLM.load(MODEL)
    yield backend
    await backend.close()


def test_the_bundled_model_is_found_without_importing_its_package():
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


async def test_logprobs_equal_a_log_softmax_of_the_raw_logits_of_one_joint_pass(llm):
    # Reference: evaluate context + text in one pass and take log-softmax of the
    # raw logits by hand. (llama-cpp-python's own echo+logprobs output is not
    # usable as a reference: in 0.3.36 it is misaligned with the tokens.)
    context, text = "The cat", " sat on the mat and looked at the door."
    reference = Llama(str(bundled_model_path()), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    context_tokens = reference.tokenize(context.encode(), add_bos=False)
    text_tokens = reference.tokenize(text.encode(), add_bos=False)
    joint = context_tokens + text_tokens
    assert reference.tokenize((context + text).encode(), add_bos=False) == joint, "premise: same tokens joined or apart"
    reference.eval(joint)
    logits = np.asarray(reference.scores[: len(joint)], dtype=np.float64)
    log_norm = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    expected = [logits[i - 1, joint[i]] - log_norm[i - 1] for i in range(len(context_tokens), len(joint))]

    scores = await llm.logprobs(text, context=context)

    assert [s.token_id for s in scores] == text_tokens
    assert [s.token for s in scores] == [reference.detokenize([t]).decode() for t in text_tokens]
    assert [s.logprob for s in scores] == pytest.approx(expected, abs=1e-6)
    assert all(s.logprob < 0 for s in scores)


async def test_context_conditions_the_scores_and_is_not_scored(llm):
    text = " Paris is the capital of France."
    alone = await llm.logprobs(text)
    primed = await llm.logprobs(text, context="Question: what is the capital of France? Answer:")
    assert len(alone) == len(primed)
    assert alone[0].logprob is None  # nothing conditions the first token
    assert all(s.logprob is not None for s in primed)
    assert sum(s.logprob for s in primed[1:]) != pytest.approx(sum(s.logprob for s in alone[1:]))


async def test_char_offsets_point_at_each_token_in_the_text(llm):
    text = "Größe: 3 × 4 = 12 — naïve café"
    scores = await llm.logprobs(text)
    offsets = [s.char_offset for s in scores]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for score in scores:
        if "\ufffd" not in score.token:  # a token that splits a character has no text of its own
            assert text[score.char_offset :].startswith(score.token)


async def test_a_text_longer_than_the_context_is_refused(llm):
    with pytest.raises(InvalidArgument, match="exceeds the model context of 2048 tokens"):
        await llm.logprobs("word " * 3000)


async def test_concurrent_generations_share_no_context_state():
    backend = await LlamaCppLLM.load(LlamaCppSettings(contexts=2, threads=1))
    try:
        requests = [
            GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=24), seeds=(5, 6))
            for prompt in ("The ocean is", "My favourite recipe is", "In 1969, astronauts")
        ]
        together = await asyncio.gather(*(backend.generate(r) for r in requests * 2))
        one_by_one = [await backend.generate(r) for r in requests]
    finally:
        await backend.close()
    assert [g.samples for g in together] == [g.samples for g in one_by_one * 2]
