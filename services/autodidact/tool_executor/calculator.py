"""Toolformer's calculator, safe on model-written text.

The input is parsed with `ast` into an allowlist of numeric nodes and
evaluated by walking the tree; nothing is ever handed to eval, exec,
numexpr or sympy. Every bound is checked before the work it guards: the
length and parenthesis depth before parsing (deep nesting can exhaust the
parser), the node count before evaluating, and the size of a product or
power before computing it (4000000**4000000 would run for minutes).

Results are rounded to two decimals, as in the paper ("400 / 1400" gives
"0.29"); integral results are written without a decimal point.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_INPUT_CHARS = 256
MAX_DEPTH = 16  # parentheses nested
MAX_NODES = 64
# Results (and intermediate values) larger than this many bits are refused.
MAX_BITS = 512
MAX_OUTPUT_CHARS = 160

# Typed failures; the service maps each kind to a ToolErrorCode.
PARSE, NOT_ALLOWED, TOO_LARGE, UNDEFINED = "parse", "not_allowed", "too_large", "undefined"


class CalculatorError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "^": "**"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# "12 x 2" as people (and GSM8K) write a product; "$30" as a price.
_TIMES = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])")


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = MAX_INPUT_CHARS
    max_depth: int = MAX_DEPTH
    max_nodes: int = MAX_NODES
    max_bits: int = MAX_BITS


def calculate(expression: str, limits: Limits = Limits()) -> str:
    """The rounded value of an arithmetic expression, or CalculatorError."""
    text = _normalise(expression, limits)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(PARSE, f"not an arithmetic expression: {type(exc).__name__}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > limits.max_nodes:
        raise CalculatorError(TOO_LARGE, f"expression has {len(nodes)} nodes; at most {limits.max_nodes}")
    for node in nodes:
        _check_allowed(node)
    return _format(_evaluate(tree.body, limits))


def _normalise(expression: str, limits: Limits) -> str:
    if len(expression) > limits.max_input_chars:
        raise CalculatorError(TOO_LARGE, f"input has {len(expression)} characters; at most {limits.max_input_chars}")
    text = _TIMES.sub(" * ", _THOUSANDS.sub("", expression.translate(_SYMBOLS)).replace("$", "")).strip()
    if not text:
        raise CalculatorError(PARSE, "empty expression")
    if not text.isascii():
        raise CalculatorError(NOT_ALLOWED, "only ASCII digits and + - * / ** ( ) are allowed")
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > limits.max_depth:
        raise CalculatorError(TOO_LARGE, f"parentheses nest {deepest} deep; at most {limits.max_depth}")
    return text


def _check_allowed(node: ast.AST) -> None:
    if isinstance(node, ast.Expression | ast.operator | ast.unaryop):
        if isinstance(node, ast.operator | ast.unaryop) and type(node) not in _BINARY and type(node) not in _UNARY:
            raise CalculatorError(NOT_ALLOWED, f"operator {type(node).__name__} is not allowed")
        return
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return
    raise CalculatorError(NOT_ALLOWED, f"{type(node).__name__} is not allowed; only numbers and + - * / **")


def _bits(value: float) -> float:
    """Bits needed for the integer part of |value| (at least 1)."""
    magnitude = abs(value)
    if isinstance(magnitude, int):
        return max(magnitude.bit_length(), 1)
    return max(math.log2(magnitude), 1.0) if magnitude >= 1 else 1.0


def _evaluate(node: ast.expr, limits: Limits) -> float:
    if isinstance(node, ast.Constant):
        value = node.value
        assert isinstance(value, int | float)  # _check_allowed admitted no other constant
        if _bits(value) > limits.max_bits:
            raise CalculatorError(TOO_LARGE, f"a number is larger than 2**{limits.max_bits}")
        return value
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, limits))
    assert isinstance(node, ast.BinOp)  # _check_allowed admitted nothing else
    left, right = _evaluate(node.left, limits), _evaluate(node.right, limits)
    op = type(node.op)
    if op is ast.Mult and _bits(left) + _bits(right) > limits.max_bits + 1:
        raise CalculatorError(TOO_LARGE, f"the product is larger than 2**{limits.max_bits}")
    if op is ast.Pow:
        _check_power(left, right, limits)
    if op is ast.Div and right == 0:
        raise CalculatorError(UNDEFINED, "division by zero")
    try:
        result = _BINARY[op](left, right)
    except ZeroDivisionError:  # 0 ** -1
        raise CalculatorError(UNDEFINED, "division by zero") from None
    except OverflowError:
        raise CalculatorError(TOO_LARGE, f"the result is larger than 2**{limits.max_bits}") from None
    if isinstance(result, complex) or (isinstance(result, float) and math.isnan(result)):
        raise CalculatorError(UNDEFINED, "the result is not a real number")
    if (isinstance(result, float) and math.isinf(result)) or _bits(result) > limits.max_bits:
        raise CalculatorError(TOO_LARGE, f"the result is larger than 2**{limits.max_bits}")
    return result


def _check_power(base: float, exponent: float, limits: Limits) -> None:
    if abs(base) in (0, 1):
        return
    # A bound on |exponent| keeps float and int powers alike cheap; a
    # negative power of a big base only underflows.
    if abs(exponent) > limits.max_bits or (exponent > 0 and _bits(base) * exponent > limits.max_bits + 1):
        raise CalculatorError(TOO_LARGE, f"the power is larger than 2**{limits.max_bits}")


def _format(value: float) -> str:
    if isinstance(value, float):
        value = round(value, 2)
        if value.is_integer():
            value = int(value)
    text = str(value)
    if len(text) > MAX_OUTPUT_CHARS:
        raise CalculatorError(TOO_LARGE, f"the result has more than {MAX_OUTPUT_CHARS} digits")
    return "0" if text == "-0.0" else text
