"""The Responses API (`POST /v1/responses`) over the chat path: a request's input items become chat
messages, and the parsed reply becomes output items (reasoning, message, function calls), whole or
as the Responses streaming events.

stepflash keeps no responses (`store` is ignored), so `previous_response_id` is refused: clients
resend the conversation as input items, as the Agents SDK and LangChain do by default.
"""

import itertools
import json
import uuid
from typing import Any

from pydantic import ValidationError

from stepflash.server.parsers import Delta, ParsedOutput, ToolCall
from stepflash.server.protocol import RESPONSE_FORMATS, ApiError, ChatCompletionRequest, ResponsesRequest

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal")


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that serves a Responses request (its checks then apply unchanged)."""
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id is not supported: this server stores no responses; send the "
                       "conversation as input items", param="previous_response_id")
    fields: dict[str, Any] = {
        "model": body.model, "messages": _messages(body), "temperature": body.temperature, "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens, "parallel_tool_calls": body.parallel_tool_calls,
        "chat_template_kwargs": body.chat_template_kwargs, "stream": body.stream,
        "reasoning_effort": (body.reasoning or {}).get("effort"), "response_format": _response_format(body.text),
    }
    if body.tools:
        fields["tools"] = [_tool(i, t) for i, t in enumerate(body.tools)]
    if isinstance(body.tool_choice, dict):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.get("name")}}
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    try:  # fields not given keep the chat request's defaults
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Input items as chat messages. Consecutive assistant-side items (reasoning, an assistant
    message, function calls) make one assistant turn, as the model produced them."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input

    def assistant() -> dict[str, Any]:
        if not messages or messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": None})
        return messages[-1]

    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role, content = item.get("role"), _content(item.get("content"), f"input.{i}.content")
            if role == "assistant":
                turn = assistant()
                turn["content"] = (turn["content"] or "") + content if isinstance(content, str) else content
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            assistant().setdefault("tool_calls", []).append(
                {"id": item.get("call_id"), "type": "function",
                 "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}})
        elif kind == "function_call_output":
            output = _content(item.get("output"), f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _joined(output)})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            turn = assistant()
            turn["reasoning_content"] = (turn.get("reasoning_content") or "") + _joined(_content(parts, f"input.{i}"))
        else:
            raise ApiError(400, f"input.{i}: input items of type {kind!r} are not supported", param=f"input.{i}.type")
    return messages


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A string stays one; parts become chat parts: text kinds become "text", an input_image an
    image_url part, others keep their type so the content-part check names them (audio, ...)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"{where}: must be a string or a list of content parts", param=where)
    return [_part(p, f"{where}.{j}") for j, p in enumerate(content)]


def _part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise ApiError(400, f"{where}: an input_image needs image_url (a data: URL); file_id is not supported: "
                           "this server keeps no files", param=f"{where}.image_url")
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail")}}
    return {"type": kind}


def _joined(parts: str | list[dict[str, Any]]) -> str:
    return parts if isinstance(parts, str) else "".join(p.get("text") or "" for p in parts)


def _tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise ApiError(400, f"tools.{i}: tools of type {tool.get('type')!r} are not supported (function tools "
                       "only)", param=f"tools.{i}.type")
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as the chat path's `response_format` (a json_schema's fields move under `json_schema`)."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") not in RESPONSE_FORMATS:
        raise ApiError(400, f"text.format type {fmt.get('type')!r} is not supported; use one of "
                       f"{', '.join(RESPONSE_FORMATS)}", param="text.format.type")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


# -- output ------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def message_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or _id("msg"), "role": "assistant", "status": "completed",
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: ToolCall) -> dict[str, Any]:
    return {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"}


def output_items(parsed: ParsedOutput, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """A reply's output items: reasoning, then the text (also when empty, unless calls replace it), then calls."""
    items = [reasoning_item(parsed.reasoning)] if parsed.reasoning else []
    if parsed.content or not calls:
        items.append(message_item(parsed.content or ""))
    return items + [call_item(c) for c in calls]


def response_object(response_id: str, created: int, model: str, body: ResponsesRequest, output: list[dict],
                    finish_reason: str | None, usage: dict | None, error: str | None = None) -> dict[str, Any]:
    """The Response; `finish_reason` None means still in progress, "error" failed (`error` says why)."""
    status = {None: "in_progress", "length": "incomplete", "abort": "cancelled", "error": "failed"}.get(
        finish_reason, "completed")
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "usage": usage, "error": {"code": "server_error", "message": error} if error else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": body.reasoning, "store": False, "temperature": body.temperature, "top_p": body.top_p,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "truncation": "disabled",
        "metadata": body.metadata or {},
    }


def response_usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": chat_usage["prompt_tokens_details"],
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": chat_usage.get("completion_tokens_details", {"reasoning_tokens": 0}),
            "total_tokens": chat_usage["total_tokens"]}


class ResponseEvents:
    """Parser deltas -> Responses streaming events. One output item is open at a time (reasoning
    text, then message text); each is announced by `output_item.added` and ends with
    `output_item.done`; a function call arrives whole (the parser holds it until it is closed)."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []  # finished items
        self._seq = itertools.count()
        self._item: dict[str, Any] | None = None
        self._text = ""

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "sequence_number": next(self._seq), **fields}

    def delta(self, d: Delta) -> list[dict[str, Any]]:
        if d.tool_call is not None:
            item, events = call_item(d.tool_call), self.close()
            at = len(self.output)
            events += [self.event("response.output_item.added", output_index=at,
                                  item={**item, "arguments": "", "status": "in_progress"}),
                       self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                                  delta=item["arguments"]),
                       self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                  name=item["name"], arguments=item["arguments"]),
                       self.event("response.output_item.done", output_index=at, item=item)]
            self.output.append(item)
            return events
        kind, text = ("reasoning", d.reasoning) if d.reasoning is not None else ("message", d.content or "")
        events = [] if self._item is not None and self._item["type"] == kind else self.close() + self._open(kind)
        self._text += text
        where = {"item_id": self._item["id"], "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            return events + [self.event("response.reasoning_text.delta", **where, delta=text)]
        return events + [self.event("response.output_text.delta", **where, delta=text, logprobs=[])]

    def finish(self) -> list[dict[str, Any]]:
        """Close the open item; a reply with neither text nor calls still gets its (empty) message."""
        events = self.close()
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            events += self._open("message") + self.close()
        return events

    def _open(self, kind: str) -> list[dict[str, Any]]:
        self._text, at = "", len(self.output)
        if kind == "reasoning":
            self._item = {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [], "status": "in_progress"}
            return [self.event("response.output_item.added", output_index=at, item=self._item)]
        self._item = {**message_item(""), "content": [], "status": "in_progress"}
        return [self.event("response.output_item.added", output_index=at, item=self._item),
                self.event("response.content_part.added", item_id=self._item["id"], output_index=at, content_index=0,
                           part=_text_part(""))]

    def close(self) -> list[dict[str, Any]]:
        if self._item is None:
            return []
        at, item_id = len(self.output), self._item["id"]
        where = {"item_id": item_id, "output_index": at, "content_index": 0}
        if self._item["type"] == "reasoning":
            item = {**reasoning_item(self._text), "id": item_id}
            events = [self.event("response.reasoning_text.done", **where, text=self._text)]
        else:
            item = message_item(self._text, item_id)
            events = [self.event("response.output_text.done", **where, text=self._text, logprobs=[]),
                      self.event("response.content_part.done", **where, part=_text_part(self._text))]
        self._item = None
        self.output.append(item)
        return events + [self.event("response.output_item.done", output_index=at, item=item)]
