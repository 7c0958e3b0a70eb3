"""What real clients send, against a real `stepflash serve`: the Responses API (openai SDK, the Agents
SDK, LangChain), vLLM-style completions (token-id prompts, several prompts, echo with prompt
logprobs, as lm-evaluation-harness sends them), reasoning controls, and honest errors for bad input."""

import asyncio
import json
import math
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from stepflash import LLM, SamplingParams  # noqa: E402
from stepflash.models import default_model_dir  # noqa: E402
from stepflash.tokenizer import default_chat_template  # noqa: E402
from scripted import write_scripted_checkpoint  # noqa: E402
from test_server import SCRIPT, TOOLS, USER, kv_blocks_in_use, serving  # noqa: E402

KEY = "clients-key"
MODEL = "scripted"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example"
ANSWER = "Sunny in Paris."  # what the model says once thinking is closed in the prompt (after a tool result)
CALLS = ["<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
         "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"]
# The default template, with a generation prompt that closes thinking and ends in a trigger token for
# another script: after a tool result or with enable_thinking=false ("~": the answer), or when asked
# for two calls ("^"); reasoning_effort is written into the prompt.
GENERATION_PROMPT = """{%- if add_generation_prompt -%}
    {%- if reasoning_effort is defined -%}
        {{- '<|im_start|>system\\nReasoning effort: ' ~ reasoning_effort ~ '<|im_end|>\\n' -}}
    {%- endif -%}
    {{- '<|im_start|>assistant\\n<think>\\n' -}}
    {%- if two_calls is defined and two_calls -%}
        {{- '</think>\\n^' -}}
    {%- elif (enable_thinking is defined and not enable_thinking) or messages[-1].role == 'tool' -%}
        {{- '</think>\\n~' -}}
    {%- endif -%}
{%- endif -%}
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted-clients")
    write_scripted_checkpoint(path, SCRIPT, more={"~": [ANSWER], "^": CALLS})
    template = default_chat_template()
    start = template.index("{%- if add_generation_prompt -%}")
    (path / "chat_template.jinja").write_text(template[:start] + GENERATION_PROMPT)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with serving(ckpt, "--api-key", KEY, "--allowed-origins", ORIGIN) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def post(server: str, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server + path, content=body, headers={**AUTH, **headers}, timeout=60)
    return httpx.post(server + path, json=body, headers={**AUTH, **headers}, timeout=60)


# -- Responses API ------------------------------------------------------------------------------------
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather forecast",
                    "parameters": TOOLS[0]["function"]["parameters"]}]
QUESTION = "What's the weather in Paris?"


def _items(response) -> list[tuple]:
    out = []
    for item in response.output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in item.content)))
        elif item.type == "message":
            out.append(("message", "".join(c.text for c in item.content)))
        else:
            out.append((item.type, item.name, json.loads(item.arguments)))
    return out


def test_responses_create_returns_reasoning_text_and_calls(client):
    response = client.responses.create(model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS, temperature=0,
                                       max_output_tokens=20)
    assert response.status == "completed"
    assert _items(response) == [("reasoning", "I should look up the weather."), ("message", "Checking."),
                                ("function_call", "get_weather", {"city": "Paris", "days": 3})]
    assert response.usage.output_tokens == len(SCRIPT) + 1
    assert response.usage.output_tokens_details.reasoning_tokens == 1  # the one token before </think>


def test_responses_stream_builds_the_same_response(client):
    kwargs = dict(model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS, temperature=0, max_output_tokens=20)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert _items(events[-1].response) == _items(whole)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert (reasoning, text) == ("I should look up the weather.", "Checking.")
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert added == done == ["reasoning", "message", "function_call"]


def test_responses_events_are_named_and_end_without_done(server):
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", server + "/v1/responses", json=body, headers=AUTH) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[-1] == "response.incomplete"


def test_responses_length_limit_is_incomplete(client):
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=1, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_runs_a_tool_using_agent_to_its_answer(server, streamed):
    agents = pytest.importorskip("agents")
    calls = []

    @agents.function_tool
    def get_weather(city: str, days: int) -> str:
        """Weather forecast."""
        calls.append((city, days))
        return "sunny"

    model = agents.OpenAIResponsesModel(MODEL, openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY,
                                                                  max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer with the forecast.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=40))
    config = agents.RunConfig(tracing_disabled=True)
    if streamed:
        async def run():
            result = agents.Runner.run_streamed(agent, QUESTION, run_config=config)
            kinds = [event.type async for event in result.stream_events()]
            return result, kinds

        result, kinds = asyncio.run(run())
        assert "raw_response_event" in kinds
    else:
        result = agents.Runner.run_sync(agent, QUESTION, run_config=config)
    assert calls == [("Paris", 3)]
    assert result.final_output == ANSWER


def test_langchain_streams_through_the_responses_api(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server + "/v1", api_key=KEY, use_responses_api=True,
                                      temperature=0, max_tokens=20, max_retries=0)
    chunks = list(llm.bind_tools(RESPONSES_TOOLS).stream(QUESTION))
    message = chunks[0]
    for chunk in chunks[1:]:
        message += chunk
    assert len(chunks) > 3
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris", "days": 3})]
    assert "Checking." in message.text


@pytest.mark.parametrize("body, param, needle", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'web_search'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "messages.0.content.0.type", "images need a vision model"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input.0.content.0.image_url", "file_id is not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "'item_reference'"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "'yaml'"),
    ({"reasoning": {"effort": "high"}, "model": "other"}, "model", "does not exist"),
])
def test_responses_bad_input_gets_a_clear_error(server, body, param, needle):
    r = post(server, "/v1/responses", {"model": MODEL, "input": "hi", **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]


# -- chat: reasoning controls, parallel_tool_calls ----------------------------------------------------
def test_reasoning_tokens_and_enable_thinking(client):
    thinking = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=20)
    assert thinking.usage.completion_tokens_details.reasoning_tokens == 1
    streamed = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0,
                                                   max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.completion_tokens_details.reasoning_tokens == 1
    off = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=20,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = off.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None)) == (ANSWER, None)
    assert off.usage.completion_tokens_details.reasoning_tokens == 0


def test_reasoning_effort_reaches_the_template(client):
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    effort = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, reasoning_effort="low")
    assert effort.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel, cities", [(None, ["Paris", "Rome"]), (False, ["Paris"])])
def test_parallel_tool_calls_false_keeps_one_call(client, stream, parallel, cities):
    kwargs = dict(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=10,
                  extra_body={"chat_template_kwargs": {"two_calls": True}})
    if parallel is not None:
        kwargs["parallel_tool_calls"] = parallel
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    else:
        calls = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == cities


# -- bad input ----------------------------------------------------------------------------------------
CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}


@pytest.mark.parametrize("body, param, needle", [
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content.0.type", "'image_url'"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                        {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]},
     "messages.0.content.1.type", "'input_audio'"),
    ({**CHAT, "response_format": {"type": "yaml"}}, "response_format.type", "'json_schema'"),
    ({**CHAT, "chat_template_kwargs": {"no_such_flag": True}}, "chat_template_kwargs", "no_such_flag"),
    ({**CHAT, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "may not set messages"),
])
def test_bad_chat_input_gets_a_clear_error(server, body, param, needle):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]


def test_known_response_formats_are_accepted(server):
    for fmt in ({"type": "text"}, {"type": "json_object"}):
        assert post(server, "/v1/chat/completions", {**CHAT, "response_format": fmt}).status_code == 200


def test_lone_surrogate_is_a_400_and_the_server_stays_healthy(server):
    raw = b'{"model": "scripted", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = post(server, "/v1/chat/completions", raw, **{"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] is None or "messages.0.content" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", b'{"model": "scripted", "prompt": "\\udfff"}',
             **{"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


@pytest.mark.parametrize("raw, content_type, needle", [
    (b"model=scripted&prompt=hi", "application/x-www-form-urlencoded", "must be JSON"),
    (b'{"model": "scripted", "prompt": "hi"', "application/json", "must be JSON"),
    (b'["model", "scripted"]', "application/json", "must be JSON"),
])
def test_non_json_bodies_are_told_to_send_json(server, raw, content_type, needle):
    r = post(server, "/v1/completions", raw, **{"Content-Type": content_type})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
    assert r.json()["error"]["param"] is None  # a position in the body is no parameter


def test_truncated_json_names_its_position(server):
    raw = b'{"model": "scripted", "prompt": "hi"'
    r = post(server, "/v1/completions", raw, **{"Content-Type": "application/json"})
    assert f"at character {len(raw)}" in r.json()["error"]["message"]  # where the body ran out


def test_get_model_by_id(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_cors_for_allowed_origins_only(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server + "/v1/chat/completions", headers=preflight)  # no API key on a preflight
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = post(server, "/v1/chat/completions", CHAT, Origin=ORIGIN)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = post(server, "/v1/chat/completions", CHAT, Origin="http://evil.example")
    assert "access-control-allow-origin" not in r.headers


# -- completions as lm-eval and vLLM clients send them ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server():
    with serving(default_model_dir(), name="tiny") as base:
        yield base


@pytest.fixture(scope="module")
def tiny_llm():
    return LLM()


TEXTS = [("def add(a, b):", "\n    return a + b"), ("import os", "\nimport sys"), ("x = [1, 2", ", 3]")]


def _engine_prompt_logprobs(llm: LLM, ids: list[int]) -> list[float | None]:
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    return [None if lp is None else lp[t] for t, lp in zip(ids, out.prompt_logprobs)]


def test_echo_returns_the_engines_prompt_logprobs(tiny_server, tiny_llm):
    prompts = [tiny_llm.tokenizer.encode(a + b) for a, b in TEXTS]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = post(tiny_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, (a, b), choice in zip(prompts, TEXTS, choices):
        lp = choice["logprobs"]
        assert choice["text"] == a + b and lp["text_offset"][0] == 0
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = _engine_prompt_logprobs(tiny_llm, ids)
        assert lp["token_logprobs"][1:] == pytest.approx(expected[1:], abs=1e-4)
        assert all(top[t] == pytest.approx(x, abs=1e-4) for top, t, x in zip(lp["top_logprobs"][1:], lp["tokens"][1:],
                                                                               lp["token_logprobs"][1:]))
    assert r.json()["usage"]["completion_tokens"] == 0


def test_lm_eval_local_completions_loglikelihoods_equal_the_engines(tiny_server, tiny_llm):
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    lm = lm_eval_api.LocalCompletionsAPI(base_url=tiny_server + "/v1/completions", model="tiny",
                                         tokenizer=str(default_model_dir()), tokenizer_backend="huggingface",
                                         tokenized_requests=True, batch_size=2, max_retries=1)
    requests = [Instance("loglikelihood", {}, (a, b), i) for i, (a, b) in enumerate(TEXTS)]
    results = lm.loglikelihood(requests)
    assert len(results) == len(TEXTS)
    for (a, b), (loglikelihood, _) in zip(TEXTS, results):
        context = lm.tok_encode(a)
        ids = context + lm.tok_encode(b)
        expected = _engine_prompt_logprobs(tiny_llm, ids)[len(context):]
        assert loglikelihood == pytest.approx(math.fsum(expected), abs=1e-3)
        assert loglikelihood < -0.1  # not the silent 0.0 of an ignored echo


def test_prompt_lists_give_one_choice_per_prompt_and_n(tiny_server, tiny_llm):
    body = {"model": "tiny", "prompt": ["def f(", "import"], "max_tokens": 3, "n": 2, "temperature": 0}
    r = post(tiny_server, "/v1/completions", body)
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    expected = [o.outputs[0].text for o in tiny_llm.generate(["def f(", "import"],
                                                              SamplingParams(temperature=0, max_tokens=3))]
    assert [c["text"] for c in choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert r.json()["usage"]["completion_tokens"] == 12


def test_echo_streams_the_prompt_then_the_completion_with_logprobs(tiny_server):
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 5, "echo": True, "logprobs": 2,
            "temperature": 0}
    whole = post(tiny_server, "/v1/completions", body).json()["choices"][0]
    events = []
    with httpx.stream("POST", tiny_server + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    pieces = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert whole["text"].startswith("def add(a, b):")
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in pieces if p["logprobs"] for x in p["logprobs"][key]] == whole["logprobs"][key]


@pytest.mark.parametrize("stream", [False, True])
def test_leaving_a_several_prompt_request_frees_every_prompts_blocks(tiny_server, stream):
    body = {"model": "tiny", "prompt": ["a" * 40, "c" * 40, "b" * 40], "max_tokens": 4000, "ignore_eos": True,
            "min_tokens": 4000, "stream": stream}
    if stream:
        with httpx.stream("POST", tiny_server + "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny_server + "/v1/completions", json=body, timeout=1)
    deadline = time.monotonic() + 10
    while kv_blocks_in_use(tiny_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv_blocks_in_use(tiny_server) == 0


def test_cors_is_off_by_default(tiny_server):
    r = httpx.options(tiny_server + "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_reasoning_effort_on_a_template_without_it_is_refused(tiny_server):
    body = {"model": "tiny", "messages": USER, "max_tokens": 1, "reasoning_effort": "high"}
    r = post(tiny_server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    assert "does not use reasoning_effort" in r.json()["error"]["message"]


def test_max_tokens_zero_needs_echo(tiny_server):
    r = post(tiny_server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


@pytest.mark.parametrize("prompt, needle", [([], "must not be empty"), ([[1, 2], []], "must not be empty"),
                                            ([[1, 2], [10**9]], "prompt 1"),
                                            (["a", [1, 2]], "a list of strings, a list of token ids")])
def test_bad_prompt_lists(tiny_server, prompt, needle):
    r = post(tiny_server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
