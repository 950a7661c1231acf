"""BM25 search over named document collections, kept on disk.

Library choice: bm25s (numpy only, ~500x faster than rank_bm25, index built
in memory in well under a second for 10,000 documents). tantivy was the
alternative: incremental and persistent, but its query parser has a syntax
of its own, so every model-written query would need escaping, and it brings
a Rust engine into an image that needs none. Documents live in SQLite (the
source of truth, so nothing indexed is lost on a restart); the BM25 index of
a collection is rebuilt from them on first search after a change.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bm25s is imported where it is used; it ships no types, so mypy reads BM25 as Any
    from bm25s import BM25

STOPWORDS = "en"


@dataclass(frozen=True)
class Hit:
    document_id: str
    text: str
    score: float


class SearchCollections:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS documents (collection TEXT, id TEXT, text TEXT, PRIMARY KEY (collection, id))")
        self._lock = threading.Lock()
        self._indexes: dict[str, tuple[BM25, list[tuple[str, str]]]] = {}

    def add(self, collection: str, documents: list[tuple[str, str]]) -> int:
        """Adds (id, text) pairs, replacing same ids; returns the collection's size."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO documents VALUES (?, ?, ?)", [(collection, i, t) for i, t in documents])
            self._db.execute("COMMIT")
            self._indexes.pop(collection, None)
            return self._size(collection)

    def _size(self, collection: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM documents WHERE collection = ?", (collection,)).fetchone()[0])

    def exists(self, collection: str) -> bool:
        with self._lock:
            return self._size(collection) > 0

    def search(self, collection: str, query: str, k: int = 1) -> list[Hit]:
        """The best matches with a positive score; empty when no word matches."""
        import bm25s

        with self._lock:
            index, documents = self._index(collection)
            words = bm25s.tokenize([query], stopwords=STOPWORDS, return_ids=False, show_progress=False)
            if not words[0] or not documents:
                return []
            ids, scores = index.retrieve(words, k=min(k, len(documents)), show_progress=False, n_threads=1)
        return [
            Hit(document_id=documents[i][0], text=documents[i][1], score=float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0
        ]

    def _index(self, collection: str) -> tuple[BM25, list[tuple[str, str]]]:
        import bm25s

        if collection not in self._indexes:
            rows = self._db.execute("SELECT id, text FROM documents WHERE collection = ? ORDER BY id", (collection,)).fetchall()
            index = bm25s.BM25()
            if rows:
                index.index(bm25s.tokenize([t for _, t in rows], stopwords=STOPWORDS, show_progress=False), show_progress=False)
            self._indexes[collection] = (index, rows)
        return self._indexes[collection]

    def close(self) -> None:
        self._db.close()
