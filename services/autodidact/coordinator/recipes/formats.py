"""Public data formats recipes read besides their own ("text", "prompt" lines)."""

from __future__ import annotations

import re
from typing import Any

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
