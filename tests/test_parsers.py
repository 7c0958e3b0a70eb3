"""Tests for stepflash.server.parsers: reasoning split, XML tool calls, streaming."""

from __future__ import annotations

import json
import random
import re
from itertools import pairwise
from typing import Any

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from stepflash.server.parsers import (
    Delta,
    ParsedOutput,
    StreamingParser,
    ToolCall,
    parse_output,
    parse_tool_calls,
    split_reasoning,
)
from stepflash.tokenizer import Tokenizer, default_chat_template

ID_RE = re.compile(r"call_[0-9a-f]{24}")


def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool.",
            "parameters": {"type": "object", "properties": properties},
        },
    }


TOOLS = [
    _tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
    _tool(
        "typed",
        {
            "text": {"type": "string"},
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean"},
            "options": {"type": "object"},
            "items": {"type": "array"},
            "note": {"type": ["string", "null"]},
        },
    ),
]


def call_xml(name: str, **arguments: Any) -> str:
    """A tool call as the chat template renders it."""
    params = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value)}\n"
        "</parameter>\n"
        for key, value in arguments.items()
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def raw_call(name: str, parameter: str, raw: str) -> str:
    """A one-parameter call whose value is written verbatim."""
    return call_xml(name, **{parameter: raw})


def signature(calls: list[ToolCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.arguments) for call in calls]


# --- reasoning ---------------------------------------------------------------------------


def test_reasoning_only_when_think_never_closes() -> None:
    assert split_reasoning("Thinking about it...\nstill") == ("Thinking about it...\nstill", "")
    parsed = parse_output("Thinking about it...", TOOLS)
    assert parsed == ParsedOutput("Thinking about it...", None, [])


def test_reasoning_and_content() -> None:
    text = "The user wants 2+2.\n</think>\nThe answer is 4."
    assert split_reasoning(text) == ("The user wants 2+2.\n", "The answer is 4.")
    assert parse_output(text, None) == ParsedOutput("The user wants 2+2.\n", "The answer is 4.", [])


def test_exactly_one_newline_after_think_end_is_dropped() -> None:
    assert split_reasoning("r</think>\n\nx") == ("r", "\nx")
    assert split_reasoning("r</think>x") == ("r", "x")
    assert split_reasoning("r</think> \nx") == ("r", " \nx")


def test_empty_parts_are_none() -> None:
    assert split_reasoning("</think>\nHi") == (None, "Hi")
    assert split_reasoning("") == (None, "")
    assert parse_output("", None) == ParsedOutput(None, None, [])
    assert parse_output("r\n</think>\n", None) == ParsedOutput("r\n", None, [])


def test_only_the_first_think_end_splits() -> None:
    assert split_reasoning("a</think>b</think>c") == ("a", "b</think>c")


def test_reasoning_disabled_keeps_everything_as_content() -> None:
    parsed = parse_output(
        "a</think>b\n" + call_xml("get_weather", city="Oslo"), TOOLS, reasoning=False
    )
    assert parsed.reasoning is None
    assert parsed.content == "a</think>b"
    assert signature(parsed.tool_calls) == [("get_weather", {"city": "Oslo"})]


def test_tool_call_inside_unfinished_reasoning_is_reasoning() -> None:
    text = "maybe " + call_xml("get_weather", city="Oslo")
    assert parse_output(text, TOOLS) == ParsedOutput(text, None, [])


# --- tool calls ----------------------------------------------------------------------------


def test_single_call() -> None:
    content, calls = parse_tool_calls(call_xml("get_weather", city="Paris", days=3), TOOLS)
    assert content is None
    assert signature(calls) == [("get_weather", {"city": "Paris", "days": 3})]
    assert ID_RE.fullmatch(calls[0].id)


def test_multiple_calls_with_text_before() -> None:
    text = "Let me check both.\n" + "\n".join(
        [call_xml("get_weather", city="Paris"), call_xml("get_weather", city="Rome", days=2)]
    )
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check both."
    assert signature(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome", "days": 2}),
    ]
    assert calls[0].id != calls[1].id


def test_text_after_and_between_calls_is_content() -> None:
    text = (
        "A\n"
        + call_xml("get_weather", city="X")
        + "\nB\n"
        + call_xml("get_weather", city="Y")
        + "\nC "
    )
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "A\n\nB\n\nC"
    assert [call.arguments["city"] for call in calls] == ["X", "Y"]


