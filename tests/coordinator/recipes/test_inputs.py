"""The self-consistency and Constitutional AI recipes: input formats, LMSI formats, submit-time checks."""

from __future__ import annotations

import json

import pytest

from autodidact.coordinator.recipes import constitutional, self_consistency
from autodidact.coordinator.recipes.self_consistency import lmsi_examples, load_questions
from autodidact.errors import InvalidArgument
from autodidact.v1 import coordinator_pb2
from tests.conftest import GSM8K, SVAMP


def test_gsm8k_and_svamp_questions_are_read_with_their_reference_answers():
    gsm8k = load_questions(GSM8K, "f", limit=2)
    assert gsm8k[0].text.startswith("Natalia sold clips") and gsm8k[0].reference == "72"
    svamp = load_questions(SVAMP, "f", limit=3)
    assert (
        svamp[0].text == "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert svamp[0].reference == "51.0" and len(svamp) == 3


def test_a_kept_path_becomes_the_four_lmsi_formats():
    examples = lmsi_examples("What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "5")
    assert [kind for kind, _, _ in examples] == ["cot", "direct", "zero_shot_cot", "zero_shot"]
    cot, direct, zero_cot, zero = examples
    assert cot[1].endswith("Q: What is 2 + 3?\nA:") and "The answer is" in cot[1] and cot[2] == " 2 + 3 = 5. The answer is 5."
    assert direct[2] == " The answer is 5." and "= " not in direct[1].split("Q: What")[0]  # direct shots carry no reasoning
    assert zero_cot[1] == "Q: What is 2 + 3?\nA: Let's think step by step." and zero_cot[2] == cot[2]
    assert zero == ("zero_shot", "Q: What is 2 + 3?\nA:", " The answer is 5.")


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"paths_per_question": 0}, "spec.self_consistency.paths_per_question", "between 1 and 256, got 0"),
        ({"paths_per_question": 1_000_000}, "spec.self_consistency.paths_per_question", "between 1 and 256, got 1,000,000"),
        ({"min_confidence": 1.5}, "spec.self_consistency.min_confidence", "between 0 and 1"),
        ({"answer_pattern": "no group"}, "spec.self_consistency.answer_pattern", "capturing group"),
        ({"questions_path": "/nowhere.json"}, "spec.self_consistency.questions_path", "cannot be read"),
        ({"sampling": {"temperature": 5}}, "spec.self_consistency.sampling.temperature", "between 0 and 2"),
        ({"answer_pattern": "((((a{100}){100}){100}){100})"}, "spec.self_consistency.answer_pattern", "counted repeats"),
        ({"min_votes": 0}, "spec.self_consistency.min_votes", "between 1 and paths_per_question (32), got 0"),
        ({"paths_per_question": 4, "min_votes": 5}, "spec.self_consistency.min_votes", "between 1 and paths_per_question (4), got 5"),
        ({"paths_per_question": 1}, "spec.self_consistency.min_votes", "between 1 and paths_per_question (1), got 2 (the default)"),
    ],
)
def test_bad_self_consistency_specs_are_refused(fields, field, rule):
    spec = coordinator_pb2.SelfConsistencySpec(questions_path=str(SVAMP), max_questions=2)
    for key, value in fields.items():
        if key == "sampling":
            spec.sampling.temperature = value["temperature"]
        else:
            setattr(spec, key, value)
    with pytest.raises(InvalidArgument) as raised:
        self_consistency.SelfConsistency().resolve(spec, "job")
    assert raised.value.field == field and rule in raised.value.rule


def test_self_consistency_defaults_are_lmsi_s():
    params = self_consistency.SelfConsistency().resolve(
        coordinator_pb2.SelfConsistencySpec(questions_path=str(SVAMP), max_questions=2), "job"
    )
    assert params.paths == 32 and params.sampling.temperature == pytest.approx(0.7) and params.sampling.top_k == 40
    assert params.min_votes == 2


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"prompts_path": ""}, "spec.constitutional.prompts_path", "is required"),
        ({"rounds": 17}, "spec.constitutional.rounds", "between 1 and 16"),
        ({"max_prompts": 2_000_000}, "spec.constitutional.max_prompts", "between 0 and 1,000,000"),
        ({"min_margin": 0.5}, "spec.constitutional.min_margin", "at least 0 and less than 0.5, got 0.5"),
        ({"min_margin": -0.1}, "spec.constitutional.min_margin", "at least 0 and less than 0.5, got -0.1"),
        ({"min_margin": float("nan")}, "spec.constitutional.min_margin", "at least 0 and less than 0.5"),
    ],
)
def test_bad_constitutional_specs_are_refused(tmp_path, fields, field, rule):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello?"}) + "\n")
    spec = coordinator_pb2.ConstitutionalSpec(**{"prompts_path": str(prompts), **fields})
    with pytest.raises(InvalidArgument) as raised:
        constitutional.Constitutional().resolve(spec, "job")
    assert raised.value.field == field and rule in raised.value.rule


def test_prompt_files_name_the_bad_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(InvalidArgument) as raised:
        constitutional.Constitutional().resolve(coordinator_pb2.ConstitutionalSpec(prompts_path=str(prompts)), "job")
    assert "line 2" in raised.value.rule


def test_min_margin_defaults_to_a_tenth_or_half_that_with_chain_of_thought(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello?"}) + "\n")
    assert constitutional.Constitutional().resolve(coordinator_pb2.ConstitutionalSpec(prompts_path=str(prompts)), "job").min_margin == 0.1
    cot = coordinator_pb2.ConstitutionalSpec(prompts_path=str(prompts), chain_of_thought=True)
    assert constitutional.Constitutional().resolve(cot, "job").min_margin == 0.05  # CoT labels live in [0.4, 0.6]
    explicit = coordinator_pb2.ConstitutionalSpec(prompts_path=str(prompts), min_margin=0.0)
    assert constitutional.Constitutional().resolve(explicit, "job").min_margin == 0.0
