"""The input files recipes read: JSON lines, and public data formats."""

from __future__ import annotations

import json
import re
from collections.abc import Sized
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


def read_input(path: Path, field: str) -> str:
    """The file's text; a binary or non-UTF-8 file is refused naming the line."""
    if not path.is_file():
        raise InvalidArgument(field, f"file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(field, f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise InvalidArgument(field, f"{path} is not a text file: line {line} holds a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidArgument(field, f"{path} is not UTF-8 text: line {line} holds the byte 0x{data[exc.start]:02x}") from None


def json_lines(text: str, field: str, limit: int = 0) -> list[tuple[int, Any]]:
    """(line number, parsed value) of the non-empty lines, the first `limit` of them (0: all)."""
    records: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if limit and len(records) == limit:
            break
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; also 5,000-digit numbers, deep nesting
            raise InvalidArgument(field, f"line {number} is not JSON ({str(exc)[:200]})") from None
    return records


def check_item_count(field: str, path: Path, items: Sized, noun: str, maximum: int | None = None) -> None:
    if not len(items):
        raise InvalidArgument(field, f"{path} holds no {noun}")
    if maximum is not None and len(items) > maximum:
        raise InvalidArgument(field, f"{path} holds {len(items):,} {noun}; at most {maximum:,} per job")