def test_full_output_with_reasoning_and_calls() -> None:
    text = "Need weather.\n</think>\nChecking.\n" + call_xml("get_weather", city="Oslo", days=1)
    parsed = parse_output(text, TOOLS)
    assert parsed.reasoning == "Need weather.\n"
    assert parsed.content == "Checking."
    assert signature(parsed.tool_calls) == [("get_weather", {"city": "Oslo", "days": 1})]


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("text", "  first line\n\n  indented\n", "  first line\n\n  indented\n"),
        ("text", "", ""),
        ("text", "123", "123"),
        ("text", '{"a": 1}', '{"a": 1}'),
        ("count", "42", 42),
        ("count", "-7", -7),
        ("ratio", "2.5", 2.5),
        ("ratio", "3", 3),
        ("flag", "true", True),
        ("flag", "false", False),
        ("options", '{"depth": 2, "tags": ["a", null]}', {"depth": 2, "tags": ["a", None]}),
        ("items", '[1, "two", {"three": 3.0}]', [1, "two", {"three": 3.0}]),
        ("count", "null", None),
        ("options", "null", None),
        ("note", "null", None),
        ("note", "a note", "a note"),
    ],
)
def test_schema_conversion(name: str, raw: str, expected: Any) -> None:
    text = raw_call("typed", name, raw)
    _, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1
    value = calls[0].arguments[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"k": [1]}', {"k": [1]}),
        ("7", 7),
        ("true", True),
        ("plain words", "plain words"),
        ("null", None),
    ],
)
def test_parameter_absent_from_schema_tries_json(raw: str, expected: Any) -> None:
    text = call_xml("get_weather", city="Oslo", extra=raw)
    _, calls = parse_tool_calls(text, TOOLS)
    assert calls[0].arguments == {"city": "Oslo", "extra": expected}


def test_without_tools_any_function_is_accepted_and_values_try_json() -> None:
    _, calls = parse_tool_calls(call_xml("anything", n="5", s="five"), None)
    assert signature(calls) == [("anything", {"n": 5, "s": "five"})]


def test_missing_function_end_is_tolerated() -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</tool_call>"
    assert signature(parse_tool_calls(text, TOOLS)[1]) == [("get_weather", {"city": "Oslo"})]


def test_call_without_parameters() -> None:
    text = "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>"
    assert signature(parse_tool_calls(text, TOOLS)[1]) == [("get_weather", {})]


def test_to_openai() -> None:
    call = ToolCall("call_" + "0" * 24, "get_weather", {"city": "Zürich", "days": None})
    entry = call.to_openai()
    assert entry == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": null}'},
    }
    assert call.to_openai(index=2)["index"] == 2


# --- malformed markup ------------------------------------------------------------------------

UNCLOSED_CALL = "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"
UNCLOSED_PARAMETER = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>"
)
UNKNOWN_FUNCTION = call_xml("launch_rockets", count=3)
NO_FUNCTION = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
GARBAGE_BETWEEN = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
    "oops\n</function>\n</tool_call>"
)
EMPTY_NAME = "<tool_call>\n<function=>\n</function>\n</tool_call>"


@pytest.mark.parametrize(
    "text",
    [UNCLOSED_CALL, UNCLOSED_PARAMETER, UNKNOWN_FUNCTION, NO_FUNCTION, GARBAGE_BETWEEN, EMPTY_NAME],
)
def test_malformed_call_stays_in_content(text: str) -> None:
    assert parse_tool_calls(text, TOOLS) == (text.strip(), [])


def test_unknown_function_is_parsed_without_tools() -> None:
    assert signature(parse_tool_calls(UNKNOWN_FUNCTION, None)[1]) == [
        ("launch_rockets", {"count": 3})
    ]


def test_malformed_call_between_good_ones_keeps_order() -> None:
    good = call_xml("get_weather", city="Oslo")
    content, calls = parse_tool_calls(
        f"{good}\n{NO_FUNCTION}\n{good}\n<tool_call>\n<function=get_", TOOLS
    )
    assert content == f"{NO_FUNCTION}\n\n<tool_call>\n<function=get_"
    assert signature(calls) == [("get_weather", {"city": "Oslo"})] * 2


