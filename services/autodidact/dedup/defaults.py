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
    # A background snapshot of the index starts once the rows added since the
    # last one reach snapshot_fraction of the index, but at least snapshot_every
    # and at most snapshot_max_tail rows: relative to size, so the bytes written
    # grow with log(size) snapshots rather than size / 5,000; capped, so that the
    # rows a restart searches exactly (and then folds into the graph) stay few.
    snapshot_every: int = 5_000
    snapshot_fraction: float = 0.25
    snapshot_max_tail: int = 50_000
    # Rows added since the index was last free to change (searched exactly
    # meanwhile) that each commit folds into the HNSW graph beside its own.
    drain_per_commit: int = 64
