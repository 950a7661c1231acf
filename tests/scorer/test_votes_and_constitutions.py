"""Self-consistency voting and constitution files: pure rules."""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autodidact.critic.constitution import BUILT_IN, ConstitutionError, Constitutions, load_file
from autodidact.errors import InvalidArgument, NotFound
from autodidact.scorer import votes
from autodidact.scorer.votes import DEFAULT_ANSWER_PATTERN, compile_pattern, extract_answer, extract_answers, normalise_answer, vote


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("48 + 24 = 72. The answer is 72.", "72"),
        ("The answer is $1,000.50 in total.", "1000.5"),
        ("The answer is 3.0", "3"),
        ("The answer is -4.", "-4"),
        ("First the answer is 5, then the answer is 6.", ""),  # lower case: no match with the default pattern
        ("I do not know.", ""),
        # The answer a path states last is its answer (issue 10: this path was counted as 76).
        ("12 + 64 = 76. The answer is 76. But 26 were lost: 76 - 26 = 50. The answer is 50.", "50"),
        ("The answer is 3. The answer is 3.0", "3"),
        ("The answer is " + "9" * 5000, ""),  # a capture over 1,000 characters is not an answer
    ],
)
def test_answers_are_extracted_and_normalised(path, answer):
    assert extract_answer(path, compile_pattern(DEFAULT_ANSWER_PATTERN)) == answer


def test_normalise_keeps_words_and_merges_number_spellings():
    assert normalise_answer(" 0.50 ") == normalise_answer("0.5") == "0.5"
    assert normalise_answer("1,200") == "1200"
    assert normalise_answer("Paris") == "Paris"
    assert normalise_answer("1e5") == "100000" and normalise_answer("-0.0") == "0"
    # More digits than the default decimal precision (28) are kept exactly, not rounded into another answer.
    assert normalise_answer("0.1234567890123456789012345678901234") == "0.1234567890123456789012345678901234"


@pytest.mark.timeout(10, method="thread")  # before the bounds, "1e999999999" built a billion-digit integer
@pytest.mark.parametrize(
    "text", ["1e999999999", "-1E+999999999", "1e-999999999", "9" * 5000, "1" + "0" * 101, "1e101", "NaN", "-Infinity", "sNaN"]
)
def test_numbers_too_long_or_too_large_are_kept_as_text_at_once(text):
    started = time.monotonic()
    assert normalise_answer(f" {text} ") == text
    assert time.monotonic() - started < 0.1


def test_majority_and_weighted_votes():
    majority = vote(["7", "8", "7", "", "7"], [1.0] * 5)
    assert majority.winner == "7" and majority.confidence == pytest.approx(0.75)
    assert [(t.answer, t.count) for t in majority.tallies] == [("7", 3), ("8", 1)]
    weighted = vote(["7", "8", "7"], [0.1, 0.9, 0.1])
    assert weighted.winner == "8" and weighted.confidence == pytest.approx(1 / 3)
    assert vote(["", ""], [1.0, 1.0]).winner == ""


@pytest.mark.parametrize(
    ("answers", "weights"),
    [
        (["7", "8", "7", "", "8"], [1.0] * 5),  # 2-2
        ([str(i) for i in range(8)], [1.0] * 8),  # eight different answers: no 1-of-8 winner
        (["7", "8", "8"], [0.5, 0.25, 0.25]),  # equal weights
    ],
)
def test_a_tie_has_no_winner(answers, weights):
    result = vote(answers, weights)
    assert result.winner == "" and result.confidence == 0 and result.tied and result.tallies


@settings(max_examples=300, deadline=1000)  # a stall (a billion-digit integer) would blow this
@given(st.one_of(st.text(max_size=300), st.from_regex(r"-?[0-9]{1,120}(\.[0-9]{1,60})?([eE][-+]?[0-9]{1,12})?", fullmatch=True)))
def test_normalising_any_text_is_quick_and_idempotent(text):
    once = normalise_answer(text)
    assert normalise_answer(once) == once and len(once) <= max(len(text.strip()), 210)  # 100 digits, 10^±100


@settings(max_examples=200, deadline=None)
@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: abs(d.adjusted()) <= 50 and len(d.as_tuple().digits) <= 40
    )
)
def test_one_number_written_two_ways_is_one_answer(number):
    assert normalise_answer(str(number)) == normalise_answer(format(number, "f")) == normalise_answer(format(number, ",f"))


@given(st.lists(st.sampled_from(["", "1", "2", "3"]), min_size=1, max_size=12), st.data())
def test_a_winner_is_strictly_heaviest_and_no_winner_means_a_tie(answers, data):
    weights = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0]), min_size=len(answers), max_size=len(answers)))
    result = vote(answers, weights)
    if result.winner:
        assert all(result.tallies[0].weight > t.weight for t in result.tallies[1:]) and result.tallies[0].answer == result.winner
    else:
        assert not result.tallies or result.tallies[0].weight == result.tallies[1].weight


def test_all_paths_together_get_a_time_budget(monkeypatch):
    monkeypatch.setattr(votes, "VOTE_MATCH_SECONDS", 0.3)  # below the default 2 s: fast and busy machines alike pass
    pattern = compile_pattern(r"([0-9]+)")
    path = "1 " * 4000  # many matches: milliseconds a path, well under the per-path limit
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as raised:
        extract_answers([path] * 600, pattern)
    assert raised.value.field == "answer_pattern" and "took longer than 0.3 s over 600 paths" in raised.value.rule
    assert time.monotonic() - started < 2


@pytest.mark.timeout(10, method="thread")  # compiling the nested repeats took minutes, holding the process
@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("(unclosed", "not a valid regular expression"),
        ("The answer is [0-9]+", "capturing group"),
        ("((((a{100}){100}){100}){100})", "counted repeats"),
        ("(x)" + "a" * 600, "at most 512 characters"),
    ],
)
def test_bad_answer_patterns_are_refused(pattern, rule):
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as raised:
        compile_pattern(pattern)
    assert raised.value.field == "answer_pattern" and rule in raised.value.rule
    assert time.monotonic() - started < 1


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
        (
            {"principles": [{"name": "harm", "critique_request": "Say what is harmful."}]},
            "principles[0].revision_request: must not be empty",
        ),
        ({"principles": [{"name": "Bad Name", "critique_request": "a", "revision_request": "b"}]}, "principles[0].name"),
        (
            {"principles": [{"name": "x", "critique_request": "a", "revision_request": "b"}] * 2, "examples": []},
            "principles[1].name: 'x' appears twice",
        ),
        (
            {"principles": [{"name": "x", "critique_request": "a", "revision_request": "b"}]},
            "examples[0].principle: 'harm' is not a principle",
        ),
        ({"version": ""}, "version: must not be empty"),
        ({"shouting": True}, "shouting"),
    ],
)
def test_bad_constitutions_are_refused_naming_the_file_and_field(tmp_path, changes, message):
    with pytest.raises(ConstitutionError) as raised:
        load_file(_write(tmp_path, **changes))
    assert str(raised.value).startswith(str(tmp_path / "c.yaml")) and message in str(raised.value)
