"""OpenAI request bodies as pydantic models (FastAPI validates them and publishes their schema), and
OpenAI's error shape."""

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepflash.sampling import SamplingParams, StructuredOutputsParams


class ApiError(Exception):
    """An error answered in OpenAI's format (`{"error": {message, type, param, code}}`)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _Lenient(BaseModel):
    """Fields OpenAI clients send that stepflash does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


def _undecodable(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone surrogate (JSON's "\\ud800" escape decodes to
    one): no UTF-8 text, so no tokenizer could take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _undecodable(key, where) or _undecodable(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := _undecodable(item, f"{where}.{i}" if where else str(i)):
                return found
    return None


class _Body(_Lenient):
    """A whole request body: its text must be valid Unicode (checked before the fields)."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        if where := _undecodable(data):
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text")
        return data


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(_Lenient):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Lenient):
    """vLLM's `structured_outputs` request field (one of json, regex, choice, grammar, json_object)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
                                       json_object=self.json_object, whitespace_pattern=self.whitespace_pattern)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class SamplingFields(_Body):
    """Sampling fields shared by both endpoints; turned into SamplingParams (which validates ranges)."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extensions, used by benchmarks to fix output lengths
    min_tokens: int | None = None
    structured_outputs: StructuredOutputsField | None = None  # vLLM extensions: constrained output
    thinking_token_budget: int | None = None  # reasoning tokens before the engine closes the reasoning

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, vocab_size: int,
                        structured: StructuredOutputsParams | None = None,
                        thinking_token_budget: int | None = None) -> SamplingParams:
        """`structured`: what the endpoint's own fields ask for (response_format, tools), if anything;
        `thinking_token_budget`: the server's default."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise ValueError(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias value for token {key} must be in [-100, 100]")
            bias[int(key)] = value
        given = {k: v for k, v in {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
        }.items() if v is not None}
        if self.min_tokens is not None:
            given["min_tokens"] = self.min_tokens
        if self.structured_outputs is not None:
            if structured is not None:
                raise ValueError("structured_outputs cannot be combined with response_format or constrained tools")
            structured = self.structured_outputs.params()
        budget = self.thinking_token_budget if self.thinking_token_budget is not None else thinking_token_budget
        return SamplingParams(**given, seed=self.seed, stop=self.stop, max_tokens=max_tokens, logprobs=logprobs,
                              logit_bias=bias or None, ignore_eos=self.ignore_eos, structured_outputs=structured,
                              thinking_token_budget=budget)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    reasoning_effort: str | None = None  # passed to the chat template, which must use it


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # one prompt or several (text or token ids)
    max_tokens: int | None = 16  # 0 with echo: score the prompt only
    logprobs: int | None = None
    echo: bool = False  # the prompt (and its logprobs) before the completion


class ResponsesRequest(_Body):
    """The Responses API's request (`POST /v1/responses`); it is served by the chat path, so its
    fields become a ChatCompletionRequest (stepflash.server.responses.chat_request)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: passed to the chat template
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
