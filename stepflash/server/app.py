"""OpenAI-compatible HTTP API over AsyncLLMEngine: /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics.

Bad input never reaches the engine: requests are validated (pydantic, SamplingParams, the engine's
own checks) before anything is queued, and every error is answered in OpenAI's error format.
A client that goes away mid-request has its request aborted at once, freeing its KV blocks.
"""

import asyncio
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepflash import __version__
from stepflash.engine.engine import AsyncLLMEngine
from stepflash.multimodal import IMAGE_PART_TYPES, ImageInput, MediaPolicy, chat_images
from stepflash.outputs import CompletionOutput, RequestOutput
from stepflash.sampling import StructuredOutputsParams
from stepflash.server.metrics import ServerMetrics
from stepflash.server.parsers import Delta, StreamingParser, parse_output
from stepflash.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
)

access_log = logging.getLogger("stepflash.access")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class AccessLog:
    """Counts and logs each HTTP request when its response is complete.

    Plain ASGI on purpose: behind Starlette's BaseHTTPMiddleware (`@app.middleware("http")`),
    `Request.is_disconnected()` never turns true, so a non-streaming request whose client goes away
    would run on to max_tokens, holding its KV blocks and its place in the queue.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500  # stays 500 if the app fails before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.requests.labels(scope["path"], str(status)).inc()
            client = scope.get("client")
            access_log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                        "ms": round((time.monotonic() - start) * 1e3, 1),
                                        "client": client[0] if client else None}))


def create_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None, max_queue: int = 256,
               thinking_token_budget: int | None = None, media: MediaPolicy | None = None) -> FastAPI:
    """`thinking_token_budget`: the default for requests that set none (None: reasoning is unbounded);
    `media`: where image URLs may point (default: data: URLs only)."""
    metrics = ServerMetrics()
    media = media or MediaPolicy()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.abort_all()  # shutdown: end every open stream cleanly

    app = FastAPI(title="stepflash", version=__version__, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where or None
                        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("stepflash.server").exception("unhandled error")
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()

    app.add_middleware(AccessLog, metrics=metrics)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key", type_="authentication_error", code="invalid_api_key")

    def check_request(body: SamplingFields) -> None:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if engine.num_active >= max_queue:
            raise ApiError(429, f"server busy: {max_queue} requests in flight", type_="rate_limit_error")

    v1 = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "stepflash",
                                            "max_model_len": engine.engine.max_model_len}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_request(body)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt: str | list[int] = body.prompt[0]
        else:
            prompt = body.prompt
        params = _params(body, body.max_tokens, body.logprobs, engine, None, thinking_token_budget)
        request_id = _submit(engine, prompt, params, "cmpl")
        stream = engine.stream(request_id)
        if body.stream:
            return await _sse(_completion_chunks(stream, request_id, model_name, body, metrics), engine, request_id)
        final = await _collect(stream, request, engine, request_id)
        metrics.observe_finished(final)
        return JSONResponse(_completion_body(final, request_id, model_name, engine))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_request(body)
        tools, structured = _tools_and_format(body)
        tokenizer = engine.engine.tokenizer
        messages = [_template_message(m) for m in body.messages]
        try:
            images = await asyncio.to_thread(_chat_images, messages, media, engine)  # decoding: off the event loop
            text = tokenizer.apply_chat_template(messages, tools=tools)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        prompt = tokenizer.encode(text)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, logprobs, engine, structured,
                         thinking_token_budget)
        request_id = _submit(engine, prompt, params, "chatcmpl", images)
        stream = engine.stream(request_id)
        if body.stream:
            chunks = _chat_chunks(stream, request_id, model_name, body, tools, engine, metrics)
            return await _sse(chunks, engine, request_id)
        final = await _collect(stream, request, engine, request_id)
        metrics.observe_finished(final)
        return JSONResponse(_chat_body(final, request_id, model_name, tools, engine))

    return app


# -- request handling ---------------------------------------------------------------------------------
def _params(body: SamplingFields, max_tokens: int | None, logprobs: int | None, engine: AsyncLLMEngine,
            structured: StructuredOutputsParams | None, thinking_token_budget: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs, engine.engine.model_config.vocab_size, structured,
                                    thinking_token_budget)
    except ValueError as e:
        raise ApiError(400, str(e)) from e


def _submit(engine: AsyncLLMEngine, prompt: str | list[int], params, prefix: str, images: list | None = None) -> str:
    try:
        return engine.add(prompt, params, f"{prefix}-{uuid.uuid4().hex}", images)
    except ValueError as e:  # context overflow, ids outside the vocabulary, ...
        raise ApiError(400, str(e)) from e


async def _collect(stream: AsyncIterator[RequestOutput], request: Request, engine: AsyncLLMEngine,
                   request_id: str) -> RequestOutput:
    """Wait for the whole output; a client that disconnects meanwhile aborts its request."""
    final = None
    try:
        async for delta in stream:
            final = _accumulate(final, delta)
            if not final.finished and await request.is_disconnected():
                break
    finally:
        if final is None or not final.finished:
            engine.abort(request_id)
    if final is None or not final.finished:
        raise ApiError(499, "client disconnected")
    return final


def _accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    if total is None:
        return delta
    total.add(delta)
    return total


async def _sse(chunks: AsyncIterator[dict], engine: AsyncLLMEngine, request_id: str) -> StreamingResponse:
    """Server-sent events. The first event is produced before the response exists: a generator that
    has started runs its `finally` (the abort) however it ends, even if the client leaves before the
    response body is sent; one never started would not, and its request would run on unseen."""
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                # ASCII-escaped: a raw U+2028 / U+0085 in generated text ends the line for some SSE clients
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.abort(request_id)

    events = body()
    first = await events.__anext__()

    async def replay() -> AsyncIterator[str]:
        yield first
        async for event in events:
            yield event

    return StreamingResponse(replay(), media_type="text/event-stream")


def _chat_images(messages: list[dict[str, Any]], media: MediaPolicy, engine: AsyncLLMEngine) -> list[ImageInput]:
    """The conversation's images (image_url parts), checked against the model and the limit first,
    then fetched, decoded and preprocessed."""
    count = sum(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES
                for m in messages if isinstance(m.get("content"), list) for part in m["content"])
    limit = engine.engine.config.limit_images_per_prompt
    if count and engine.engine.images is None:
        raise ValueError("this model takes no images (image_url parts need a vision model such as Step 3.7)")
    if count > limit:
        raise ValueError(f"{count} images in one request; the limit is {limit} (--limit-images-per-prompt)")
    return [engine.engine.images.process(data) for data in chat_images(messages, media)]


def _template_message(m: ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list) and any(p.type in IMAGE_PART_TYPES for p in m.content):
        message["content"] = [p.model_dump(exclude_none=True) for p in m.content]  # the template places images
    elif isinstance(m.content, list):
        message["content"] = "".join(p.text or "" for p in m.content if p.type == "text")
    else:
        message["content"] = m.content or ""
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
    if m.reasoning_content:
        message["reasoning_content"] = m.reasoning_content
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _tools_and_format(body: ChatCompletionRequest) -> tuple[list[dict] | None, StructuredOutputsParams | None]:
    """Tools shown to the model and parsed from its output, and the grammar of the answer (after the
    reasoning): `required` / a named tool -> only tool calls, each argument following its tool's
    parameter schema; `auto` with a strict tool -> free text, then optionally such calls;
    otherwise `response_format`."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else None
    calls = None
    if tools and body.tool_choice == "required":
        calls = {"tools": tools, "mode": "required", "parallel": body.parallel_tool_calls}
    elif tools and isinstance(body.tool_choice, NamedToolChoice):
        name = body.tool_choice.function.get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        calls = {"tools": tools, "mode": "required", "parallel": False}
    elif tools and any(t["function"].get("strict") for t in tools):
        calls = {"tools": tools, "mode": "auto", "parallel": body.parallel_tool_calls}
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return tools, StructuredOutputsParams(tool_calls=calls) if calls else None
    if calls:
        raise ApiError(400, "response_format cannot be combined with tool_choice required, a named tool or strict "
                            "tools", param="response_format")
    if fmt.type == "json_object":
        return tools, StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs a json_schema", param="response_format")
    return tools, StructuredOutputsParams(json=fmt.json_schema.schema_)


