"""The Toolformer recipe's pure steps and its submit-time checks."""

from __future__ import annotations

import json

import pytest

from autodidact.coordinator.recipes.base import Decision
from autodidact.coordinator.recipes.formats import gsm8k_document
from autodidact.coordinator.recipes.toolformer import (
    Toolformer,
    call_grammar,
    call_prompt,
    looks_arithmetic,
    parse_call,
    render_call,
    splice,
    trivial_call,
)
from autodidact.coordinator.records import Record
from autodidact.errors import InvalidArgument
from autodidact.generator.grammar import check_grammar
from autodidact.tool_executor.tools import TOOLS
from autodidact.v1 import coordinator_pb2


def test_gsm8k_annotations_become_positions_just_before_their_results():
    text, annotations = gsm8k_document("Q?", "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72")
    assert text == "Q?\nShe sold 48/2 = 24 clips.\nIn all 48+24 = 72.\nThe answer is 72."
    assert [(text[a["char_offset"] :][:2], a["expression"], a["result"]) for a in annotations] == [
        ("24", "48/2", "24"),
        ("72", "48+24", "72"),
    ]


@pytest.mark.parametrize(
    ("sample", "argument", "why"),
    [
        ("Calculator(48 / 2)", "48 / 2", ""),
        (" Calculator((3 + 4) * 2) ", "(3 + 4) * 2", ""),
        ("Calculator(48/2", None, "the call never closes"),
        ("Calculator()", None, "empty input"),
        ("calculator(1+1)", None, "not a Calculator call: 'calculator(1+1)'"),
        ("Search(cats)", None, "not a Calculator call: 'Search(cats)'"),
    ],
)
def test_parse_call(sample, argument, why):
    assert parse_call(sample, "Calculator", takes_input=True) == (argument, why)


def test_a_tool_without_input_may_have_empty_parentheses():
    assert parse_call("Calendar()", "Calendar", takes_input=False) == ("", "")


def test_splice_puts_calls_before_their_tokens_with_the_markers_space():
    text = "She sold 48/2 = 24 clips, 72 in all."
    spliced = splice(text, [(text.index(" 72"), render_call("Calculator", "48+24", "72")), (text.index(" 24"), "[Calculator(48/2) -> 24]")])
    assert spliced == "She sold 48/2 = [Calculator(48/2) -> 24] 24 clips, [Calculator(48+24) -> 72] 72 in all."
    assert splice("x", []) == "x"


def test_the_call_prompt_continues_the_text_up_to_the_position_with_the_opening_bracket():
    prompt = "Examples...\nInput:\n{text}\nOutput:\n"
    assert call_prompt(prompt, "She sold 24 clips.", 8) == "Examples...\nInput:\nShe sold 24 clips.\nOutput:\nShe sold ["
    assert call_prompt(prompt, "She sold $24.", 10) == "Examples...\nInput:\nShe sold $24.\nOutput:\nShe sold $["


@pytest.mark.parametrize(
    ("text", "arithmetic"),
    [
        ("He had 5 apples and ate 2, so 3 remain.", True),  # 5 − 2 = 3
        ("Each box holds 12, and 4 boxes hold 48 eggs.", True),  # 12 × 4 = 48
        ("They spent a total of 30 dollars.", True),
        ("48/2 = 24", True),
        ("Room 12 is on floor 3 of building 7.", False),
        ("No numbers at all here.", False),
    ],
)
def test_the_calculator_prefilter(text, arithmetic):
    assert looks_arithmetic(text) is arithmetic


def _spec(tmp_path, **fields):
    documents = tmp_path / "docs.jsonl"
    if not documents.exists():
        documents.write_text(json.dumps({"text": "She sold 48/2 = 24 clips."}) + "\n")
    spec = coordinator_pb2.ToolformerSpec(documents_path=str(documents), tools=["Calculator"])
    for key, value in fields.items():
        if key == "tools":
            del spec.tools[:]
            spec.tools.extend(value)
        else:
            setattr(spec, key, value)
    return spec


