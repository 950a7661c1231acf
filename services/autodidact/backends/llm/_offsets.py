"""Which tokens of a scored prompt belong to the text after its context."""

from __future__ import annotations

from autodidact.backends.llm.base import TokenScore


def scores_after_context(prompt: str, context_length: int, tokens: list[tuple[str, int, float | None]]) -> list[TokenScore]:
    """Keeps the tokens that start at or after `context_length` characters.

    `tokens` are (text, id, logprob) in order. A leading token whose text is
    not where the prompt starts (a beginning-of-sequence marker) takes no
    characters. Offsets are in code points of `prompt`, rebased to the text.
    """
    position = 0
    scored = []
    for index, (text, token_id, logprob) in enumerate(tokens):
        if index == 0 and text and not prompt.startswith(text):
            continue  # BOS and the like: not part of the prompt's characters
        if position >= context_length:
            scored.append(TokenScore(token=text, token_id=token_id, logprob=logprob, char_offset=position - context_length))
        position += len(text)
    return scored