# -- responses ----------------------------------------------------------------------------------------
def _usage(out: RequestOutput) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": completion,
            "total_tokens": len(out.prompt_token_ids) + completion}


def _finish_reason(c: CompletionOutput, has_calls: bool = False) -> str | None:
    if c.finish_reason is None:
        return None
    return "tool_calls" if has_calls else c.finish_reason


def _chat_logprobs(c: CompletionOutput, engine: AsyncLLMEngine) -> dict | None:
    if c.logprobs is None:
        return None
    decode = engine.engine.tokenizer.decode

    def entry(token_id: int, logprob: float) -> dict:
        text = decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

    content = []
    for token_id, lps in zip(c.token_ids, c.logprobs):
        top = sorted(lps.items(), key=lambda kv: -kv[1])
        content.append({**entry(token_id, lps[token_id]), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content}


def _chat_body(out: RequestOutput, request_id: str, model: str, tools: list[dict] | None,
               engine: AsyncLLMEngine) -> dict:
    choices = []
    for c in out.outputs:
        parsed = parse_output(c.text, tools)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content,
                                   "reasoning_content": parsed.reasoning or None}
        if parsed.tool_calls:
            message["tool_calls"] = [t.to_openai() for t in parsed.tool_calls]
        choices.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(c, engine),
                        "finish_reason": _finish_reason(c, bool(parsed.tool_calls))})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(out)}


