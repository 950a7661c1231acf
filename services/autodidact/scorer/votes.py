"""Self-consistency voting (Wang et al. 2022; ALGORITHMS.md §4).

Every path's answer is the last one it states: the last match of a regular
expression (the `regex` module, with a time limit: the pattern is client
input and a catastrophic one must not hold the service). Numbers are
normalised ("1,000.50" and "1000.5" are one answer) within bounds, so no
answer can make the conversion run for long. The answers are tallied, each
path counting once (majority) or exp(mean token log-probability)
(length-normalised probability weighting; unnormalised sums do much worse in
the paper). A tie for the most votes has no winner.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import regex

from autodidact.errors import InvalidArgument

DEFAULT_ANSWER_PATTERN = r"The answer is\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)"
MAX_PATTERN_CHARS = 512
MATCH_SECONDS = 0.05  # per path
VOTE_MATCH_SECONDS = 2.0  # for all the paths of one vote
# Compiling expands counted repeats ("((a{100}){100}){100}" took minutes, holding
# the process), so the product of every {n,m} in a pattern is bounded.
MAX_REPEAT_PRODUCT = 10_000
COUNTED_REPEAT = re.compile(r"\{(\d*),?(\d*)\}")
# Longer text, or a larger power of ten, is not read as a number: converting
# "1e999999999" to an integer would build a billion-digit number.
MAX_NUMBER_CHARS = 100
MAX_NUMBER_EXPONENT = 100
# A longer capture is not an answer (a degenerate path); it also keeps a
# response (every answer twice: votes and tallies) small.
MAX_ANSWER_CHARS = 1000


@dataclass(frozen=True)
class Tally:
    answer: str
    count: int
    weight: float


@dataclass(frozen=True)
class VoteResult:
    winner: str  # empty when no path had an answer or the heaviest answers tie
    confidence: float  # share of paths with an answer that agree with the winner; 0 without one
    answers: list[str]  # per path; empty when none was found
    tallies: list[Tally]  # heaviest first

    @property
    def tied(self) -> bool:
        return not self.winner and bool(self.tallies)


def compile_pattern(pattern: str, field: str = "answer_pattern") -> regex.Pattern[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(field, f"must have at most {MAX_PATTERN_CHARS:,} characters, got {len(pattern):,}")
    product = 1
    for low, high in COUNTED_REPEAT.findall(pattern):
        product *= max(int(low or 0), int(high or 0), 1)
        if product > MAX_REPEAT_PRODUCT:
            raise InvalidArgument(field, f"its counted repeats ({{n}}, {{n,m}}) multiply to more than {MAX_REPEAT_PRODUCT:,}; use + or *")
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise InvalidArgument(field, f"is not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise InvalidArgument(field, "must have a capturing group around the answer")
    return compiled


def normalise_answer(text: str) -> str:
    """ "1,000.50" -> "1000.5", "-0" -> "0"; text that is not a number (or
    is too long or too large to read as one) is stripped and kept."""
    stripped = text.strip()
    cleaned = stripped.replace(",", "").rstrip(".")
    if len(cleaned) > MAX_NUMBER_CHARS:
        return stripped
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return stripped
    if not number.is_finite() or abs(number.adjusted()) > MAX_NUMBER_EXPONENT:
        return stripped
    if number == number.to_integral_value():
        return str(int(number))
    # Exact digits, no exponent; no context precision involved (it would round).
    return format(number, "f").rstrip("0")


def extract_answer(path: str, pattern: regex.Pattern[str], field: str = "answer_pattern") -> str:
    """The last answer the path states, normalised; empty when it states none
    (or the capture is longer than MAX_ANSWER_CHARS)."""
    try:
        return _last_answer(path, pattern, MATCH_SECONDS)
    except TimeoutError:
        raise InvalidArgument(field, f"took longer than {MATCH_SECONDS * 1000:g} ms on a path; simplify the pattern") from None


def extract_answers(paths: list[str], pattern: regex.Pattern[str], field: str = "answer_pattern") -> list[str]:
    """Every path's answer, within MATCH_SECONDS a path and VOTE_MATCH_SECONDS
    in all (CPU work: call it off the event loop)."""
    give_up_at = time.monotonic() + VOTE_MATCH_SECONDS
    answers = []
    for path in paths:
        left = give_up_at - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            answers.append(_last_answer(path, pattern, min(MATCH_SECONDS, left)))
        except TimeoutError:
            if left > MATCH_SECONDS:
                raise InvalidArgument(field, f"took longer than {MATCH_SECONDS * 1000:g} ms on a path; simplify the pattern") from None
            raise InvalidArgument(
                field, f"took longer than {VOTE_MATCH_SECONDS:g} s over {len(paths):,} paths; simplify the pattern"
            ) from None
    return answers


def _last_answer(path: str, pattern: regex.Pattern[str], seconds: float) -> str:
    last = ""
    # concurrent: the regex module releases the GIL while it matches.
    for match in pattern.finditer(path, concurrent=True, timeout=seconds):
        if match.group(1):
            last = match.group(1)
    return normalise_answer(last) if 0 < len(last) <= MAX_ANSWER_CHARS else ""


def vote(answers: list[str], weights: list[float]) -> VoteResult:
    """Tallies answers (empty ones do not vote). The heaviest answer wins; when
    two are equally heavy nobody does, so the winner never depends on order."""
    tallies: dict[str, list[float]] = {}
    first_seen: dict[str, int] = {}
    for index, (answer, weight) in enumerate(zip(answers, weights, strict=True)):
        if not answer:
            continue
        entry = tallies.setdefault(answer, [0, 0.0])
        entry[0] += 1
        entry[1] += weight
        first_seen.setdefault(answer, index)
    ordered = sorted(tallies, key=lambda a: (-tallies[a][1], -tallies[a][0], first_seen[a]))
    answered = sum(1 for a in answers if a)
    winner = ordered[0] if ordered else ""
    # Weights are sums of floats: "equal" allows for the order they were added in.
    if len(ordered) > 1 and math.isclose(tallies[ordered[0]][1], tallies[ordered[1]][1], rel_tol=1e-9):
        winner = ""
    return VoteResult(
        winner=winner,
        confidence=tallies[winner][0] / answered if winner else 0.0,
        answers=answers,
        tallies=[Tally(a, int(tallies[a][0]), float(tallies[a][1])) for a in ordered],
    )
