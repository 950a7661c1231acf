"""`autodidact run` draws progress bars on a terminal and prints plain lines into a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect  # type: ignore[import-untyped]  # no stubs in the dev extra (types-pexpect)
import pytest

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
pytestmark = pytest.mark.slow

SUMMARY_HEADER = re.compile(r"^stage +decided +kept +dropped \(by filter\)$", re.MULTILINE)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def recipe(directory: Path) -> list[str]:
    """The cheapest real job: one question, two short reasoning paths, on the embedded model.
    Each run gets its own store, so the second does not find the first's job done."""
    directory.mkdir()
    (directory / "questions.jsonl").write_text('{"question": "Tom has 3 apples and buys 2 more. How many apples does he have?"}\n')
    (directory / "recipe.yaml").write_text(
        "self_consistency:\n  questions_path: questions.jsonl\n  paths_per_question: 2\n  sampling: {maxTokens: 16}\n"
    )
    return [
        "run",
        str(directory / "recipe.yaml"),
        *("--data-dir", str(directory / "state"), "--out", str(directory / "out"), "--threads", "2"),
    ]


def test_on_a_terminal_run_draws_bars_and_the_summary(tmp_path):
    env = {**os.environ, "TERM": "xterm-256color"}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES"):
        env.pop(name, None)
    child = pexpect.spawn(AUTODIDACT, recipe(tmp_path / "tty"), env=env, dimensions=(40, 140), encoding="utf-8", timeout=240)
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert child.exitstatus == 0, output
    assert "━" in output, output  # rich's bar
    assert re.search(r"\d+\.\d\d/s|\?/s", output), output  # the rate column
    assert re.search(r"\d+/\d+ kept", output), output  # each stage's kept/decided
    assert "\x1b[" in output  # drawn with cursor movements and colours
    plain = ANSI_ESCAPE.sub("", output).replace("\r\n", "\n")
    assert SUMMARY_HEADER.search(plain), plain
    assert "SUCCEEDED" in plain


def test_into_a_file_run_prints_plain_lines_and_the_summary(tmp_path):
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        result = subprocess.run([AUTODIDACT, *recipe(tmp_path / "file")], stdout=sink, stderr=subprocess.STDOUT, timeout=240)
    output = log.read_text()
    assert result.returncode == 0, output
    assert "\r" not in output and "\x1b" not in output and "━" not in output, output
    # One line per change, the stages in the recipe's order: "paths 1/2", "paths 1/2  vote 0/1  agreement 0/2".
    assert re.search(r"^paths \d+/\d+(  vote \d+/\d+)?(  agreement \d+/\d+)?$", output, re.MULTILINE), output
    assert SUMMARY_HEADER.search(output), output
    assert "SUCCEEDED" in output
