"""Parsing and validation of Generate requests (no server, no model)."""

from __future__ import annotations

import math

import pytest

from autodidact.backends.llm import ChatTurn, ModelDescription
from autodidact.errors import InvalidArgument
from autodidact.generator.requests import GeneratorLimits, parse_generate_request
from autodidact.v1 import common_pb2, generator_pb2

MODEL = ModelDescription(backend="test", model="m", context_length=2048)
LIMITS = GeneratorLimits(max_samples=64)


def parse(request: generator_pb2.GenerateRequest):
    return parse_generate_request(request, MODEL, LIMITS)


def text(value: str = "hello", **fields) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=value), **fields)


def test_defaults_are_the_documented_ones():
    parsed = parse(text(seed=5))
    assert parsed.prompt == "hello"
    assert parsed.seeds == (5,)
    s = parsed.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop) == (pytest.approx(0.7), 1.0, 0, 256, ())


def test_zero_temperature_is_kept_distinct_from_unset():
    parsed = parse(text(sampling=common_pb2.SamplingParams(temperature=0.0)))
    assert parsed.sampling.temperature == 0.0


def test_sample_seeds_follow_the_base_seed_and_wrap_at_32_bits():
    assert parse(text(n=3, seed=10)).seeds == (10, 11, 12)
    assert parse(text(n=2, seed=2**32 - 1)).seeds == (2**32 - 1, 0)


def test_unset_seed_is_drawn_and_each_sample_still_has_its_own():
    seeds = parse(text(n=4)).seeds
    assert len(set(seeds)) == 4 and all(0 <= s < 2**32 for s in seeds)


def test_chat_prompt_becomes_turns():
    chat = common_pb2.Chat(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    parsed = parse(generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=chat)))
    assert parsed.prompt == (ChatTurn("user", "hi"),)


def sampling(**fields) -> generator_pb2.GenerateRequest:
    return text(sampling=common_pb2.SamplingParams(**fields))


def chat(*messages: tuple[str, str]) -> generator_pb2.GenerateRequest:
    turns = [common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    return generator_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=common_pb2.Chat(messages=turns)))


@pytest.mark.parametrize(
    ("request_", "field", "rule"),
    [
        (generator_pb2.GenerateRequest(), "prompt", "is required"),
        (text(""), "prompt.text", "must not be empty"),
        (text("x" * 65_537), "prompt.text", "at most 65,536 characters"),
        (chat(), "prompt.chat.messages", "at least 1 item"),
        (chat(("robot", "hi")), "prompt.chat.messages[0].role", "must be one of"),
        (chat(("user", "hi"), ("assistant", "")), "prompt.chat.messages[1].content", "must not be empty"),
        (chat(*[("user", "x" * 40_000)] * 2), "prompt.chat.messages", "in all"),
        (text(n=1_000_000), "n", "between 1 and 64, got 1,000,000"),
        (sampling(temperature=-0.5), "sampling.temperature", "between 0 and 2, got -0.5"),
        (sampling(temperature=math.nan), "sampling.temperature", "NaN"),
        (sampling(top_p=0.0), "sampling.top_p", "greater than 0"),
        (sampling(top_p=1.5), "sampling.top_p", "at most 1"),
        (sampling(top_k=5000), "sampling.top_k", "between 0 and 1,000"),
        (sampling(max_tokens=4096), "sampling.max_tokens", "between 1 and 2,048"),
        (sampling(stop=["x"] * 10_000), "sampling.stop", "at most 16 items, got 10,000"),
        (sampling(stop=[""]), "sampling.stop[0]", "must not be empty"),
        (sampling(stop=["y" * 129]), "sampling.stop[0]", "at most 128 characters"),
        (sampling(presence_penalty=3.0), "sampling.presence_penalty", "between -2 and 2"),
        (sampling(frequency_penalty=-2.5), "sampling.frequency_penalty", "between -2 and 2"),
        (sampling(grammar=""), "sampling.grammar", "must not be empty"),
        (sampling(grammar="root ::= " + '"x" ' * 5000), "sampling.grammar", "at most 16,384 characters"),
        (sampling(grammar='root := "x"'), "sampling.grammar", "line 1, column 6: expected ::="),
        (sampling(grammar='root ::= "x'), "sampling.grammar", "unexpected end of input"),
        (sampling(grammar="root ::= [a-z"), "sampling.grammar", "unexpected end of input"),
        (sampling(grammar='root ::= ("x" | "y"'), "sampling.grammar", "expected )"),
        (sampling(grammar='root ::= * "x"'), "sampling.grammar", "* needs an item before it"),
        (sampling(grammar='root ::= "\\q"'), "sampling.grammar", "unknown escape \\q"),
        (sampling(grammar='root ::= "x"{2'), "sampling.grammar", "expected } to close the repetition"),
        (sampling(grammar='expr ::= "x"'), "sampling.grammar", "defines no `root` rule"),
        (sampling(grammar="root ::= expr\n"), "sampling.grammar", "line 1, column 10: rule `expr` is used but never defined"),
        # A rule name at the very end of the input (this once looped forever).
        (sampling(grammar="root ::= digit"), "sampling.grammar", "line 1, column 10: rule `digit` is used but never defined"),
        (sampling(grammar="root"), "sampling.grammar", "line 1, column 5: expected ::="),
        (sampling(json_schema="{"), "sampling.json_schema", "at least 2 characters"),
        (sampling(json_schema="{'type': 1}"), "sampling.json_schema", "is not JSON"),
        (sampling(json_schema='["type"]'), "sampling.json_schema", "must be a JSON object (a schema), got a JSON list"),
        (sampling(json_schema="{}" + " " * 16_384), "sampling.json_schema", "at most 16,384 characters"),
    ],
)
def test_bad_requests_name_the_field_and_the_rule(request_, field, rule):
    with pytest.raises(InvalidArgument) as raised:
        parse(request_)
    assert raised.value.field == field
    assert rule in str(raised.value)
    assert str(raised.value).startswith(f"{field}: ")


