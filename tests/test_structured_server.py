"""Structured outputs over the OpenAI API: response_format, strict tool calls with tool_choice
required / named, the client's `parse`, errors. The app runs in-process (Starlette's TestClient is
the official openai client's HTTP client) on a random tiny checkpoint, which writes noise and never
closes its reasoning on its own: every valid reply is the grammar's and the thinking budget's doing."""

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

from starlette.testclient import TestClient  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402
from stepflash.config import EngineConfig  # noqa: E402
from stepflash.engine.front import AsyncLLMEngine  # noqa: E402
from stepflash.server.app import create_app  # noqa: E402
from stepflash.structured import Constraint  # noqa: E402
from stepflash.train.configs import tiny_config  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "days", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
             "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
             "required": ["xs"], "additionalProperties": False}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("random"), tiny_config())
    # MTP under grammars: test_structured.py; in this process: a test patches the engine's code
    engine = AsyncLLMEngine(ckpt, EngineConfig(mtp=0), in_process=True)
    app = create_app(engine, "tiny", thinking_token_budget=4)  # the server's default budget
    try:
        with TestClient(app) as http:
            yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    finally:
        engine.shutdown()


def _check_calls(calls, named: str | None):
    assert calls and all(c.function.name == (named or c.function.name) for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_follow_the_schema_streamed_and_not(client, choice):
    named = "get_weather" if isinstance(choice, dict) else None
    for seed in range(2):
        kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed,
                      max_tokens=300, parallel_tool_calls=False)
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        _check_calls(r.choices[0].message.tool_calls, named)
        assert len(r.choices[0].message.tool_calls) == 1  # parallel_tool_calls=False
        streamed = [tc for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices
                    for tc in chunk.choices[0].delta.tool_calls or []]
        assert [(t.function.name, t.function.arguments) for t in streamed] == \
               [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls]


def test_the_clients_parse_with_a_pydantic_response_format(client):
    class Point(pydantic.BaseModel):
        x: int
        label: str = pydantic.Field(max_length=5)

    class Shape(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=5)
        points: list[Point] = pydantic.Field(max_length=3)
        closed: bool | None

    r = client.beta.chat.completions.parse(model="tiny", messages=USER, response_format=Shape, temperature=1.0,
                                           seed=1, max_tokens=400)
    assert isinstance(r.choices[0].message.parsed, Shape)
    assert r.choices[0].message.reasoning_content  # reasoning stayed free, then the budget closed it


@pytest.mark.parametrize("body, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}}},
     "uniqueItems"),
    ({"structured_outputs": {"regex": "[a-"}}, "regex"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"thinking_token_budget": -1}, "thinking_token_budget"),
])
def test_bad_structured_requests_get_a_400_naming_the_problem(client, body, needle):
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, extra_body=body)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)  # the server carries on
    assert r.choices[0].finish_reason == "length"


def test_a_grammar_failure_mid_reply_reaches_the_client_with_its_reason(client, monkeypatch):
    accept = Constraint.accept

    def faulty(self, token, think_end):  # a library fault once the grammar takes over: its sticky error state
        if not self.reasoning and self.grammar is not None:
            self.grammar.matcher.consume_token(tiny_config()["eos_token_id"][0])  # EOS inside unfinished JSON
        return accept(self, token, think_end)

    monkeypatch.setattr(Constraint, "accept", faulty)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    kwargs = dict(model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": schema}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "error" and "structured output failed" in choice.stop_reason
    last = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices][-1]
    assert last.finish_reason == "error" and "structured output failed" in last.stop_reason
    r = client.responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=40, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "point", "schema": schema}})
    assert r.status == "failed" and "structured output failed" in r.error.message
    ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)  # no grammar: untouched
    assert ok.choices[0].finish_reason == "length" and ok.choices[0].stop_reason is None


def test_a_step_failing_mid_stream_ends_the_stream_with_an_error_event(client, monkeypatch):
    """The headers are sent when a step fails: the stream ends with an error event the clients read
    (the chat client raises APIError with the cause; the Responses stream yields an `error` event),
    not a cut connection; without a stream, a 500 names the cause; the engine serves the next
    request. (Not structured output: this file's engine runs in the test's process, so its code can
    be patched.)"""
    from stepflash.engine.engine import LLMEngine

    step, calls = LLMEngine._step, []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:  # a decode step, after the first tokens went out
            raise RuntimeError("a step failed on purpose")
        return step(self)

    monkeypatch.setattr(LLMEngine, "_step", failing)
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, stream=True)
    with pytest.raises(openai.APIError, match="a step failed on purpose"):
        for _ in stream:
            pass
    calls.clear()
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=20, stream=True))
    assert events[-1].type == "error" and "a step failed on purpose" in events[-1].message
    calls.clear()
    with pytest.raises(openai.InternalServerError, match="engine step failed: .*a step failed on purpose"):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=20)  # no stream: a 500 naming it
    monkeypatch.setattr(LLMEngine, "_step", step)
    ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert ok.choices[0].finish_reason == "length"
