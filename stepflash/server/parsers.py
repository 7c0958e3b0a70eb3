"""Split Step-3.5-Flash output into reasoning, content and OpenAI tool calls.

The generation prompt ends with ``<think>\\n``, so generated text starts inside the
reasoning and closes it with ``</think>``. Tool calls follow as Qwen3-Coder-style XML::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Conventions shared by `parse_output` and `StreamingParser` (the streaming parser gives the
same result however the text is split into deltas):

* Reasoning is everything before the first ``</think>``, unstripped.
* Content is the rest minus the parsed tool calls, stripped of leading and trailing
  whitespace as a whole (so the newline after ``</think>`` and between calls goes away).
* Empty reasoning or content is ``None`` in `ParsedOutput`; streaming never emits "".
* Malformed markup never raises: a ``<tool_call>`` block that does not parse, or one that
  is never closed, stays in the content verbatim.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from stepflash.engine.output import partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# A block is one function with zero or more parameters; a missing </function> is tolerated
# because </tool_call> already delimits the block unambiguously.
_FUNCTION_RE = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?\Z", re.DOTALL)
_PARAMETER_RE = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)

Schemas = dict[str, dict[str, Any]]
"""Function name -> the JSON schemas of its parameters (``parameters.properties``)."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry; pass ``index`` for a streaming chunk."""
        entry: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }
        if index is not None:
            entry["index"] = index
        return entry


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class Delta:
    """One streaming event: reasoning text, content text, or a whole tool call."""

    reasoning: str | None = None
    content: str | None = None
    tool_call: ToolCall | None = None
    index: int | None = None  # position of `tool_call` among this output's calls


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split finished output into (reasoning, content).

    ``<think>`` is part of the prompt, so everything before the first ``</think>`` is
    reasoning (None when empty) and one newline right after it is dropped. Without
    ``</think>`` the model never left its reasoning (e.g. it hit the length limit), so the
    whole text is reasoning and the content is "".
    """
    end = text.find(THINK_END)
    if end == -1:
        return text or None, ""
    content = text[end + len(THINK_END) :]
    return text[:end] or None, content[1:] if content.startswith("\n") else content


def parse_tool_calls(text: str, tools: list[dict] | None) -> tuple[str | None, list[ToolCall]]:
    """Extract the XML tool calls of `text`; returns (content, calls).

    With `tools` given, calls to functions not among them stay in the content; argument
    values are converted by each tool's parameter schemas (see `_convert_value`).
    """
    schemas = _tool_schemas(tools)
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        end = text.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
        if end == -1:
            break
        end += len(TOOL_CALL_END)
        content.append(text[pos:start])
        call = _parse_block(text[start:end], schemas)
        if call is None:
            content.append(text[start:end])
        else:
            calls.append(call)
        pos = end
    content.append(text[pos:])
    return "".join(content).strip() or None, calls


def parse_output(text: str, tools: list[dict] | None, reasoning: bool = True) -> ParsedOutput:
    """Parse finished output; with ``reasoning=False`` all text is content."""
    thought, rest = split_reasoning(text) if reasoning else (None, text)
    content, calls = parse_tool_calls(rest, tools)
    return ParsedOutput(thought, content, calls)


class StreamingParser:
    """Incremental `parse_output`: feed text deltas, get reasoning/content/tool-call deltas.

    Text that could be the start of ``</think>`` or ``<tool_call>`` is held back until the
    next delta decides it, a tool call is held until its ``</tool_call>`` arrives, and
    content whitespace is held until non-whitespace follows, so that the concatenated
    deltas equal the stripped content of `parse_output`. Call `finish` at the end.
    """

    def __init__(self, tools: list[dict] | None, reasoning: bool = True) -> None:
        self._schemas = _tool_schemas(tools)
        self._in_reasoning = reasoning
        self._in_call = False
        self._buffer = ""
        self._content_started = False
        self._pending_whitespace = ""
        self._num_calls = 0

    def feed(self, delta: str) -> list[Delta]:
        self._buffer += delta
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """Flush held-back text; an unclosed ``<tool_call>`` becomes content."""
        out: list[Delta] = []
        text, self._buffer = self._buffer, ""
        if self._in_reasoning:
            self._emit_reasoning(out, text)
        else:
            self._emit_content(out, text)
        self._in_call = False
        self._pending_whitespace = ""
        return out

    def _step(self, out: list[Delta]) -> bool:
        """Consume what the buffer decides; True when another step may make progress."""
        if self._in_reasoning:
            return self._step_reasoning(out)
        if self._in_call:
            return self._step_call(out)
        return self._step_content(out)

    def _step_reasoning(self, out: list[Delta]) -> bool:
        end = self._buffer.find(THINK_END)
        if end == -1:
            self._emit_reasoning(out, self._release(THINK_END))
            return False
        self._emit_reasoning(out, self._buffer[:end])
        self._buffer = self._buffer[end + len(THINK_END) :]
        self._in_reasoning = False
        return True

    def _step_content(self, out: list[Delta]) -> bool:
        start = self._buffer.find(TOOL_CALL_START)
        if start == -1:
            self._emit_content(out, self._release(TOOL_CALL_START))
            return False
        self._emit_content(out, self._buffer[:start])
        self._buffer = self._buffer[start:]
        self._in_call = True
        return True

    def _step_call(self, out: list[Delta]) -> bool:
        end = self._buffer.find(TOOL_CALL_END, len(TOOL_CALL_START))
        if end == -1:
            return False
        end += len(TOOL_CALL_END)
        block, self._buffer = self._buffer[:end], self._buffer[end:]
        self._in_call = False
        call = _parse_block(block, self._schemas)
        if call is None:
            self._emit_content(out, block)
        else:
            out.append(Delta(tool_call=call, index=self._num_calls))
            self._num_calls += 1
        return True

    def _release(self, tag: str) -> str:
        """Take the buffer except a trailing partial `tag`, which stays buffered."""
        keep = partial_suffix(self._buffer, [tag])
        cut = len(self._buffer) - keep
        text, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return text

    def _emit_reasoning(self, out: list[Delta], text: str) -> None:
        if text:
            out.append(Delta(reasoning=text))

    def _emit_content(self, out: list[Delta], text: str) -> None:
        """Emit content with leading whitespace dropped and trailing whitespace deferred."""
        if not self._content_started:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            out.append(Delta(content=self._pending_whitespace + body))
            self._pending_whitespace = ""
            self._content_started = True
        self._pending_whitespace += text[len(body) :]


def _tool_schemas(tools: list[dict] | None) -> Schemas | None:
    if tools is None:
        return None
    schemas: Schemas = {}
    for tool in tools:
        function = tool.get("function") or {}
        if isinstance(function.get("name"), str):
            parameters = function.get("parameters") or {}
            schemas[function["name"]] = parameters.get("properties") or {}
    return schemas


def _parse_block(block: str, schemas: Schemas | None) -> ToolCall | None:
    """Parse ``<tool_call>...</tool_call>``; None when malformed or the function is unknown."""
    inner = block[len(TOOL_CALL_START) : -len(TOOL_CALL_END)]
    function = _FUNCTION_RE.match(inner)
    if function is None:
        return None
    name = function.group(1).strip()
    if not name or (schemas is not None and name not in schemas):
        return None
    properties = schemas[name] if schemas is not None else {}
    arguments = _parse_parameters(function.group(2), properties)
    return None if arguments is None else ToolCall(new_tool_call_id(), name, arguments)


def _parse_parameters(body: str, properties: dict[str, Any]) -> dict[str, Any] | None:
    """Parse consecutive ``<parameter=...>`` blocks; None if anything else is left over."""
    arguments: dict[str, Any] = {}
    pos = 0
    while (match := _PARAMETER_RE.match(body, pos)) is not None:
        name = match.group(1).strip()
        arguments[name] = _convert_value(_strip_one_newline(match.group(2)), properties.get(name))
        pos = match.end()
    return arguments if not body[pos:].strip() else None


def _strip_one_newline(value: str) -> str:
    """The template wraps every value in exactly one newline on each side."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _convert_value(raw: str, schema: Any) -> Any:
    """Convert a raw value by its schema.

    The template writes strings verbatim and everything else as JSON, so ``null`` is None
    for every type, a string-typed value stays raw, and any other value (typed or not in
    the schema) is parsed as JSON, keeping the raw string when that fails.
    """
    if raw == "null":
        return None
    if _allows_string(schema):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return raw


def _allows_string(schema: Any) -> bool:
    """Whether a property schema (None when absent; may be a bare boolean) admits strings."""
    if not isinstance(schema, dict):
        return False
    declared = schema.get("type")
    return declared == "string" or (isinstance(declared, list) and "string" in declared)
