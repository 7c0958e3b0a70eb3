"""OpenAI-compatible HTTP API over AsyncLLMEngine: /v1/models, /v1/completions, /v1/chat/completions,
/v1/responses, /health, /metrics.

Bad input never reaches the engine: requests are validated (pydantic, SamplingParams, the engine's
own checks) before anything is queued, and every error is answered in OpenAI's error format.
A client that goes away mid-request has its request aborted at once, freeing its KV blocks.
"""

import asyncio
import contextlib
import dataclasses
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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepflash import __version__
from stepflash.engine.front import AsyncLLMEngine, EngineFailure
from stepflash.multimodal import IMAGE_PART_TYPES, ImageInput, MediaPolicy, chat_images
from stepflash.outputs import CompletionOutput, RequestOutput
from stepflash.sampling import StructuredOutputsParams
from stepflash.server.metrics import ServerMetrics
from stepflash.server.parsers import (
    THINK_END,
    THINK_START,
    Delta,
    ParsedOutput,
    StreamingParser,
    ToolCall,
    parse_output,
)
from stepflash.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    ResponsesRequest,
    SamplingFields,
)
from stepflash.server.responses import ResponseEvents, chat_request, output_items, response_object, response_usage

access_log = logging.getLogger("stepflash.access")


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


def _validation_error(exc: RequestValidationError) -> ApiError:
    """A body that is not JSON, or JSON that is not an object, says so; a field names itself."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return ApiError(400, f"the body must be JSON: {first.get('ctx', {}).get('error', 'invalid JSON')}{at}")
    if loc == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        return ApiError(400, "the body must be JSON: a JSON object holding the request's fields")
    if loc[:2] == ("body", "prompt"):  # a union: pydantic would name only one of its branches
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                        "lists", param="prompt")
    where = ".".join(str(p) for p in loc if p != "body")
    return ApiError(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where or None)


def create_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None, max_queue: int = 256,
               thinking_token_budget: int | None = None, media: MediaPolicy | None = None,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """`thinking_token_budget`: the default for requests that set none (None: reasoning is unbounded);
    `media`: where image URLs may point (default: data: URLs only); `allowed_origins`: browser origins
    that may call the API (CORS; None: off)."""
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
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(EngineFailure)
    async def engine_failure(request: Request, exc: EngineFailure) -> JSONResponse:
        return ApiError(500, str(exc), type_="server_error").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("stepflash.server").exception("unhandled error")
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()

    app.add_middleware(AccessLog, metrics=metrics)
    if allowed_origins:  # browser clients on these origins may call the API (preflights need no key)
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

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
        if engine.fatal is not None:  # the server is about to exit
            raise ApiError(503, f"the engine has stopped: {engine.fatal}", type_="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(await engine.stats()), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "stepflash",
            "max_model_len": engine.max_model_len}

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return card

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_request(body)
        prompts = _prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        params = _params(body, 1 if body.max_tokens == 0 else body.max_tokens, body.logprobs, engine, None,
                         thinking_token_budget)
        if body.echo and body.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        ids = await _submit(engine, prompts, params,
                            [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))])
        streams = _merged([engine.stream(i) for i in ids])
        view = _CompletionView(body, engine, params.n)
        if body.stream:
            return await _sse(_completion_chunks(streams, request_id, model_name, body, view, metrics), engine, ids)
        finals = await _collect(streams, len(ids), request, engine, ids)
        for final in finals:
            metrics.observe_finished(final)
        return JSONResponse(_completion_body(finals, request_id, model_name, view))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_request(body)
        prompt = await _chat_prompt(body, engine, media)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, logprobs, engine, prompt.structured,
                         thinking_token_budget)
        ids = await _submit(engine, [prompt.token_ids], params, [f"chatcmpl-{uuid.uuid4().hex}"], [prompt.images])
        streams = _merged([engine.stream(ids[0])])
        if body.stream:
            chunks = _chat_chunks(streams, ids[0], model_name, body, prompt, engine, metrics)
            return await _sse(chunks, engine, ids)
        (final,) = await _collect(streams, 1, request, engine, ids)
        metrics.observe_finished(final)
        return JSONResponse(_chat_body(final, ids[0], model_name, body, prompt, engine))

    @app.post("/v1/responses", dependencies=v1)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        chat_body = chat_request(body)
        check_request(chat_body)
        prompt = await _chat_prompt(chat_body, engine, media)
        params = _params(chat_body, chat_body.max_completion_tokens, None, engine, prompt.structured,
                         thinking_token_budget)
        ids = await _submit(engine, [prompt.token_ids], params, [f"resp_{uuid.uuid4().hex}"], [prompt.images])
        streams = _merged([engine.stream(ids[0])])
        reply = _ResponseReply(ids[0], int(time.time()), model_name, body, chat_body, prompt, engine)
        if body.stream:
            return await _sse(_response_events(streams, reply, metrics), engine, ids, named=True)
        (final,) = await _collect(streams, 1, request, engine, ids)
        metrics.observe_finished(final)
        parsed, calls = reply.parse(final.outputs[0])
        return JSONResponse(reply.response(output_items(parsed, calls), final))

    return app


# -- request handling ---------------------------------------------------------------------------------
def _params(body: SamplingFields, max_tokens: int | None, logprobs: int | None, engine: AsyncLLMEngine,
            structured: StructuredOutputsParams | None, thinking_token_budget: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs, engine.model_config.vocab_size, structured,
                                    thinking_token_budget)
    except ValueError as e:
        raise ApiError(400, str(e)) from e


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """`prompt` as vLLM takes it: a string, a token-id list, or a list of either (one choice set each)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt or any(not p for p in prompt):
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