def test_server_limit_on_n_is_applied():
    with pytest.raises(InvalidArgument, match="n: must be between 1 and 4"):
        parse_generate_request(text(n=5), MODEL, GeneratorLimits(max_samples=4))


GRAMMARS = [
    # llama.cpp's own grammars/arithmetic.gbnf and the shapes its parser accepts.
    'root  ::= (expr "=" ws term "\\n")+\nexpr  ::= term ([-+*/] term)*\nterm  ::= ident | num | "(" ws expr ")" ws\n'
    "ident ::= [a-z] [a-z0-9_]* ws\nnum   ::= [0-9]+ ws\nws    ::= [ \\t\\n]*\n",
    '# a comment\nroot ::= "a" (\n  "b" |   # alternatives may span lines in parentheses\n  "c"\n)? '
    '[^\\]\\x41-\\u00FF]{1,3} . x{2,}\nx ::= "\\"" | "\\\\"',
    'root ::= "Calculator(" [^)]* ")"',
]


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_well_formed_grammars_pass_to_the_backend(grammar):
    assert parse(sampling(grammar=grammar)).sampling.grammar == grammar


def test_a_json_schema_passes_to_the_backend_as_given():
    schema = '{"type": "object", "properties": {"answer": {"type": "integer"}}}'
    parsed = parse(sampling(json_schema=schema)).sampling
    assert (parsed.json_schema, parsed.grammar) == (schema, "")


def test_grammar_and_json_schema_are_one_of():
    params = common_pb2.SamplingParams(grammar='root ::= "x"')
    params.json_schema = "{}"
    assert params.WhichOneof("constraint") == "json_schema" and not params.grammar


def test_the_grammar_check_ends_on_any_input():
    """Random GBNF-ish text (fixed seed): every input is accepted or refused naming the field, never loops."""
    import random

    from autodidact.generator.grammar import check_grammar

    rng = random.Random(10)
    alphabet = ["root", " ::= ", "x", '"', "[", "]", "(", ")", "|", "*", "+", "?", "{", "}", ",", "1", "\\", "^", "-", ".", "#", "\n", " "]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))
        try:
            check_grammar("sampling.grammar", text)
        except InvalidArgument as error:
            assert error.field == "sampling.grammar"
