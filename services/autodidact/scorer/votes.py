"""Self-consistency voting (Wang et al. 2022; ALGORITHMS.md §4).

Every path's answer is extracted with a regular expression (the `regex`
module, with a time limit: the pattern is client input and a catastrophic
one must not hold the service), numbers are normalised ("1,000.50" and
"1000.5" are one answer), and the answers are tallied, each path counting
once (majority) or exp(mean token log-probability) (length-normalised
probability weighting; unnormalised sums do much worse in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import regex

from autodidact.errors import InvalidArgument

DEFAULT_ANSWER_PATTERN = r"The answer is\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)"
MATCH_SECONDS = 0.05


@dataclass(frozen=True)
class Tally:
    answer: str
    count: int
    weight: float


@dataclass(frozen=True)
class VoteResult:
    winner: str  # empty when no path had an answer
    confidence: float  # share of paths with an answer that agree with the winner
    answers: list[str]  # per path; empty when none was found
    tallies: list[Tally]  # heaviest first


def compile_pattern(pattern: str, field: str = "answer_pattern") -> regex.Pattern[str]:
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise InvalidArgument(field, f"is not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise InvalidArgument(field, "must have a capturing group around the answer")
    return compiled


def normalise_answer(text: str) -> str:
    """"1,000.50" -> "1000.5", "-0" -> "0"; text that is not a number is stripped and kept."""
    cleaned = text.strip().replace(",", "").rstrip(".")
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    if not number.is_finite():
        return text.strip()
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def extract_answer(path: str, pattern: regex.Pattern[str], field: str = "answer_pattern") -> str:
    try:
        match = pattern.search(path, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise InvalidArgument(field, f"took longer than {MATCH_SECONDS * 1000:g} ms on a path; simplify the pattern") from None
    return normalise_answer(match.group(1)) if match and match.group(1) else ""


def vote(answers: list[str], weights: list[float]) -> VoteResult:
    """Tallies answers (empty ones do not vote); ties go to the more frequent,
    then to the one reached first, so the winner never depends on chance."""
    tallies: dict[str, list[float]] = {}
    first_seen: dict[str, int] = {}
    for index, (answer, weight) in enumerate(zip(answers, weights)):
        if not answer:
            continue
        entry = tallies.setdefault(answer, [0, 0.0])
        entry[0] += 1
        entry[1] += weight
        first_seen.setdefault(answer, index)
    ordered = sorted(tallies, key=lambda a: (-tallies[a][1], -tallies[a][0], first_seen[a]))
    answered = sum(1 for a in answers if a)
    winner = ordered[0] if ordered else ""
    return VoteResult(
        winner=winner,
        confidence=tallies[winner][0] / answered if winner else 0.0,
        answers=answers,
        tallies=[Tally(a, int(tallies[a][0]), float(tallies[a][1])) for a in ordered],
    )
