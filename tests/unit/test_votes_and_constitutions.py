"""Self-consistency voting and constitution files: pure rules."""

from __future__ import annotations

import pytest
import yaml

from autodidact.critic.constitution import BUILT_IN, ConstitutionError, Constitutions, load_file
from autodidact.errors import InvalidArgument, NotFound
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern, extract_answer, normalise_answer, vote


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("48 + 24 = 72. The answer is 72.", "72"),
        ("The answer is $1,000.50 in total.", "1000.5"),
        ("The answer is 3.0", "3"),
        ("The answer is -4.", "-4"),
        ("First the answer is 5, then the answer is 6.", ""),  # lower case: no match with the default pattern
        ("I do not know.", ""),
    ],
)
def test_answers_are_extracted_and_normalised(path, answer):
    assert extract_answer(path, compile_pattern(DEFAULT_ANSWER_PATTERN)) == answer


def test_normalise_keeps_words_and_merges_number_spellings():
    assert normalise_answer(" 0.50 ") == normalise_answer("0.5") == "0.5"
    assert normalise_answer("1,200") == "1200"
    assert normalise_answer("Paris") == "Paris"


def test_majority_and_weighted_votes_and_deterministic_ties():
    majority = vote(["7", "8", "7", "", "8"], [1.0] * 5)
    assert majority.winner == "7" and majority.confidence == pytest.approx(0.5)  # tie 2–2: the first reached wins
    assert [(t.answer, t.count) for t in majority.tallies] == [("7", 2), ("8", 2)]
    weighted = vote(["7", "8", "7"], [0.1, 0.9, 0.1])
    assert weighted.winner == "8" and weighted.confidence == pytest.approx(1 / 3)
    assert vote(["", ""], [1.0, 1.0]).winner == ""


@pytest.mark.parametrize(("pattern", "rule"), [("(unclosed", "not a valid regular expression"), ("The answer is [0-9]+", "capturing group")])
def test_bad_answer_patterns_are_refused(pattern, rule):
    with pytest.raises(InvalidArgument) as raised:
        compile_pattern(pattern)
    assert raised.value.field == "answer_pattern" and rule in raised.value.rule


def test_the_default_constitution_is_valid_and_resolves_as_newest():
    constitutions = Constitutions.load()
    default = constitutions.resolve("", "")
    assert default.name == "autodidact-default" and len(default.principles) >= 8
    assert {e.principle for e in default.examples} <= {p.name for p in default.principles}
    with pytest.raises(NotFound):
        constitutions.resolve("nope", "")


def _write(tmp_path, **changes):
    raw = yaml.safe_load((BUILT_IN / "autodidact-default.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"principles": []}, "principles: must have at least 1 item"),
        ({"principles": [{"name": "harm", "critique_request": "Say what is harmful."}]}, "principles[0].revision_request: must not be empty"),
        ({"principles": [{"name": "Bad Name", "critique_request": "a", "revision_request": "b"}]}, "principles[0].name"),
        ({"principles": [{"name": "x", "critique_request": "a", "revision_request": "b"}] * 2, "examples": []}, "principles[1].name: 'x' appears twice"),
        ({"principles": [{"name": "x", "critique_request": "a", "revision_request": "b"}]}, "examples[0].principle: 'harm' is not a principle"),
        ({"version": ""}, "version: must not be empty"),
        ({"shouting": True}, "shouting"),
    ],
)
def test_bad_constitutions_are_refused_naming_the_file_and_field(tmp_path, changes, message):
    with pytest.raises(ConstitutionError) as raised:
        load_file(_write(tmp_path, **changes))
    assert str(raised.value).startswith(str(tmp_path / "c.yaml")) and message in str(raised.value)
