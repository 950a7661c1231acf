"""Typed item ids: what a recipe's items are, instead of f-strings parsed apart.

Each id is a small frozen dataclass; `str(id)` is the form stored in the job
store and written to lineage, and `parse` reads it back. The stored forms are
exactly the ones the recipes wrote before these types existed ("r00003-02",
"doc00012/Calculator/p0057/c03", "q00012/p031", "p00012"), so old stores
replay and resumed jobs write byte-identical datasets. Numbers are zero-padded
to a minimum width; a larger number simply takes more digits, as `:05d` does.
"""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, Self


class ItemId:
    """The shared parse of every id type: a full match of PATTERN, whose groups
    are the dataclass's fields in order (converted back to int where the field is one)."""

    PATTERN: ClassVar[re.Pattern[str]]
    # Declared, never set here: every id type is a dataclass, which sets it; this tells the type checker, for fields(cls).
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @classmethod
    def parse(cls, text: str) -> Self:
        """The id `text` spells; ValueError when it is not one of this type."""
        match = cls.PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(f"{text!r} is not a {cls.__name__}")
        kinds = [field.type for field in fields(cls)]
        parsed = cls(*(int(group) if kind in (int, "int") else group for kind, group in zip(kinds, match.groups(), strict=True)))
        if str(parsed) != text:  # e.g. "r3-2": a spelling no recipe writes
            raise ValueError(f"{text!r} is not a {cls.__name__} as recipes write it ({parsed})")
        return parsed

    @classmethod
    def matches(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except ValueError:
            return False
        return True


# --- Self-Instruct ---


@dataclass(frozen=True)
class RoundId(ItemId):
    """One Self-Instruct round (a prompt and its raw sample): "r00003"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"r(\d+)")
    round: int

    def __str__(self) -> str:
        return f"r{self.round:05d}"

    def candidate(self, position: int) -> CandidateId:
        return CandidateId(self.round, position)


@dataclass(frozen=True)
class CandidateId(ItemId):
    """The instruction a round's sample listed at `position`: "r00003-02"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"r(\d+)-(\d+)")
    round: int
    position: int

    def __str__(self) -> str:
        return f"r{self.round:05d}-{self.position:02d}"


# --- Toolformer ---


@dataclass(frozen=True)
class DocumentId(ItemId):
    """A Toolformer input document by its index: "doc00012"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"doc(\d+)")
    PREFIX: ClassVar[str] = "doc"
    index: int

    def __str__(self) -> str:
        return f"doc{self.index:05d}"

    def tool(self, tool: str) -> ToolItemId:
        return ToolItemId(self.index, tool)


@dataclass(frozen=True)
class ToolItemId(ItemId):
    """A (document, tool) pair, decided at prefilter, positions and splice: "doc00012/Calculator"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"doc(\d+)/([^/]+)")
    index: int
    tool: str

    def __str__(self) -> str:
        return f"{DocumentId(self.index)}/{self.tool}"

    @property
    def document(self) -> DocumentId:
        return DocumentId(self.index)

    def position(self, char_offset: int) -> PositionId:
        return PositionId(self.index, self.tool, char_offset)


@dataclass(frozen=True)
class PositionId(ItemId):
    """Where calls of a tool were sampled (a marker result, never a record): "doc00012/Calculator/p0057"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"doc(\d+)/([^/]+)/p(\d+)")
    index: int
    tool: str
    char_offset: int

    def __str__(self) -> str:
        return f"{ToolItemId(self.index, self.tool)}/p{self.char_offset:04d}"

    def call(self, number: int) -> CallId:
        return CallId(self.index, self.tool, self.char_offset, number)


@dataclass(frozen=True)
class CallId(ItemId):
    """One sampled candidate call at a position: "doc00012/Calculator/p0057/c03"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"doc(\d+)/([^/]+)/p(\d+)/c(\d+)")
    index: int
    tool: str
    char_offset: int
    number: int

    def __str__(self) -> str:
        return f"{PositionId(self.index, self.tool, self.char_offset)}/c{self.number:02d}"


def toolformer_id(text: str) -> DocumentId | ToolItemId | PositionId | CallId:
    """Whichever Toolformer id `text` is; ValueError when none."""
    for kind in (DocumentId, ToolItemId, PositionId, CallId):
        if kind.matches(text):
            return kind.parse(text)
    raise ValueError(f"{text!r} is not a Toolformer item id")


# --- Self-consistency ---


@dataclass(frozen=True)
class QuestionId(ItemId):
    """A self-consistency question by its index: "q00012"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"q(\d+)")
    index: int

    def __str__(self) -> str:
        return f"q{self.index:05d}"

    def path(self, number: int) -> PathId:
        return PathId(self.index, number)


@dataclass(frozen=True)
class PathId(ItemId):
    """A question's sampled reasoning path: "q00012/p031"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"q(\d+)/p(\d+)")
    index: int
    number: int

    def __str__(self) -> str:
        return f"{QuestionId(self.index)}/p{self.number:03d}"


# --- Constitutional AI ---


@dataclass(frozen=True)
class PromptId(ItemId):
    """A Constitutional AI prompt by its index: "p00012"."""

    PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"p(\d+)")
    index: int

    def __str__(self) -> str:
        return f"p{self.index:05d}"
