"""Checks of sampling constraints before any backend sees them.

A GBNF grammar is checked here, in Python, with the syntax of llama.cpp's
grammar parser (src/llama-grammar.cpp): llama.cpp itself answers a grammar
that does not parse with a null sampler, which llama-cpp-python would hand
on and crash with, and the remote servers answer with errors of their own.
The generator refuses such a request up front, naming the field, the line
and the column.
"""

from __future__ import annotations

import json
from typing import Any

from autodidact.errors import InvalidArgument

_ESCAPES = {"t", "r", "n", "\\", '"', "[", "]"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _GrammarError(Exception):
    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def _is_word(char: str) -> bool:
    # `char` is "" at the end of the input, and "" is `in` every string.
    return len(char) == 1 and char.isascii() and (char.isalnum() or char in "-_")


class _Parser:
    """A recursive-descent reader of GBNF; records rule names defined and used."""

    def __init__(self, source: str) -> None:
        self.src = source
        self.defined: set[str] = set()
        self.used: dict[str, int] = {}

    def peek(self, pos: int) -> str:
        return self.src[pos] if pos < len(self.src) else ""

    def space(self, pos: int, newline_ok: bool) -> int:
        while True:
            char = self.peek(pos)
            if char in (" ", "\t") or (newline_ok and char in ("\r", "\n")):
                pos += 1
            elif char == "#":
                while self.peek(pos) not in ("", "\r", "\n"):
                    pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while _is_word(self.peek(end)):
            end += 1
        if end == pos:
            raise _GrammarError(pos, "expected a rule name")
        return end

    def char(self, pos: int) -> int:
        char = self.peek(pos)
        if char == "":
            raise _GrammarError(pos, "unexpected end of input")
        if char != "\\":
            return pos + 1
        escape = self.peek(pos + 1)
        if escape in _HEX_ESCAPES:
            digits = self.src[pos + 2 : pos + 2 + _HEX_ESCAPES[escape]]
            if len(digits) != _HEX_ESCAPES[escape] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _GrammarError(pos, f"\\{escape} needs {_HEX_ESCAPES[escape]} hexadecimal digits")
            return pos + 2 + len(digits)
        if escape in _ESCAPES:
            return pos + 2
        raise _GrammarError(pos, f"unknown escape \\{escape}")

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        self.defined.add(self.src[pos:end])
        pos = self.space(end, False)
        if not self.src.startswith("::=", pos):
            raise _GrammarError(pos, "expected ::=")
        pos = self.alternates(self.space(pos + 3, True), nested=False)
        if self.peek(pos) == "\r":
            pos += 1
        if self.peek(pos) == "\n":
            pos += 1
        elif pos < len(self.src):
            raise _GrammarError(pos, f"expected a newline or the end, got {self.peek(pos)!r}")
        return self.space(pos, True)

    def alternates(self, pos: int, nested: bool) -> int:
        pos = self.sequence(pos, nested)
        while self.peek(pos) == "|":
            pos = self.sequence(self.space(pos + 1, True), nested)
        return pos

    def sequence(self, pos: int, nested: bool) -> int:
        has_item = False
        while True:
            char = self.peek(pos)
            if char == '"':
                pos += 1
                while self.peek(pos) != '"':
                    pos = self.char(pos)
                pos += 1
            elif char == "[":
                pos += 1
                if self.peek(pos) == "^":
                    pos += 1
                while self.peek(pos) != "]":
                    pos = self.char(pos)
                    if self.peek(pos) == "-" and self.peek(pos + 1) not in ("]", ""):
                        pos = self.char(pos + 1)
                pos += 1
            elif char and _is_word(char):
                end = self.name(pos)
                self.used.setdefault(self.src[pos:end], pos)
                pos = end
            elif char == "(":
                pos = self.alternates(self.space(pos + 1, True), nested=True)
                if self.peek(pos) != ")":
                    raise _GrammarError(pos, "expected )")
                pos += 1
            elif char == ".":
                pos += 1
            elif char in ("*", "+", "?", "{"):
                if not has_item:
                    raise _GrammarError(pos, f"{char} needs an item before it")
                pos = self.repetition(pos) if char == "{" else pos + 1
            else:
                return pos
            has_item = True
            pos = self.space(pos, nested)

    def repetition(self, pos: int) -> int:
        """{m}, {m,} or {m,n}."""
        start = pos
        pos = self.space(pos + 1, False)
        digits = pos
        while self.peek(pos).isdigit():
            pos += 1
        if pos == digits:
            raise _GrammarError(pos, "expected a number after {")
        pos = self.space(pos, False)
        if self.peek(pos) == ",":
            pos = self.space(pos + 1, False)
            while self.peek(pos).isdigit():
                pos += 1
            pos = self.space(pos, False)
        if self.peek(pos) != "}":
            raise _GrammarError(start, "expected } to close the repetition")
        return pos + 1

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.src):
            pos = self.rule(pos)


def _where(source: str, position: int) -> str:
    line = source.count("\n", 0, position) + 1
    column = position - (source.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}"


def check_grammar(field: str, grammar: str) -> None:
    """Raises InvalidArgument naming `field` unless `grammar` is GBNF llama.cpp would accept."""
    parser = _Parser(grammar)
    try:
        parser.parse()
    except _GrammarError as error:
        raise InvalidArgument(field, f"is not a GBNF grammar: {_where(grammar, error.position)}: {error}") from None
    if "root" not in parser.defined:
        raise InvalidArgument(field, "defines no `root` rule; samples match `root`")
    for name, position in parser.used.items():
        if name not in parser.defined:
            raise InvalidArgument(field, f"{_where(grammar, position)}: rule `{name}` is used but never defined")


def check_json_schema(field: str, schema: str) -> dict[str, Any]:
    """The schema as a dict; raises InvalidArgument naming `field` unless it is one JSON object."""
    try:
        parsed = json.loads(schema)
    except (ValueError, RecursionError) as error:
        raise InvalidArgument(field, f"is not JSON: {str(error)[:120]}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(field, f"must be a JSON object (a schema), got a JSON {type(parsed).__name__}")
    return parsed