@pytest.mark.parametrize(
    ("name", "raw"),
    [("count", "three"), ("count", "4 apples"), ("options", "{bad"), ("flag", "True")],
)
def test_unparseable_typed_value_keeps_raw_string(name: str, raw: str) -> None:
    text = raw_call("typed", name, raw)
    assert parse_tool_calls(text, TOOLS)[1][0].arguments == {name: raw}


def test_absurdly_nested_json_does_not_raise() -> None:
    raw = "[" * 100_000
    text = raw_call("typed", "items", raw)
    assert parse_tool_calls(text, TOOLS)[1][0].arguments == {"items": raw}


# --- round trip through the chat template ---------------------------------------------------

_TEMPLATE_TOKENIZER = Tokenizer(
    tokenizers.Tokenizer(tokenizers.models.BPE()), default_chat_template(), {"bos_token": ""}
)
_ASSISTANT_OPEN = "<|im_start|>assistant\n<think>\n"


def render_assistant(reasoning: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The text the model generates for this assistant turn, as the template renders it."""
    tool_calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for i, (name, args) in enumerate(calls)
    ]
    message = {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": tool_calls,
    }
    prompt = _TEMPLATE_TOKENIZER.apply_chat_template(
        [{"role": "user", "content": "hi"}, message], tools=TOOLS, add_generation_prompt=False
    )
    start = prompt.index(_ASSISTANT_OPEN) + len(_ASSISTANT_OPEN)
    return prompt[start : prompt.index("<|im_end|>", start)]


def test_template_round_trip() -> None:
    calls = [
        ("get_weather", {"city": "New\nYork", "days": 5}),
        (
            "typed",
            {
                "text": "\nlead and trail\n",
                "ratio": 0.1,
                "flag": False,
                "options": {"x": [1]},
                "items": [],
            },
        ),
    ]
    text = render_assistant("Two calls.", "On it.", calls)
    parsed = parse_output(text, TOOLS)
    assert parsed.reasoning == "Two calls.\n"
    assert parsed.content == "On it."
    assert signature(parsed.tool_calls) == calls


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
# Strings without "<" cannot contain markup; "null" is reserved for None.
_PLAIN_TEXT = st.text(st.characters(exclude_characters="<", exclude_categories=("Cs",))).filter(
    lambda s: s != "null"
)


@settings(max_examples=150, deadline=None)
@given(
    text=_PLAIN_TEXT,
    count=st.integers(),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    flag=st.booleans(),
    options=st.dictionaries(st.text(max_size=5), _JSON, max_size=3),
    items=st.lists(_JSON, max_size=3),
    note=st.none() | _PLAIN_TEXT,
)
def test_template_round_trip_property(
    text: str, count: int, ratio: float, flag: bool, options: dict, items: list, note: str | None
) -> None:
    arguments = {
        "text": text,
        "count": count,
        "ratio": ratio,
        "flag": flag,
        "options": options,
        "items": items,
        "note": note,
    }
    parsed = parse_output(render_assistant("r", "", [("typed", arguments)]), TOOLS)
    assert signature(parsed.tool_calls) == [("typed", arguments)]


# --- streaming ------------------------------------------------------------------------------


def stream(
    chunks: list[str], tools: list[dict] | None = TOOLS, reasoning: bool = True
) -> list[Delta]:
    parser = StreamingParser(tools, reasoning=reasoning)
    deltas = [delta for chunk in chunks for delta in parser.feed(chunk)] + parser.finish()
    for delta in deltas:
        assert delta.reasoning != "" and delta.content != ""
        assert sum(x is not None for x in (delta.reasoning, delta.content, delta.tool_call)) == 1
    return deltas


def assert_stream_matches(
    text: str, chunks: list[str], tools: list[dict] | None = TOOLS, reasoning: bool = True
) -> None:
    assert "".join(chunks) == text
    deltas = stream(chunks, tools, reasoning)
    expected = parse_output(text, tools, reasoning)
    assert "".join(d.reasoning for d in deltas if d.reasoning) == (expected.reasoning or "")
    assert "".join(d.content for d in deltas if d.content) == (expected.content or "")
    calls = [d for d in deltas if d.tool_call is not None]
    assert signature([d.tool_call for d in calls]) == signature(expected.tool_calls)
    assert [d.index for d in calls] == list(range(len(calls)))


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


SAMPLES = [
    "",
    "just thinking, never closed </thi",
    "Thinking.\n</think>\nThe answer is 4.\n",
    "</think>\n\n  spaced   content  \n\n",
    "a < b </ c </think>x <tool <tool_ca <tool_call",
    "Plan: call it.\n</think>\nChecking.\n" + call_xml("get_weather", city="Paris", days=3),
    "r</think>\n" + "\n".join(call_xml("get_weather", city=c) for c in ("A", "B", "C")) + "\nDone.",
    "r</think>"
    + call_xml("typed", text="x\n</tool_c\n", count="nope", options={"a": [1, None]}, extra="[1]"),
    "r</think>\n" + UNCLOSED_CALL,
    "r</think>\n" + UNCLOSED_PARAMETER + "\n" + call_xml("get_weather", city="Oslo"),
    "r</think>\n" + UNKNOWN_FUNCTION + NO_FUNCTION + GARBAGE_BETWEEN + EMPTY_NAME,
    "r</think>"
    + call_xml("get_weather", city="Oslo")
    + "<tool_call><tool_call>"
    + call_xml("get_weather"),
    "no reasoning at all " + call_xml("get_weather", city="Oslo") + " </think> tail",
]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("reasoning", [True, False])
def test_streaming_every_two_way_split(text: str, reasoning: bool) -> None:
    for cut in range(len(text) + 1):
        assert_stream_matches(text, split_at(text, [cut]), reasoning=reasoning)


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_one_character_at_a_time(text: str) -> None:
    assert_stream_matches(text, list(text))


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_streaming_seeded_random_splits(tools: list[dict] | None) -> None:
    rng = random.Random(1234)
    for text in SAMPLES:
        for _ in range(50):
            cuts = rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 12)))
            assert_stream_matches(text, split_at(text, cuts), tools)


_FRAGMENTS = [
    "</think>", "<tool_call>", "</tool_call>", "<function=get_weather>", "<function=nope>",
    "<parameter=city>", "<parameter=days>", "</parameter>", "</function>", "\n", " ", "Paris", "7",
    "<", "</", "</thi", "<tool_", "</tool_ca", "x",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    pieces=st.lists(st.sampled_from(_FRAGMENTS), max_size=30),
    reasoning=st.booleans(),
)
def test_streaming_matches_batch_on_fuzzed_markup(
    data: st.DataObject, pieces: list[str], reasoning: bool
) -> None:
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert_stream_matches(text, split_at(text, cuts), reasoning=reasoning)


def test_streaming_is_incremental_and_holds_partial_tags() -> None:
    parser = StreamingParser(TOOLS)
    assert parser.feed("Let me think") == [Delta(reasoning="Let me think")]
    assert parser.feed(" more </th") == [Delta(reasoning=" more ")]
    assert parser.feed("ink>") == []
    assert parser.feed("\nHello <tool") == [Delta(content="Hello")]
    assert parser.feed("box> and <tool_c") == [Delta(content=" <toolbox> and")]
    assert (
        parser.feed(
            "all>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call"
        )
        == []
    )
    call, after = parser.feed(">\nafter ")
    assert call.index == 0 and signature([call.tool_call]) == [("get_weather", {"city": "Oslo"})]
    assert after == Delta(content=" \nafter")
    assert parser.finish() == []


def test_streaming_partial_tag_that_is_not_a_tag_is_released() -> None:
    parser = StreamingParser(None)
    assert parser.feed("a </") == [Delta(reasoning="a ")]
    assert parser.feed("b>") == [Delta(reasoning="</b>")]


def test_finish_flushes_held_text_and_degrades_unclosed_call() -> None:
    parser = StreamingParser(TOOLS)
    assert parser.feed("r</th") == [Delta(reasoning="r")]
    assert parser.finish() == [Delta(reasoning="</th")]

    parser = StreamingParser(TOOLS)
    deltas = parser.feed(
        "r</think>\nok\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"
    )
    assert deltas == [Delta(reasoning="r"), Delta(content="ok")]
    assert parser.finish() == [
        Delta(content="\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis")
    ]


def test_streaming_call_indices_count_up() -> None:
    text = (
        "r</think>"
        + call_xml("get_weather", city="A")
        + NO_FUNCTION
        + call_xml("get_weather", city="B")
    )
    deltas = stream(list(text))
    calls = [d for d in deltas if d.tool_call is not None]
    assert [(d.index, d.tool_call.arguments["city"]) for d in calls] == [(0, "A"), (1, "B")]
    assert all(ID_RE.fullmatch(d.tool_call.id) for d in calls)