async def _submit(engine: AsyncLLMEngine, prompts: list[str | list[int]], params, request_ids: list[str],
                  images: list[list] | None = None) -> list[str]:
    """Queue one engine request per prompt, or none: a bad prompt fails them all (400 naming it)."""
    try:
        await engine.add_all(prompts, params, request_ids, images)
    except ValueError as e:  # context overflow, ids outside the vocabulary, ...
        raise ApiError(400, str(e), param="prompt" if len(prompts) > 1 else None) from e
    except EngineFailure as e:  # the engine has stopped, or failed to take the requests
        raise ApiError(503, str(e), type_="server_error") from e
    return request_ids


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, delta) from several request streams as they come; closing it closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in streams:
            while (item := await queue.get())[1] is not None:
                yield item
        await asyncio.gather(*tasks)  # a stream's error reaches the consumer
    finally:
        for task in tasks:
            task.cancel()


async def _collect(streams: AsyncIterator[tuple[int, RequestOutput]], count: int, request: Request,
                   engine: AsyncLLMEngine, request_ids: list[str]) -> list[RequestOutput]:
    """Wait for every whole output; a client that disconnects meanwhile aborts its requests."""
    finals: dict[int, RequestOutput] = {}
    done = 0
    try:
        async for i, delta in streams:
            finals[i] = _accumulate(finals.get(i), delta)
            if finals[i].finished:
                done += 1
            elif await request.is_disconnected():
                break
    finally:
        await streams.aclose()
        if done < count:
            for request_id in request_ids:
                engine.abort(request_id)
    if done < count:
        raise ApiError(499, "client disconnected")
    return [finals[i] for i in range(count)]


def _accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    if total is None:
        return delta
    total.add(delta)
    return total


async def _sse(chunks: AsyncIterator[dict], engine: AsyncLLMEngine, request_ids: list[str],
               named: bool = False) -> StreamingResponse:
    """Server-sent events. The first event is produced before the response exists: a generator that
    has started runs its `finally` (the abort) however it ends, even if the client leaves before the
    response body is sent; one never started would not, and its request would run on unseen.
    `named` events (the Responses API) carry their type as the event name and end without [DONE].
    If the engine fails mid-stream (a failed step), the stream ends with an error event naming the
    cause, as the OpenAI clients read one, instead of a cut connection."""
    def event(chunk: dict) -> str:
        # ASCII-escaped: a raw U+2028 / U+0085 in generated text ends the line for some SSE clients
        return (f"event: {chunk['type']}\n" if named else "") + f"data: {json.dumps(chunk)}\n\n"

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield event(chunk)
            if not named:
                yield "data: [DONE]\n\n"
        finally:
            for request_id in request_ids:
                engine.abort(request_id)

    events = body()
    first = await events.__anext__()  # an error before it: the error handlers answer, with a status

    async def replay() -> AsyncIterator[str]:
        yield first
        try:
            async for later in events:
                yield later
        except Exception as e:  # the headers are sent: only an event can still tell the client
            logging.getLogger("stepflash.server").error("stream ended by an engine error: %s", e)
            yield event({"type": "error", "code": "server_error", "message": str(e), "param": None} if named else
                        ApiError(500, str(e), type_="server_error").body())

    return StreamingResponse(replay(), media_type="text/event-stream")


