"""Typed item ids keep the exact strings recipes stored before them (old stores replay, datasets stay byte-identical)."""

from __future__ import annotations

import pytest

from autodidact.coordinator.recipes.ids import (
    CallId,
    CandidateId,
    DocumentId,
    ItemId,
    PathId,
    PositionId,
    PromptId,
    QuestionId,
    RoundId,
    ToolItemId,
    toolformer_id,
)

SPELLINGS: list[tuple[ItemId, str]] = [
    (RoundId(3), "r00003"),
    (CandidateId(3, 2), "r00003-02"),
    (CandidateId(123456, 105), "r123456-105"),  # past the padding, as f"{n:05d}" writes it
    (DocumentId(12), "doc00012"),
    (ToolItemId(12, "Calculator"), "doc00012/Calculator"),
    (PositionId(12, "Calculator", 57), "doc00012/Calculator/p0057"),
    (CallId(12, "Calculator", 57, 3), "doc00012/Calculator/p0057/c03"),
    (QuestionId(12), "q00012"),
    (PathId(12, 31), "q00012/p031"),
    (PromptId(12), "p00012"),
]


@pytest.mark.parametrize(("item_id", "text"), SPELLINGS)
def test_an_id_is_stored_as_before_and_parses_back(item_id: ItemId, text: str) -> None:
    assert str(item_id) == text
    assert type(item_id).parse(text) == item_id


@pytest.mark.parametrize("text", ["r3-2", "r00003", "r00003-02x", "q00012/p031", ""])
def test_other_spellings_are_not_candidates(text: str) -> None:
    assert not CandidateId.matches(text)
    with pytest.raises(ValueError):
        CandidateId.parse(text)


def test_a_toolformer_id_is_told_apart_by_its_shape() -> None:
    assert [type(toolformer_id(text)) for _, text in SPELLINGS[3:7]] == [DocumentId, ToolItemId, PositionId, CallId]
    assert RoundId(3).candidate(2) == CandidateId(3, 2)
    assert DocumentId(1).tool("QA").position(5).call(0) == CallId(1, "QA", 5, 0)
    assert QuestionId(4).path(7) == PathId(4, 7)
    with pytest.raises(ValueError):
        toolformer_id("q00012")