async def _chat_chunks(stream: AsyncIterator[RequestOutput], request_id: str, model: str,
                       body: ChatCompletionRequest, tools: list[dict] | None,
                       engine: AsyncLLMEngine, metrics: ServerMetrics) -> AsyncIterator[dict]:
    created = int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    parsers: dict[int, StreamingParser] = {}
    calls: dict[int, int] = {}
    final = None
    async for out in stream:
        final = _accumulate(final, out)
        for c in out.outputs:
            if c.index not in parsers:
                parsers[c.index] = StreamingParser(tools)
                calls[c.index] = 0
                yield chunk(c.index, {"role": "assistant", "content": ""})
            logprobs = _chat_logprobs(c, engine) if c.token_ids else None
            deltas = parsers[c.index].feed(c.text) + (parsers[c.index].finish() if c.finished else [])
            for d in deltas:
                yield chunk(c.index, _delta_json(d, calls, c.index), logprobs=logprobs)
                logprobs = None
            if logprobs is not None:
                yield chunk(c.index, {}, logprobs=logprobs)
            if c.finished:
                yield chunk(c.index, {}, finish=_finish_reason(c, calls[c.index] > 0))
    if final is not None:
        metrics.observe_finished(final)
        if body.stream_options and body.stream_options.include_usage:
            yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": _usage(final)}


def _delta_json(d: Delta, calls: dict[int, int], index: int) -> dict:
    if d.tool_call is not None:
        calls[index] += 1
        return {"tool_calls": [d.tool_call.to_openai(d.index)]}
    if d.reasoning is not None:
        return {"reasoning_content": d.reasoning}
    return {"content": d.content or ""}


def _completion_body(out: RequestOutput, request_id: str, model: str, engine: AsyncLLMEngine) -> dict:
    choices = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c, engine),
                "finish_reason": c.finish_reason} for c in out.outputs]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(out)}


def _completion_logprobs(c: CompletionOutput, engine: AsyncLLMEngine) -> dict | None:
    if c.logprobs is None:
        return None
    decode = engine.engine.tokenizer.decode
    tokens = [decode([t]) for t in c.token_ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens,
            "token_logprobs": [lps[t] for t, lps in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{decode([t]): lp for t, lp in lps.items()} for lps in c.logprobs],
            "text_offset": offsets}


async def _completion_chunks(stream: AsyncIterator[RequestOutput], request_id: str, model: str,
                             body: CompletionRequest, metrics: ServerMetrics) -> AsyncIterator[dict]:
    created = int(time.time())
    final = None
    async for out in stream:
        final = _accumulate(final, out)
        for c in out.outputs:
            if c.text or c.finished:
                yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                                    "finish_reason": c.finish_reason}]}
    if final is None:
        return
    metrics.observe_finished(final)
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _usage(final)}
