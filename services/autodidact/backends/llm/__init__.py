"""LLM backends behind one port (see base.LLM)."""

from autodidact.backends.llm.base import (
    LLM,
    ChatTurn,
    GeneratedSample,
    Generation,
    GenerationRequest,
    ModelDescription,
    Prompt,
    Sampling,
    TokenScore,
)

__all__ = [
    "LLM",
    "ChatTurn",
    "GeneratedSample",
    "Generation",
    "GenerationRequest",
    "ModelDescription",
    "Prompt",
    "Sampling",
    "TokenScore",
]
