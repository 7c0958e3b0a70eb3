"""Tests for stepflash.tokenizer and the packaged Step-3.5 chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from checkpoints import write_byte_level_tokenizer
from stepflash.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    default_chat_template,
)

VOCAB_SIZE = 400
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"
MULTI_BYTE_TEXT = "Grüße 😀 from 東京! 🚀✨ naïve café, 中文测试 ok"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web – returns snippets.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


def _call(name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS: dict[str, dict[str, Any]] = {
    "system_user": {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello there 👋"},
        ],
    },
    "multi_turn_reasoning": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "OLD-REASONING simple sum"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "\nNEW-REASONING add three\n"},
        ],
    },
    "reasoning_alias": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning": "ALIASED greet back"},
        ],
        "add_generation_prompt": False,
    },
    "tools_without_system": {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL, SEARCH_TOOL],
    },
    "tools_with_system": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "tools": [WEATHER_TOOL],
    },
    "tool_calls_and_results": {
        "messages": [
            {"role": "user", "content": "Weather in Paris and news about it?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "reasoning_content": "Need two tools.",
                "tool_calls": [
                    _call("get_weather", {"city": "Paris", "days": 3, "metric": True}),
                    _call("search", {"query": "Paris news", "filters": {"lang": "fr", "max": 5}}),
                ],
            },
            {"role": "tool", "content": "Sunny, 25°C"},
            {"role": "tool", "content": "Nothing new."},
            {"role": "assistant", "content": "Sunny and quiet.", "reasoning_content": "Summarize."},
        ],
        "tools": [WEATHER_TOOL, SEARCH_TOOL],
    },
    "tool_call_without_content": {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "Oslo"})]},
            {"role": "tool", "content": "Snow"},
        ],
        "tools": [WEATHER_TOOL],
    },
    "no_generation_prompt": {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi"},
        ],
        "add_generation_prompt": False,
    },
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    write_byte_level_tokenizer(path, VOCAB_SIZE)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _render(tokenizer: Tokenizer, case: dict[str, Any]) -> str:
    return tokenizer.apply_chat_template(
        case["messages"],
        tools=case.get("tools"),
        add_generation_prompt=case.get("add_generation_prompt", True),
    )


@pytest.mark.parametrize("text", ["Hello, world! def f(x): return x", MULTI_BYTE_TEXT, ""])
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("special", [False, True])
def test_encode_unlocked_equals_encode(tokenizer: Tokenizer, special: bool) -> None:
    text = ("Hello, world! def f(x): return x\n" + MULTI_BYTE_TEXT) * 50
    assert tokenizer.encode_unlocked(text, special) == tokenizer.encode(text, special)


def test_add_special_tokens_prepends_bos(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hi", add_special_tokens=True)
    assert ids[0] == tokenizer.bos_token_id == 0
    assert ids[1:] == tokenizer.encode("hi")


def test_special_tokens_are_single_ids(tokenizer: Tokenizer) -> None:
    expected = [
        "<|begin_of_sentence|>",
        "<|end_of_sentence|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
    ]
    for token_id, token in enumerate(expected):
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.id_to_token(token_id) == token
    assert tokenizer.eos_token_ids == [1, 3]
    ids = tokenizer.encode("a<tool_call>\n<function=f>")
    assert ids[1] == tokenizer.token_to_id("<tool_call>")


def test_markup_tokens_survive_skip_special_tokens(tokenizer: Tokenizer) -> None:
    text = "<|im_start|>assistant\n<think>\nr\n</think>\n<tool_call>x</tool_call><|im_end|>"
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == "assistant\n<think>\nr\n</think>\n<tool_call>x</tool_call>"


def test_vocab_size_limits(tmp_path: Path, tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size <= VOCAB_SIZE
    with pytest.raises(ValueError, match="too small"):
        write_byte_level_tokenizer(tmp_path, 100)


def test_writer_is_deterministic(tmp_path: Path, model_dir: Path) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes()


def test_generation_config_eos_ids_are_added(tmp_path: Path) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [7, 1, 3]


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_template_errors_are_value_errors(tmp_path: Path) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE, chat_template="{% for m in messages %}")
    broken = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chat template error"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_overrides_config(tmp_path: Path) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}FILE")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "<|begin_of_sentence|>FILE"


def _feed_one_by_one(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.feed(token_id) for token_id in ids]
    return [*deltas, detokenizer.flush()]


def test_incremental_detokenizer_streams_multi_byte_text(tokenizer: Tokenizer) -> None:
    text = f"<think>\n{MULTI_BYTE_TEXT}\n</think>\n{MULTI_BYTE_TEXT}<|im_end|>"
    ids = tokenizer.encode(text)
    # The test only means something if some tokens hold partial characters.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)
    deltas = _feed_one_by_one(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas[-1] == ""


def test_incremental_detokenizer_accepts_chunks(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTI_BYTE_TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.feed(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) + detokenizer.flush() == MULTI_BYTE_TEXT
    assert detokenizer.token_ids == ids


def test_incremental_detokenizer_flushes_partial_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀")[:-1]
    deltas = _feed_one_by_one(tokenizer, ids)
    assert not any("\ufffd" in delta for delta in deltas[:-1])
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith("\ufffd")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer: Any, name: str) -> None:
    case = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        case["messages"],
        tools=case.get("tools"),
        tokenize=False,
        add_generation_prompt=case.get("add_generation_prompt", True),
    )
    assert _render(tokenizer, case) == expected


def test_hf_tokenizer_matches_encode_decode(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    prompt = _render(tokenizer, CONVERSATIONS["tool_calls_and_results"])
    ids = tokenizer.encode(prompt)
    assert ids == hf_tokenizer.encode(prompt, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids) == prompt


def test_system_user_structure(tokenizer: Tokenizer) -> None:
    rendered = _render(tokenizer, CONVERSATIONS["system_user"])
    assert rendered == (
        "<|begin_of_sentence|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello there 👋<|im_end|>\n" + GENERATION_PROMPT
    )


def test_reasoning_kept_only_after_last_user(tokenizer: Tokenizer) -> None:
    rendered = _render(tokenizer, CONVERSATIONS["multi_turn_reasoning"])
    assert "OLD-REASONING" not in rendered
    assert "<|im_start|>assistant\n4<|im_end|>\n" in rendered
    assert "<|im_start|>assistant\n<think>\nNEW-REASONING add three\n</think>\n6<|im_end|>\n" in rendered
    assert rendered.endswith(GENERATION_PROMPT)
    aliased = _render(tokenizer, CONVERSATIONS["reasoning_alias"])
    assert aliased.endswith("<think>\nALIASED greet back\n</think>\nHello!<|im_end|>\n")


def test_tools_section_structure(tokenizer: Tokenizer) -> None:
    with_system = _render(tokenizer, CONVERSATIONS["tools_with_system"])
    assert with_system.startswith("<|begin_of_sentence|><|im_start|>system\nBe brief.\n\n# Tools\n")
    assert with_system.count("<|im_start|>system") == 1
    assert f"<tools>\n{json.dumps(WEATHER_TOOL, ensure_ascii=False)}\n</tools>" in with_system
    without_system = _render(tokenizer, CONVERSATIONS["tools_without_system"])
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in (WEATHER_TOOL, SEARCH_TOOL))
    assert without_system.startswith("<|begin_of_sentence|><|im_start|>system\n# Tools\n")
    assert f"<tools>\n{schemas}\n</tools>" in without_system
    assert "–" in without_system  # non-ASCII stays raw, as with transformers' tojson


def test_tool_call_and_result_structure(tokenizer: Tokenizer) -> None:
    rendered = _render(tokenizer, CONVERSATIONS["tool_calls_and_results"])
    expected_turn = (
        "<|im_start|>assistant\n<think>\nNeed two tools.\n</think>\nLet me check both.\n"
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n"
        "<parameter=metric>\ntrue\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=search>\n"
        "<parameter=query>\nParis news\n</parameter>\n"
        '<parameter=filters>\n{"lang": "fr", "max": 5}\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
    )
    assert expected_turn in rendered
    expected_results = (
        "<|im_start|>tool_response\n<tool_response>\nSunny, 25°C\n</tool_response>\n"
        "<tool_response>\nNothing new.\n</tool_response><|im_end|>\n"
    )
    assert expected_results in rendered
    assert rendered.count("<|im_start|>tool_response") == 1


def test_tool_call_without_content(tokenizer: Tokenizer) -> None:
    rendered = _render(tokenizer, CONVERSATIONS["tool_call_without_content"])
    assert "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n" in rendered
    assert "<|im_start|>tool_response\n<tool_response>\nSnow\n</tool_response><|im_end|>\n" in rendered


def test_no_generation_prompt(tokenizer: Tokenizer) -> None:
    rendered = _render(tokenizer, CONVERSATIONS["no_generation_prompt"])
    assert rendered.endswith("<|im_start|>assistant\nhi<|im_end|>\n")
    assert "<think>" not in rendered


def test_json_string_arguments_render_like_mappings(tokenizer: Tokenizer) -> None:
    arguments = {"city": "Paris", "days": 2}
    as_mapping = [{"role": "assistant", "tool_calls": [_call("get_weather", arguments)]}]
    as_string = [{"role": "assistant", "tool_calls": [_call("get_weather", json.dumps(arguments))]}]
    assert tokenizer.apply_chat_template(as_string) == tokenizer.apply_chat_template(as_mapping)
    bad = [{"role": "assistant", "tool_calls": [_call("get_weather", "[1, 2]")]}]
    with pytest.raises(ValueError, match="JSON object"):
        tokenizer.apply_chat_template(bad)


def test_default_template_is_written(model_dir: Path) -> None:
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == default_chat_template()
    assert config["bos_token"] == "<|begin_of_sentence|>"
    assert config["eos_token"] == "<|end_of_sentence|>"
