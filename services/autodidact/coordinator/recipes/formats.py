"""The input files recipes read: JSON lines, and public data formats."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

from autodidact.errors import InvalidArgument

GSM8K_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def gsm8k_document(question: str, answer: str) -> tuple[str, list[dict[str, Any]]]:
    """A GSM8K problem and its worked solution as one plain text, and the
    calculator annotations it carried ("48/2 = <<48/2=24>>24"): each as the
    offset where it stood (just before its result), expression and result."""
    solution, _, final = answer.partition("\n####")
    text = question.strip() + "\n"
    annotations = []
    last = 0
    for match in GSM8K_ANNOTATION.finditer(solution):
        text += solution[last : match.start()]
        annotations.append({"char_offset": len(text), "expression": match.group(1).strip(), "result": match.group(2).strip()})
        last = match.end()
    text += solution[last:]
    if final.strip():
        text += f"\nThe answer is {final.strip()}."
    return text, annotations


def read_input(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of an input, read as a stream: a job's
    inputs are its own snapshots (coordinator/inputs.py), as large as the
    tenant's upload bound, so no file is held whole. A binary or non-UTF-8
    line is refused naming its number, never the server's path."""
    try:
        stream = path.open("rb")
    except OSError:
        raise InvalidArgument(field, "the input cannot be read") from None
    with stream:
        for number, raw in enumerate(stream, 1):
            if b"\0" in raw:
                raise InvalidArgument(field, f"is not a text file: line {number} holds a NUL byte")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(field, f"is not UTF-8 text: line {number} holds the byte 0x{raw[exc.start]:02x}") from None


def json_lines(lines: Iterable[tuple[int, str]], field: str, limit: int = 0) -> list[tuple[int, Any]]:
    """(line number, parsed value) of the non-empty lines, the first `limit` of them (0: all)."""
    records: list[tuple[int, Any]] = []
    for number, line in lines:
        if limit and len(records) == limit:
            break
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; also 5,000-digit numbers, deep nesting
            raise InvalidArgument(field, f"line {number} is not JSON ({str(exc)[:200]})") from None
    return records


def check_item_count(field: str, items: Sized, noun: str, maximum: int | None = None) -> None:
    if not len(items):
        raise InvalidArgument(field, f"holds no {noun}")
    if maximum is not None and len(items) > maximum:
        raise InvalidArgument(field, f"holds {len(items):,} {noun}; at most {maximum:,} per job")