def _chat_images(messages: list[dict[str, Any]], media: MediaPolicy, engine: AsyncLLMEngine) -> list[ImageInput]:
    """The conversation's images (image_url parts; `check_content_parts` refused them if the model
    takes none), checked against the limit first, then fetched, decoded and preprocessed."""
    count = sum(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES
                for m in messages if isinstance(m.get("content"), list) for part in m["content"])
    limit = engine.config.limit_images_per_prompt
    if count > limit:
        raise ValueError(f"{count} images in one request; the limit is {limit} (--limit-images-per-prompt)")
    return [engine.images.process(data) for data in chat_images(messages, media)]


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


@dataclasses.dataclass
class ChatPrompt:
    """A conversation rendered for the model, and how to read its reply."""

    token_ids: list[int]
    tools: list[dict] | None  # shown to the model and parsed from its output
    structured: StructuredOutputsParams | None  # the grammar of the answer (tool calls, response_format)
    reasoning: bool  # the reply starts inside <think> (the template may have closed it)
    images: list  # preprocessed images, in the order of their placeholders


def check_content_parts(messages: list[ChatMessage], takes_images: bool) -> None:
    """A content part the model cannot read gets a 400 naming its type, never a silent drop: image
    parts need a vision model (Step 3.7), other kinds (audio, ...) no model here reads."""
    readable = ("text", *IMAGE_PART_TYPES) if takes_images else ("text",)
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in readable:
                reads = "text and images" if takes_images else "text only (images need a vision model: Step 3.7)"
                raise ApiError(400, f"messages.{i}.content.{j}: content parts of type {part.type!r} are not "
                               f"supported: this model reads {reads}", param=f"messages.{i}.content.{j}.type")


async def _chat_prompt(body: ChatCompletionRequest, engine: AsyncLLMEngine, media: MediaPolicy) -> ChatPrompt:
    check_content_parts(body.messages, engine.images is not None)
    tokenizer = engine.tokenizer
    tools, structured = _tools_and_format(body)
    messages = [_template_message(m) for m in body.messages]
    try:
        images = await asyncio.to_thread(_chat_images, messages, media, engine)  # decoding: off the event loop
        text = tokenizer.apply_chat_template(messages, tools=tools, **_template_kwargs(body, tokenizer))
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from e
    reasoning = text.rfind(THINK_START) > text.rfind(THINK_END)  # the prompt leaves thinking open
    return ChatPrompt(await engine.encode(text), tools, structured, reasoning, images)


_TEMPLATE_ARGUMENTS = {"messages", "tools", "documents", "add_generation_prompt"}


def _template_kwargs(body: ChatCompletionRequest, tokenizer) -> dict[str, Any]:
    """`chat_template_kwargs` and `reasoning_effort` for the template, which must read each of them:
    a control the template ignores would be silently ignored, so it is an error instead."""
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs["reasoning_effort"] = body.reasoning_effort
    if reserved := sorted(_TEMPLATE_ARGUMENTS & kwargs.keys()):
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
    if unused := sorted(kwargs.keys() - tokenizer.template_variables()):
        param = "reasoning_effort" if unused == ["reasoning_effort"] else "chat_template_kwargs"
        raise ApiError(400, f"this model's chat template does not use {', '.join(unused)}", param=param)
    return kwargs


def _reasoning_tokens(c: CompletionOutput, prompt: ChatPrompt, engine: AsyncLLMEngine) -> int:
    """Generated tokens before the one that closes the reasoning (all of them if none does)."""
    if not prompt.reasoning:
        return 0
    tokenizer = engine.tokenizer
    end = tokenizer.token_to_id(THINK_END)
    if end is not None and end in c.token_ids:
        return c.token_ids.index(end)
    if THINK_END not in c.text:
        return len(c.token_ids)
    return len(tokenizer.encode(c.text[:c.text.index(THINK_END)]))  # "</think>" is several tokens here


# -- responses ----------------------------------------------------------------------------------------
def _usage(outs: list[RequestOutput], generated: bool = True, reasoning_tokens: int | None = None) -> dict:
    """Token counts of one or more prompts' outputs; `cached_tokens` are prompt tokens the prefix
    cache served. Scoring a prompt (`generated=False`) counts no completion tokens."""
    prompt = sum(len(out.prompt_token_ids) for out in outs)
    completion = sum(len(c.token_ids) for out in outs for c in out.outputs) if generated else 0
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": sum(out.metrics.num_cached_tokens for out in outs
                                                            if out.metrics is not None)}}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _finish_reason(c: CompletionOutput, has_calls: bool = False) -> str | None:
    if c.finish_reason is None:
        return None
    return "tool_calls" if has_calls else c.finish_reason


