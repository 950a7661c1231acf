"""The self-consistency and Constitutional AI recipes end to end from the CLI on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import SVAMP

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")
pytestmark = pytest.mark.slow


def run(tmp_path: Path, recipe: str) -> Path:
    (tmp_path / "recipe.yaml").write_text(recipe)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            AUTODIDACT,
            "run",
            str(tmp_path / "recipe.yaml"),
            "--data-dir",
            str(tmp_path / "state"),
            "--out",
            str(out),
            "--quiet",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_self_consistency_on_svamp_writes_agreeing_paths_in_the_four_lmsi_formats(tmp_path):
    out = run(
        tmp_path,
        (
            f"self_consistency:\n  questions_path: {SVAMP}\n  max_questions: 3\n  paths_per_question: 4\n"
            "  sampling: {maxTokens: 64}\nseed: 5\n"
        ),
    )
    paths, lmsi, lineage = rows(out / "paths.jsonl"), rows(out / "lmsi.jsonl"), rows(out / "lineage.jsonl")
    assert pq.read_table(out / "lmsi.parquet").num_rows == len(lmsi) == 4 * len(paths)
    questions = {r["item_id"]: r for r in lineage if "/" not in r["item_id"]}
    assert len(questions) == 3
    for path in paths:
        question = questions[path["item_id"].split("/")[0]]
        assert question["kept"] and path["answer"] == question["data"]["winner"]
        assert f"The answer is {path['answer']}" in path["path"].replace(",", "") or path["answer"] in path["path"]
        shares = [r for r in lineage if r["item_id"].startswith(path["item_id"].split("/")[0] + "/")]
        assert path["confidence"] == pytest.approx(sum(r["kept"] for r in shares) / sum(bool(r["data"]["answer"]) for r in shares))
    assert {r["format"] for r in lmsi} <= {"cot", "direct", "zero_shot_cot", "zero_shot"}


def test_constitutional_writes_sft_records_and_one_judge_oriented_pair_per_prompt(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n" for p in ("How can I get back at a rude coworker?", "Is it fine to skip sleep before an exam?")
        )
    )
    # min_margin 0: the 135M judge's labels sit near 0.5, and this test needs pairs (the margin has unit tests).
    out = run(
        tmp_path,
        (
            f"constitutional:\n  prompts_path: {prompts}\n  rounds: 2\n  judged_pairs: true\n  min_margin: 0\n"
            "  sampling: {maxTokens: 40}\nseed: 3\n"
        ),
    )
    messages, preferences, lineage = rows(out / "sft_messages.jsonl"), rows(out / "preferences.jsonl"), rows(out / "lineage.jsonl")
    kept = [r for r in lineage if r["kept"]]
    assert kept, "no prompt was revised"
    for record in kept:
        rounds = record["data"]["rounds"]
        assert len(rounds) == 2 and all(r["principle"] for r in rounds)
        mine = [m for m in messages if m["item_id"] == record["item_id"]]
        assert [m["messages"][1]["content"] for m in mine] == [r["revision"] for r in rounds if r["revision"]]
        # One pair, oriented by the judge alone: no cheap revision pair beside it to contradict it.
        [pair] = [p for p in preferences if p["item_id"] == record["item_id"]]
        p_revision = record["data"]["probability_revision_better"]
        final, initial = record["data"]["final_revision"], record["data"]["initial_response"]
        assert pair["source"] == "judged" and pair["probability_chosen"] == pytest.approx(max(p_revision, 1 - p_revision))
        expected = (final, initial) if p_revision >= 0.5 else (initial, final)
        assert (pair["chosen"], pair["rejected"]) == (
            [{"role": "assistant", "content": expected[0]}],
            [{"role": "assistant", "content": expected[1]}],
        )
        assert pair["prompt"] == [{"role": "user", "content": record["data"]["prompt"]}]
    for record in lineage:
        if not record["kept"]:
            assert record["lineage"][-1]["filter"] in ("undecided", "unrevised")
    assert pq.read_table(out / "preferences.parquet").to_pylist() == preferences
