"""Small checks shared by every request parser.

Each raises InvalidArgument naming the field and the rule it broke, so clients
read exactly what to fix. Bounds are inclusive, as in the proto comments.
"""

from __future__ import annotations

from collections.abc import Sized

from autodidact.errors import InvalidArgument


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
        raise InvalidArgument(field, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