def _chat_logprobs(c: CompletionOutput, engine: AsyncLLMEngine) -> dict | None:
    if c.logprobs is None:
        return None
    decode = engine.tokenizer.decode

    def entry(token_id: int, logprob: float) -> dict:
        text = decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

    content = []
    for token_id, lps in zip(c.token_ids, c.logprobs):
        top = sorted(lps.items(), key=lambda kv: -kv[1])
        content.append({**entry(token_id, lps[token_id]), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content}


def _chat_body(out: RequestOutput, request_id: str, model: str, body: ChatCompletionRequest, prompt: ChatPrompt,
               engine: AsyncLLMEngine) -> dict:
    choices = []
    for c in out.outputs:
        parsed = parse_output(c.text, prompt.tools, prompt.reasoning)
        calls = parsed.tool_calls[:1] if body.parallel_tool_calls is False else parsed.tool_calls
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content,
                                   "reasoning_content": parsed.reasoning or None}
        if calls:
            message["tool_calls"] = [t.to_openai() for t in calls]
        choices.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(c, engine),
                        "finish_reason": _finish_reason(c, bool(calls)), "stop_reason": c.stop_reason})
    reasoning = sum(_reasoning_tokens(c, prompt, engine) for c in out.outputs)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage([out], reasoning_tokens=reasoning)}


async def _chat_chunks(streams: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str,
                       body: ChatCompletionRequest, prompt: ChatPrompt, engine: AsyncLLMEngine,
                       metrics: ServerMetrics) -> AsyncIterator[dict]:
    created = int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None,
              stop_reason: int | str | None = None) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                             "stop_reason": stop_reason}]}

    parsers: dict[int, StreamingParser] = {}
    calls: dict[int, int] = {}
    most_calls = 1 if body.parallel_tool_calls is False else None
    final = None
    async for _, out in streams:
        final = _accumulate(final, out)
        for c in out.outputs:
            if c.index not in parsers:
                parsers[c.index] = StreamingParser(prompt.tools, prompt.reasoning)
                calls[c.index] = 0
                yield chunk(c.index, {"role": "assistant", "content": ""})
            logprobs = _chat_logprobs(c, engine) if c.token_ids else None
            deltas = parsers[c.index].feed(c.text) + (parsers[c.index].finish() if c.finished else [])
            for d in deltas:
                if d.tool_call is not None and most_calls is not None and calls[c.index] >= most_calls:
                    continue  # parallel_tool_calls=false: the first call only
                yield chunk(c.index, _delta_json(d, calls, c.index), logprobs=logprobs)
                logprobs = None
            if logprobs is not None:
                yield chunk(c.index, {}, logprobs=logprobs)
            if c.finished:
                yield chunk(c.index, {}, finish=_finish_reason(c, calls[c.index] > 0), stop_reason=c.stop_reason)
    if final is not None:
        metrics.observe_finished(final)
        if body.stream_options and body.stream_options.include_usage:
            reasoning = sum(_reasoning_tokens(c, prompt, engine) for c in final.outputs)
            yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": _usage([final], reasoning_tokens=reasoning)}


@dataclasses.dataclass
class _ResponseReply:
    """What a Responses reply needs to know of its request."""

    response_id: str
    created: int
    model: str
    body: ResponsesRequest
    chat: ChatCompletionRequest
    prompt: ChatPrompt
    engine: AsyncLLMEngine

    def parse(self, c: CompletionOutput) -> tuple[ParsedOutput, list[ToolCall]]:
        parsed = parse_output(c.text, self.prompt.tools, self.prompt.reasoning)
        return parsed, parsed.tool_calls[:1] if self.chat.parallel_tool_calls is False else parsed.tool_calls

    def response(self, output: list[dict], final: RequestOutput | None = None) -> dict:
        """The Response object: in progress until `final` (the whole output) is given."""
        if final is None:
            return response_object(self.response_id, self.created, self.model, self.body, output, None, None)
        c = final.outputs[0]
        usage = response_usage(_usage([final], reasoning_tokens=_reasoning_tokens(c, self.prompt, self.engine)))
        return response_object(self.response_id, self.created, self.model, self.body, output, c.finish_reason, usage,
                               c.stop_reason if c.finish_reason == "error" else None)


