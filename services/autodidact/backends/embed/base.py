"""The embedder port: texts in, unit vectors out (cosine similarity = dot product)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EmbedderDescription:
    backend: str
    model: str
    dimension: int


class Embedder(Protocol):
    @property
    def description(self) -> EmbedderDescription: ...

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dimension), each row of norm 1."""
        ...

    async def close(self) -> None: ...
