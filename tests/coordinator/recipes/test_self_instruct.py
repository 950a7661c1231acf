"""The Self-Instruct recipe's pure parts: prompts, parsers, filters, spec checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autodidact.coordinator.jobs import validate_spec
from autodidact.coordinator.recipes.base import derive_seed
from autodidact.coordinator.recipes.self_instruct import (
    SelfInstruct,
    filter_instances,
    instances_cut_off,
    instruction_prompt,
    parse_instances,
    parse_instructions,
    quote,
)
from autodidact.errors import InvalidArgument
from autodidact.v1 import common_pb2, coordinator_pb2
from tests.conftest import SEED_TASKS


def test_prompt_numbers_instructions_and_leaves_the_next_number_open():
    prompt = instruction_prompt(["Sort these:", "Tell a  joke\nabout cats"])
    assert prompt == "Come up with a series of tasks:\n1. Sort these\n2. Tell a joke about cats\n3."


@pytest.mark.parametrize(
    ("instruction", "filter_"),
    [
        ("Hi there friend", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the image in one sentence.", "unsuitable_keyword"),
        ("Plot the points of the given table.", "unsuitable_keyword"),
        ("Explain how to go to the station.", "unsuitable_keyword"),
        ("Write a program that sorts a list.", "write_a_program"),
        ("(optional) Sort the given numbers please.", "starts_with_punctuation"),
        ("Écris une histoire sur un chat.", "starts_non_ascii"),
    ],
)
def test_each_heuristic_filter_drops_and_names_itself(instruction, filter_):
    [(_, decision)] = parse_instructions(instruction, truncated=False)
    assert not decision.kept and decision.filter == filter_ and decision.reason


def test_keywords_match_whole_words_only():
    [(_, decision)] = parse_instructions("Summarize the profile of this mapmaker.", truncated=False)
    assert decision.kept


def test_list_is_split_capitalized_and_a_cut_off_last_item_is_dropped():
    parsed = parse_instructions(" write a poem about the sea.\n10. Sort the given list of numbers.\n11. Translate the", truncated=True)
    assert [(text, d.kept, d.filter) for text, d in parsed] == [
        ("Write a poem about the sea.", True, ""),
        ("Sort the given list of numbers.", True, ""),
        ("Translate the", False, "truncated"),
    ]


def test_instances_parse_input_first_and_output_first():
    assert parse_instances(" Input: 2 + 2\nOutput: 4\nInput: 3 + 3\nOutput: 6", classification=False) == [("2 + 2", "4"), ("3 + 3", "6")]
    assert parse_instances(" Output: A haiku.", classification=False) == [("", "A haiku.")]
    assert parse_instances(" Positive\nInput: I love it\nClass label: Negative\nInput: I hate it", classification=True) == [
        ("I love it", "Positive"),
        ("I hate it", "Negative"),
    ]


def test_instance_filters():
    kept, dropped, why = filter_instances([("a", "b"), ("a", "c"), ("x", "x"), ("y", ""), ("z", "1"), ("z", "1"), ("w", "2")])
    assert kept == [("z", "1"), ("w", "2")]
    assert dropped == {"conflicting_outputs": 2, "copies_input": 1, "empty_output": 1, "repeated": 1}
    assert why[0] == 'conflicting_outputs "b"'


@pytest.mark.parametrize(
    ("task_input", "output"),
    [
        ("Apples, pears and plums", "apples pears and plums."),
        ("1. Buy milk\n2. Walk the dog", "- Buy milk\n- Walk the dog!"),
        ("The  cat sat.", "  the cat   sat  "),
    ],
)
def test_an_output_that_restates_its_input_is_dropped_as_copies_input(task_input, output):
    kept, dropped, why = filter_instances([(task_input, output), ("Sort: 3 1 2", "1 2 3")])
    assert kept == [("Sort: 3 1 2", "1 2 3")] and dropped == {"copies_input": 1}
    assert why == [f"copies_input {json.dumps(output)}"]


def test_the_last_instance_of_a_response_cut_by_max_tokens_is_dropped_as_truncated():
    text = " Input: 2 + 2\nOutput: 4\nInput: 3 + 3\nOutput: the sum of three and thr"
    parsed = parse_instances(text, classification=False)
    assert instances_cut_off(text, parsed, classification=False)
    kept, dropped, why = filter_instances(parsed, truncated=True)
    assert kept == [("2 + 2", "4")] and dropped == {"truncated": 1} and why == ['truncated "the sum of three and thr"']
    # Cut before the last instance's output: the parsed ones are whole.
    text = " Input: 2 + 2\nOutput: 4\nInput: 3 +"
    assert not instances_cut_off(text, parse_instances(text, classification=False), classification=False)
    # Classification instances end with their input.
    text = " Positive\nInput: I love i"
    assert instances_cut_off(text, parse_instances(text, classification=True), classification=True)


def test_drop_reasons_quote_the_models_text_shortened():
    long_item = "Draw " + "a very long picture " * 10
    [(_, decision)] = parse_instructions(long_item, truncated=False)
    assert decision.filter == "unsuitable_keyword"
    assert decision.reason.endswith(": " + json.dumps(long_item[:80] + "…", ensure_ascii=False))
    [(_, cut)] = parse_instructions("Translate the\nfollowing", truncated=True)
    assert cut.reason == 'cut off by max_tokens: "Translate the\\nfollowing"'
    assert quote("x" * 81) == json.dumps("x" * 80 + "…", ensure_ascii=False) and quote("short") == '"short"'


def test_seeds_are_stable_and_distinct_per_item():
    assert derive_seed(7, "instructions", 3) == derive_seed(7, "instructions", 3)
    assert len({derive_seed(7, "instructions", r) for r in range(100)}) == 100
    assert derive_seed(7, "x", 1) != derive_seed(8, "x", 1)


def spec(**fields: Any) -> coordinator_pb2.JobSpec:
    values: dict[str, Any] = {"seed_tasks_path": str(SEED_TASKS), "target_instructions": 5} | fields
    return coordinator_pb2.JobSpec(self_instruct=coordinator_pb2.SelfInstructSpec(**values))


def test_defaults_are_the_papers():
    params = SelfInstruct().resolve(spec().self_instruct, "job-1")
    assert len(params.seed_tasks) == 175 and sum(t.is_classification for t in params.seed_tasks) > 0
    assert (params.human_per_prompt, params.machine_per_prompt, params.threshold, params.namespace) == (6, 2, pytest.approx(0.9), "job-1")
    s = params.instruction_sampling
    assert (s.temperature, s.top_p, s.presence_penalty, s.max_tokens) == (pytest.approx(0.7), pytest.approx(0.5), 2.0, 1024)
    assert list(s.stop) == ["\n\n", "\n16", "16.", "16 ."]
    assert params.instance_sampling.temperature == 0.0 and params.instance_sampling.presence_penalty == pytest.approx(1.5)


def test_given_sampling_fields_override_only_themselves():
    params = SelfInstruct().resolve(spec(instruction_sampling=common_pb2.SamplingParams(max_tokens=200)).self_instruct, "j")
    assert params.instruction_sampling.max_tokens == 200 and params.instruction_sampling.top_p == pytest.approx(0.5)


def test_zero_machine_instructions_can_be_asked_for():
    assert SelfInstruct().resolve(spec(machine_per_prompt=0).self_instruct, "j").machine_per_prompt == 0


@pytest.mark.parametrize(
    ("job_spec", "field", "rule"),
    [
        (coordinator_pb2.JobSpec(), "spec.recipe", "is required"),
        (coordinator_pb2.JobSpec(constitutional=coordinator_pb2.ConstitutionalSpec()), "spec.constitutional.prompts_path", "is required"),
        (coordinator_pb2.JobSpec(toolformer=coordinator_pb2.ToolformerSpec()), "spec.toolformer.documents_path", "is required"),
        (spec(seed_tasks_path="/nonexistent/seeds.jsonl"), "spec.self_instruct.seed_tasks_path", "cannot be read"),
        (spec(seed_tasks_path=""), "spec.self_instruct.seed_tasks_path", "is required"),
        (spec(target_instructions=0), "spec.self_instruct.target_instructions", "is required"),
        (spec(similarity_threshold=1.5), "spec.self_instruct.similarity_threshold", "between 0 and 1"),
        (spec(similarity_threshold=-0.1), "spec.self_instruct.similarity_threshold", "between 0 and 1"),
        (spec(human_per_prompt=40), "spec.self_instruct.human_per_prompt", "between 1 and 16"),
        (spec(dedup_namespace="no spaces allowed"), "spec.self_instruct.dedup_namespace", "A-Z a-z"),
        (
            spec(instance_sampling=common_pb2.SamplingParams(temperature=-1)),
            "spec.self_instruct.instance_sampling.temperature",
            "between 0 and 2",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_field(job_spec, field, rule):
    with pytest.raises(InvalidArgument) as raised:
        validate_spec(job_spec, "job-1", None)
    assert raised.value.field == field and rule in str(raised.value)


def test_a_seed_file_in_the_wrong_format_is_refused(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(json.dumps({"instruction": "Do it", "instances": []}) + "\n")
    with pytest.raises(InvalidArgument, match=r"line 1 .* is not a seed task"):
        SelfInstruct().resolve(spec(seed_tasks_path=str(bad)).self_instruct, "j")
