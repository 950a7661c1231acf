"""Dedup constants that callers (the coordinator) need without loading FAISS."""

from __future__ import annotations

from dataclasses import dataclass

from autodidact.runtime.principal import TENANT_PATTERN  # never a "/": "<owner>/<name>" splits one way only
from autodidact.validation import ID_PATTERN

# A namespace is a folder: "." and ".." would write into its parents.
NAMESPACE_PATTERN = ID_PATTERN


def is_namespace_reference(name: str) -> bool:
    """True for a namespace as a caller names it: its tenant's own "<name>",
    or "<owner tenant>/<name>" for one that another tenant shared with it."""
    owner, slash, own = name.rpartition("/")
    return NAMESPACE_PATTERN.match(own) is not None and (not slash or TENANT_PATTERN.match(owner) is not None)


# Calibrated against the original ROUGE-L > 0.7 filter: docs/benchmarks.md.
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class NamespaceSettings:
    # Exact search up to this many vectors; HNSW beyond.
    exact_limit: int = 20_000
    # HNSW graph degree and search breadth: recall above 0.99 at 1M vectors of
    # dimension 384 in FAISS's own benchmarks for these values.
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80
    # Additions between snapshots of the index.
    snapshot_every: int = 5_000
