"""MiniLM under OpenVINO: the bundled weights exported once per load, run on parallel streams.

The sentence-transformers model (already loaded from the bundled folder) is
exported to ONNX with torch's exporter into a temporary folder, read by
OpenVINO and compiled for the CPU; nothing is downloaded and nothing is left
on disk. The graph ends in the model's mean pooling, so it returns sentence
embeddings (unnormalised).

Why it is faster than torch on few cores: OpenVINO runs `streams` inference
requests side by side, one core each, instead of splitting every batch across
all cores and synchronising after each layer; and on CPUs with AMX/AVX-512
BF16 its default inference precision is bf16, with LayerNorm, softmax and
accumulation kept in fp32 (the same numeric class as torch's bf16 autocast:
cosine 0.99999 to the fp32 embeddings).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def openvino_available() -> bool:
    try:
        import onnx  # type: ignore[import-not-found,unused-ignore]  # noqa: F401  (torch's ONNX exporter needs it)
        import openvino  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _export_onnx(model: Any, path: Path) -> None:
    import torch

    transformer = model[0].auto_model

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    example = torch.ones(2, 8, dtype=torch.long)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            Pooled().eval(),
            (example, example, torch.zeros_like(example)),
            str(path),
            dynamo=False,
            input_names=list(_INPUTS),
            output_names=["embedding"],
            dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in _INPUTS}, "embedding": {0: "batch"}},
            opset_version=17,
        )


class OpenVinoEncoder:
    """encode(texts) -> (n, dim) float32 mean-pooled embeddings, in input order."""

    def __init__(self, model: Any, threads: int, precision: Literal["auto", "fp32", "bf16"]) -> None:
        import openvino as ov  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self._tokenizer = model.tokenizer
        self._max_length = int(model.max_seq_length)
        self.dimension = int(model.get_embedding_dimension())
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="autodidact-minilm-") as folder:
            path = Path(folder) / "model.onnx"
            _export_onnx(model, path)
            graph = core.read_model(str(path))
        self.streams = max(1, threads)
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": self.streams,
            "NUM_STREAMS": self.streams,
            "PERFORMANCE_HINT": "THROUGHPUT" if self.streams > 1 else "LATENCY",
        }
        if precision != "auto":  # "auto" is OpenVINO's own default: bf16 where the CPU has it, f32 elsewhere
            config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
        self._compiled = core.compile_model(graph, "CPU", config)
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
        self._queue = ov.AsyncInferQueue(self._compiled, self.streams)
        self._lock = threading.Lock()  # one encode at a time owns the queue and its callback

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        # Longest first, so each batch pads to similar lengths; rows go back to input order below.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        # Enough batches to keep every stream busy on a small call.
        size = max(1, min(batch_size, -(-len(texts) // self.streams)))

        def done(request: Any, rows: np.ndarray) -> None:
            out[rows] = request.get_output_tensor(0).data

        with self._lock:
            self._queue.set_callback(done)
            for start in range(0, len(texts), size):
                rows = order[start : start + size]
                encoded = self._tokenizer(
                    [texts[i] for i in rows], padding=True, truncation=True, max_length=self._max_length, return_tensors="np"
                )
                self._queue.start_async({name: encoded[name].astype(np.int64) for name in _INPUTS}, rows)
            self._queue.wait_all()
        return out
