"""GSM8K solutions as plain documents for the Toolformer recipe.

The "<<48/2=24>>" annotations are removed from the text; with --annotations
each document also lists them as (char_offset, expression, result), the
offset being where the annotation stood (just before its result). Usage:

    python scripts/gsm8k_documents.py ../shared/data/gsm8k_train_1000.jsonl --limit 8 > docs.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def gsm8k_document(question: str, answer: str) -> tuple[str, list[dict[str, object]]]:
    """The question and its worked solution as one text, and the calculator annotations in it."""
    solution, _, final = answer.partition("\n####")
    text = question.strip() + "\n"
    annotations = []
    last = 0
    for match in ANNOTATION.finditer(solution):
        text += solution[last : match.start()]
        annotations.append({"char_offset": len(text), "expression": match.group(1).strip(), "result": match.group(2).strip()})
        last = match.end()
    text += solution[last:]
    if final.strip():
        text += f"\nThe answer is {final.strip()}."
    return text, annotations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gsm8k", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--annotations", action="store_true")
    args = parser.parse_args()
    lines = args.gsm8k.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines[: args.limit or None]):
        raw = json.loads(line)
        text, annotations = gsm8k_document(raw["question"], raw["answer"])
        row: dict[str, object] = {"id": f"gsm8k-train-{index}", "text": text}
        if args.annotations:
            row["annotations"] = annotations
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