def test_paper_defaults_per_tool(tmp_path):
    params = Toolformer().resolve(_spec(tmp_path, tools=["Calculator", "QA"]), "job")
    calculator, qa = params.tools
    assert (calculator.position_threshold, calculator.positions, calculator.calls, calculator.filter_threshold) == (0.0, 20, 10, 0.5)
    assert (qa.position_threshold, qa.positions, qa.calls, qa.filter_threshold) == (pytest.approx(0.05), 5, 5, 1.0)


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"documents_path": ""}, "spec.toolformer.documents_path", "is required"),
        ({"documents_path": "/nowhere.jsonl"}, "spec.toolformer.documents_path", "cannot be read"),
        ({"tools": []}, "spec.toolformer.tools", "name at least one tool"),
        ({"tools": ["Calculator", "Python"]}, "spec.toolformer.tools[1]", "no tool named 'Python'"),
        ({"calls_per_position": 65}, "spec.toolformer.calls_per_position", "between 1 and 64"),
        ({"positions_per_document": 5000}, "spec.toolformer.positions_per_document", "between 1 and 1,024"),
        ({"position_threshold": 1.5}, "spec.toolformer.position_threshold", "between 0 and 1"),
        ({"filter_threshold": 1000}, "spec.toolformer.filter_threshold", "between -100 and 100"),
        ({"reference_date": "9 March"}, "spec.toolformer.reference_date", "YYYY-MM-DD"),
        ({"tools": ["Search"]}, "spec.toolformer.search_collection_path", "is required with the Search tool"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(tmp_path, fields, field, rule):
    with pytest.raises(InvalidArgument) as raised:
        Toolformer().resolve(_spec(tmp_path, **fields), "job")
    assert raised.value.field == field and rule in raised.value.rule


def test_gsm8k_lines_are_documents_and_max_documents_takes_the_first(tmp_path):
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"question": "Q1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
        + "\n"
        + json.dumps({"text": "second"})
        + "\n"
        + json.dumps({"text": "third"})
        + "\n"
    )
    params = Toolformer().resolve(_spec(tmp_path, max_documents=2), "job")
    assert [d.text for d in params.documents] == ["Q1?\n1+1 = 2\nThe answer is 2.", "second"]


def test_bad_document_files_name_the_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(InvalidArgument) as raised:
        Toolformer().resolve(_spec(tmp_path), "job")
    assert "line 2" in raised.value.rule


@pytest.mark.parametrize(
    ("argument", "result", "why"),
    [
        ("12", "12", "the input '12' is a lone number"),
        (" (12) ", "12", "the input '(12)' is a lone number"),
        ("1,200", "1200", "the input '1,200' is a lone number"),
        ("-3.5", "-3.5", "the input '-3.5' is a lone number"),
        ("capital of France", "capital of France", "the result 'capital of France' restates the input"),
        ("48 / 2", "24", ""),
        ("12 * 1", "12", ""),  # a real computation, even if an idle one: the loss filter judges it
        ("carpe diem", "seize the day", ""),
    ],
)
def test_trivial_calls(argument, result, why):
    assert trivial_call(argument, result) == why


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tools_call_grammar_is_gbnf_the_generator_accepts(tool):
    grammar = call_grammar(tool, TOOLS[tool].takes_input)
    check_grammar("sampling.grammar", grammar)
    assert grammar.startswith(f'root ::= "{tool}(')


def _record(item_id, kept, data, lineage):
    return Record(item_id, kept, data, [(stage, Decision(k, f)) for stage, k, f in lineage])


def test_the_documents_table_trains_on_the_text_with_calls_and_keeps_the_original():
    call = {
        "tool": "Calculator",
        "char_offset": 15,
        "call": "[Calculator(48/2) -> 24]",
        "input": "48/2",
        "result": "24",
        "loss_plus": 1.0,
        "loss_minus": 2.0,
        "gain": 1.0,
    }
    records = [
        _record(
            "doc00000",
            True,
            {
                "document_id": "d0",
                "text": "She sold 48/2 = [Calculator(48/2) -> 24] 24 clips.",
                "original_text": "She sold 48/2 = 24 clips.",
                "calls": [call],
            },
            [("dataset", True, "")],
        ),
        _record(
            "doc00000/Calculator",
            True,
            {"tool": "Calculator", "positions": []},
            [("prefilter", True, ""), ("positions", True, ""), ("splice", True, "")],
        ),
        _record(
            "doc00000/Calculator/p0015/c00",
            False,
            {"tool": "Calculator", "char_offset": 15, "input": "24", "result": "24"},
            [("sample_call", True, ""), ("execute", False, "trivial_call")],
        ),
    ]
    documents = Toolformer().rows(records)["documents"]
    assert documents == [
        {
            "item_id": "doc00000",
            "document_id": "d0",
            "text": "She sold 48/2 = [Calculator(48/2) -> 24] 24 clips.",
            "original_text": "She sold 48/2 = 24 clips.",
            "calls": [call],
        }
    ]
    calls = Toolformer().rows(records)["calls"]
    assert [(c["item_id"], c["kept"], c["dropped_by"]) for c in calls] == [("doc00000/Calculator/p0015/c00", False, "trivial_call")]
