"""Small checks shared by every request parser.

Each raises InvalidArgument naming the field and the rule it broke, so clients
read exactly what to fix. Bounds are inclusive, as in the proto comments.
"""

from __future__ import annotations

import re
from collections.abc import Sized

from autodidact.errors import InvalidArgument

# Quoted client input is cut to this many characters: a status message must
# stay far below gRPC's 8 KiB metadata limit whatever the client sent.
QUOTE_CHARS = 80

# Names that become file or folder names (job ids, dedup namespaces): a letter
# or digit first, so "." and ".." (and hidden names) are refused; see check_id.
# \Z, not $: "$" also matches before a final newline.
ID_PATTERN = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
ID_RULE = "must be 1 to 128 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"


# SubmitReviews' bounds on one decision, which `autodidact review` checks a file against before sending.
MAX_REVIEW_ITEM_ID_CHARS = 256
MAX_REVIEWER_CHARS = 256
MAX_REVIEW_NOTE_CHARS = 4096


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of client input for a message, shortened: 'abc…' (78,000 characters)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def check_id(field: str, value: str) -> None:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(field, f"{ID_RULE}, got {quoted(value)}")


def _number(value: float) -> str:
    """1000000 -> "1,000,000", 0.5 -> "0.5": as a person would write the bound."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def check_range(field: str, value: float, low: float, high: float) -> None:
    if value != value:  # NaN compares false with every bound
        raise InvalidArgument(field, "must be a number, got NaN")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {_number(low)} and {_number(high)}, got {_number(value)}")


def check_open_low_range(field: str, value: float, low: float, high: float) -> None:
    """low < value <= high (e.g. top_p in (0, 1])."""
    if value != value or not low < value <= high:
        raise InvalidArgument(field, f"must be greater than {_number(low)} and at most {_number(high)}, got {_number(value)}")


def check_length(field: str, text: str, low: int, high: int) -> None:
    if len(text) < low:
        raise InvalidArgument(field, "must not be empty" if low == 1 else f"must have at least {low} characters")
    if len(text) > high:
        raise InvalidArgument(field, f"must have at most {high:,} characters, got {len(text):,}")


def check_count(field: str, items: Sized, low: int, high: int) -> None:
    if len(items) < low:
        raise InvalidArgument(field, f"must have at least {low} item{'s' if low != 1 else ''}")
    if len(items) > high:
        raise InvalidArgument(field, f"must have at most {high:,} items, got {len(items):,}")


def check_one_of(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgument(field, f"must be one of {', '.join(map(repr, allowed))}, got {quoted(value)}")
