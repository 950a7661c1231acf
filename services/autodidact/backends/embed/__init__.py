"""Embedding backends behind one port (see base.Embedder)."""

from autodidact.backends.embed.base import Embedder, EmbedderDescription

__all__ = ["Embedder", "EmbedderDescription"]