async def _response_events(streams: AsyncIterator[tuple[int, RequestOutput]], reply: _ResponseReply,
                           metrics: ServerMetrics) -> AsyncIterator[dict]:
    events = ResponseEvents()
    yield events.event("response.created", response=reply.response([]))
    yield events.event("response.in_progress", response=reply.response([]))
    parser = StreamingParser(reply.prompt.tools, reply.prompt.reasoning)
    calls, final = 0, None
    async for _, out in streams:
        final = _accumulate(final, out)
        for c in out.outputs:
            deltas = parser.feed(c.text) + (parser.finish() if c.finished else [])
            for d in deltas:
                if d.tool_call is not None:
                    if reply.chat.parallel_tool_calls is False and calls:
                        continue  # the first call only
                    calls += 1
                for event in events.delta(d):
                    yield event
    if final is None:
        return
    metrics.observe_finished(final)
    for event in events.finish():
        yield event
    done = reply.response(events.output, final)
    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(done["status"], "response.failed")
    yield events.event(kind, response=done)


def _delta_json(d: Delta, calls: dict[int, int], index: int) -> dict:
    if d.tool_call is not None:
        calls[index] += 1
        return {"tool_calls": [d.tool_call.to_openai(d.index)]}
    if d.reasoning is not None:
        return {"reasoning_content": d.reasoning}
    return {"content": d.content or ""}


class _CompletionView:
    """Completion choices as the request asked for them: `echo` puts the prompt (and, with logprobs,
    its logprobs) first; `max_tokens=0` drops the one token generated, so only the prompt is scored.
    Choice index = prompt index * n + completion index, as vLLM numbers them."""

    def __init__(self, body: CompletionRequest, engine: AsyncLLMEngine, n: int) -> None:
        self.echo, self.scoring_only, self.n = body.echo, body.max_tokens == 0, n
        self.decode = engine.tokenizer.decode
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token (tokens' text summed)

    def choice(self, prompt_index: int, out: RequestOutput, c: CompletionOutput) -> dict:
        """The next piece of a choice (all of it when `c` is whole). `out` holds the prompt's logprobs,
        all of them once the first token exists (which is when a choice first appears)."""
        index = prompt_index * self.n + c.index
        tokens, lps, text, finish = c.token_ids, c.logprobs, c.text, c.finish_reason
        if self.scoring_only:
            tokens, lps, text = [], None if lps is None else [], ""
            finish = finish if finish in (None, "abort") else "length"
        if self.echo and index not in self.offsets:
            text = (out.prompt if out.prompt is not None else self.decode(out.prompt_token_ids)) + text
            if lps is not None:
                tokens, lps = out.prompt_token_ids + tokens, (out.prompt_logprobs or []) + lps
        start = self.offsets.setdefault(index, 0)
        logprobs = None if lps is None else self.logprobs(tokens, lps, start)
        if logprobs is not None:
            self.offsets[index] = start + sum(len(t) for t in logprobs["tokens"])
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": c.stop_reason}

    def logprobs(self, tokens: list[int], lps: list[dict[int, float] | None], start: int) -> dict:
        texts = [self.decode([t]) for t in tokens]
        return {"tokens": texts,
                "token_logprobs": [None if lp is None else _finite(lp[t]) for t, lp in zip(tokens, lps)],
                "top_logprobs": [None if lp is None else {self.decode([t]): _finite(v) for t, v in lp.items()}
                                 for lp in lps],
                "text_offset": list(itertools.accumulate((len(t) for t in texts[:-1]), initial=start)) if texts else []}


def _finite(logprob: float) -> float:
    """JSON has no -Infinity."""
    return max(logprob, -9999.0)


def _completion_body(finals: list[RequestOutput], request_id: str, model: str, view: _CompletionView) -> dict:
    choices = [view.choice(i, out, c) for i, out in enumerate(finals) for c in out.outputs]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(finals, generated=not view.scoring_only)}


async def _completion_chunks(streams: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str,
                             body: CompletionRequest, view: _CompletionView, metrics: ServerMetrics
                             ) -> AsyncIterator[dict]:
    created = int(time.time())
    finals: dict[int, RequestOutput] = {}
    async for i, out in streams:
        finals[i] = _accumulate(finals.get(i), out)
        for c in out.outputs:
            choice = view.choice(i, finals[i], c)
            if choice["text"] or choice["finish_reason"] or (choice["logprobs"] or {}).get("tokens"):
                yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [choice]}
    for final in finals.values():
        metrics.observe_finished(final)
    if finals and body.stream_options and body.stream_options.include_usage:
        yield {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _usage([finals[i] for i in sorted(finals)], generated=not view.scoring_only)}
