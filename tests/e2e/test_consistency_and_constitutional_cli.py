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
        [AUTODIDACT, "run", str(tmp_path / "recipe.yaml"), "--data-dir", str(tmp_path / "state"), "--out", str(out), "--quiet", "--threads", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_self_consistency_on_svamp_writes_agreeing_paths_in_the_four_lmsi_formats(tmp_path):
    out = run(tmp_path, (
        f"self_consistency:\n  questions_path: {SVAMP}\n  max_questions: 3\n  paths_per_question: 4\n"
        "  sampling: {maxTokens: 64}\nseed: 5\n"
    ))
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


def test_constitutional_writes_sft_records_and_preference_pairs(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("How can I get back at a rude coworker?", "Is it fine to skip sleep before an exam?")))
    out = run(tmp_path, (
        f"constitutional:\n  prompts_path: {prompts}\n  rounds: 2\n  judged_pairs: true\n  sampling: {{maxTokens: 40}}\nseed: 3\n"
    ))
    messages, preferences, lineage = rows(out / "sft_messages.jsonl"), rows(out / "preferences.jsonl"), rows(out / "lineage.jsonl")
    kept = [r for r in lineage if r["kept"]]
    assert kept, "no prompt was revised"
    for record in kept:
        rounds = record["data"]["rounds"]
        assert len(rounds) == 2 and all(r["principle"] for r in rounds)
        mine = [m for m in messages if m["item_id"] == record["item_id"]]
        assert [m["messages"][1]["content"] for m in mine] == [r["revision"] for r in rounds if r["revision"]]
        pairs = {p["kind"]: p for p in preferences if p["item_id"] == record["item_id"]}
        assert pairs["revision"]["chosen"] == record["data"]["final_revision"] and pairs["revision"]["rejected"] == record["data"]["initial_response"]
        judged = pairs["judged"]
        assert 0.5 <= judged["probability_chosen"] <= 1.0
        assert {judged["chosen"], judged["rejected"]} == {record["data"]["final_revision"], record["data"]["initial_response"]}
        assert set(judged) >= {"prompt", "chosen", "rejected"}
    assert pq.read_table(out / "preferences.parquet").num_rows == len(preferences)
