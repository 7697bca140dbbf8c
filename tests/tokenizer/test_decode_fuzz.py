"""Parsing model output never raises: random text, random ids, and broken pieces of real tool calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.tokenizer import ChatFormat, TemplateChatFormat

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces of every call form the parsers look for, to be cut and shuffled into near-calls.
FRAGMENTS = [
    "<|python_tag|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "brave_search",
    "wolfram_alpha",
    "photogen",
    "code_interpreter",
    ".call(",
    "query=",
    '"',
    "'",
    ")",
    "<function=",
    "get_weather",
    ">",
    "</function>",
    "{",
    "}",
    '{"name": ',
    '"parameters": ',
    '"type": "function"',
    "[",
    "]",
    "(",
    "=",
    ", ",
    "city",
    "1",
    "None",
    "True",
    "1e309",
    "\\",
    "\n",
    " ",
    "**kw",
    "lambda: 0",
    "\x00",
    "\ud800",
    "😀",
]
WELL_FORMED = [
    '<|python_tag|>brave_search.call(query="gold price")<|eom_id|>',
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
    '<function=get_weather>{"city": "Paris", "days": [1, 2]}</function><|eot_id|>',
    '[get_weather(city="Paris", days=[1, 2]), get_time(zone="CET")]',
]

near_calls = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    st.tuples(st.sampled_from(WELL_FORMED), st.integers(0, 80), st.integers(0, 80)).map(
        lambda t: t[0][t[1] : t[1] + t[2]]
    ),
    st.tuples(st.sampled_from(WELL_FORMED), st.integers(0, 80), st.text(max_size=5)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
)


def reject(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def check_message(message: dict) -> None:
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    assert message["stop_reason"] in ("end_of_turn", "end_of_message", "out_of_tokens")
    for found in message["tool_calls"]:
        assert isinstance(found["function"]["name"], str)
        assert isinstance(json.loads(found["function"]["arguments"], parse_constant=reject), dict)
    if message["tool_calls"]:
        # Text before <|python_tag|> is the turn's content; the tag and the call never leak into it.
        assert "<|python_tag|>" not in message["content"]


@pytest.fixture(scope="module")
def llama_fmt(tokenizer):
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def chatml_fmt(smollm2):
    return TemplateChatFormat(smollm2)


@FUZZ
@given(text=st.one_of(st.text(), near_calls))
def test_llama_decode_never_raises_on_text(llama_fmt, text):
    check_message(llama_fmt.decode_assistant(text))


@FUZZ
@given(ids=st.lists(st.one_of(st.integers(0, 128255), st.sampled_from([128008, 128009, 128010])), max_size=60))
def test_llama_decode_never_raises_on_ids(llama_fmt, ids):
    check_message(llama_fmt.decode_assistant(ids))


@FUZZ
@given(text=st.one_of(st.text(), near_calls))
def test_template_decode_never_raises(chatml_fmt, text):
    check_message(chatml_fmt.decode_assistant(text))
    ids = chatml_fmt.tokenizer.encode(text, bos=False, allowed_special="all")
    check_message(chatml_fmt.decode_assistant(ids))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        '{"a": ' * 100_000,
        "<function=f>" + '{"a": ' * 100_000,
        "[f(x=" + "[" * 100_000 + ")]",
        "<|python_tag|>" + "(" * 10_000,
    ],
)
def test_deep_nesting_is_not_a_crash(llama_fmt, chatml_fmt, text):
    check_message(llama_fmt.decode_assistant(text))
    check_message(chatml_fmt.decode_assistant(text))


@pytest.mark.parametrize(
    "text", ["[f(x=1e999)]", '{"name": "f", "parameters": {"x": NaN}}', '<function=f>{"x": -Infinity}']
)
def test_arguments_json_cannot_carry_stay_content(llama_fmt, text):
    message = llama_fmt.decode_assistant(text)
    assert message["tool_calls"] == [] and message["content"] == text


def test_the_well_formed_ones_parse(llama_fmt):
    assert all(llama_fmt.decode_assistant(text)["tool_calls"] for text in WELL_FORMED)
