"""The embedder port over Hugging Face text-embeddings-inference (TEI).

POST /embed with {"inputs": [...], "normalize": true, "truncate": true}
answers one vector per input. TEI refuses batches above its
--max-client-batch-size (32 by default), so texts go in chunks of that size,
a few chunks at a time.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np

from autodidact.backends.embed.base import EmbedderDescription
from autodidact.backends.remote import RemoteSettings, get_json, post_json, with_backoff
from autodidact.errors import Unavailable

BACKEND = "tei"
CHUNK = 32
CHUNKS_IN_FLIGHT = 4


class TeiEmbedder:
    def __init__(self, settings: RemoteSettings, session: aiohttp.ClientSession, description: EmbedderDescription) -> None:
        self._settings = settings
        self._session = session
        self._description = description
        self._in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    @classmethod
    async def load(cls, settings: RemoteSettings) -> TeiEmbedder:
        """Asks the server which model it serves and its dimension (waiting out a server still starting)."""
        base = settings.url.rstrip("/")
        async with aiohttp.ClientSession() as session:
            info = await with_backoff(BACKEND, settings, lambda: get_json(session, f"{base}/info", settings.timeout_seconds))
            probe = await with_backoff(
                BACKEND,
                settings,
                lambda: post_json(session, f"{base}/embed", {"inputs": ["dimension probe"], "normalize": True}, settings.timeout_seconds),
            )
        model = settings.model or str(info.get("model_id", "unknown"))
        return cls(settings, aiohttp.ClientSession(), EmbedderDescription(backend=BACKEND, model=model, dimension=len(probe[0])))

    @property
    def description(self) -> EmbedderDescription:
        return self._description

    async def embed(self, texts: list[str]) -> np.ndarray:
        chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
        parts = await asyncio.gather(*(self._embed_chunk(chunk) for chunk in chunks))
        vectors = np.asarray([v for part in parts for v in part], dtype=np.float32)
        # Normalised again here: cosine similarity must not depend on the server's flag.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    async def _embed_chunk(self, chunk: list[str]) -> list[list[float]]:
        url = f"{self._settings.url.rstrip('/')}/embed"
        payload = {"inputs": chunk, "normalize": True, "truncate": True}
        async with self._in_flight:
            vectors = await with_backoff(
                BACKEND, self._settings, lambda: post_json(self._session, url, payload, self._settings.timeout_seconds), field="items"
            )
        if len(vectors) != len(chunk):
            raise Unavailable(f"{BACKEND} at {self._settings.url} answered {len(vectors)} vectors for {len(chunk)} texts")
        return vectors

    async def close(self) -> None:
        await self._session.close()
