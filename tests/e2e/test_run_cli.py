"""`autodidact run` refuses bad recipe files before starting anything, naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SEED_TASKS, SVAMP

AUTODIDACT = str(Path(sys.executable).parent / "autodidact")


def run(recipe: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AUTODIDACT, "run", str(recipe), "--data-dir", str(recipe.parent / "state")], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("distillation:\n  teacher: big\n", 'has no field named "distillation"'),
        (
            f"self_instruct:\n  seed_tasks_path: {SEED_TASKS}\n  target_instructions: -3\n",
            "target_instructions field: Value out of range: -3",
        ),
        (
            "self_instruct:\n  seed_tasks_path: missing.jsonl\n  target_instructions: 3\n",
            "spec.self_instruct.seed_tasks_path: cannot read",
        ),
        (
            f"self_instruct:\n  seed_tasks_path: {SEED_TASKS}\n  target_instructions: 3\n  similarity_threshold: 1.5\n",
            "spec.self_instruct.similarity_threshold: must be between 0 and 1, got 1.5",
        ),
        ("- just\n- a list\n", "expected a mapping of JobSpec fields"),
        (
            f"self_consistency:\n  questions_path: {SVAMP}\n  paths_per_question: 0\n",
            "spec.self_consistency.paths_per_question: must be between 1 and 256, got 0",
        ),
        (
            f"self_consistency:\n  questions_path: {SVAMP}\n  paths_per_question: 1000000\n",
            "spec.self_consistency.paths_per_question: must be between 1 and 256, got 1,000,000",
        ),
        ("toolformer:\n  documents_path: missing.jsonl\n  tools: [Calculator]\n", "spec.toolformer.documents_path: cannot read"),
    ],
)
def test_bad_recipe_files_are_refused_with_the_field(tmp_path, body, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    result = run(recipe)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_run_says_whether_it_submitted_resumed_or_found_the_job_done():
    from autodidact.runner import submission_outcome
    from autodidact.v1 import coordinator_pb2

    def outcome(state: coordinator_pb2.JobState.ValueType, **flags: bool) -> str:
        return submission_outcome(coordinator_pb2.SubmitJobResponse(job=coordinator_pb2.Job(state=state), **flags))

    assert outcome(coordinator_pb2.JOB_STATE_PENDING, created=True) == "new job, submitted"
    assert outcome(coordinator_pb2.JOB_STATE_PENDING, resumed=True) == "resumed from what it stored"
    assert outcome(coordinator_pb2.JOB_STATE_SUCCEEDED) == "already done; exporting it again"
    assert outcome(coordinator_pb2.JOB_STATE_RUNNING) == "already running; following it"


@pytest.mark.slow
def test_running_the_same_file_twice_finds_the_job_done(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Tom has 3 apples and buys 2 more. How many apples does he have?"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"self_consistency:\n  questions_path: {questions}\n  paths_per_question: 2\n  sampling: {{maxTokens: 16}}\n")
    command = [AUTODIDACT, "run", str(recipe), "--data-dir", str(tmp_path / "state"), "--quiet", "--threads", "2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "new job, submitted" in first.stderr, first.stdout + first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "already done; exporting it again" in second.stderr, second.stdout + second.stderr
