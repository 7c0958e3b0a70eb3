"""A real `stepflash serve` process driven by the official openai client."""

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

openai = pytest.importorskip("openai")

from stepflash import LLM, SamplingParams  # noqa: E402
from scripted import write_scripted_checkpoint  # noqa: E402

KEY = "test-key-123"
MODEL = "scripted"
SCRIPT = ["I should look up the weather.", "</think>", "\n\n", "Checking.", "<tool_call>",
          "\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
          "</function>\n", "</tool_call>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
USER = [{"role": "user", "content": "What's the weather in Paris?"}]


SERVING = re.compile(r"serving .* on (http://\S+)/v1")  # the startup line: where `--port 0` landed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _startup_base(proc: subprocess.Popen, deadline: float) -> str:
    """The base URL from the server's startup line, read off its output as it comes."""
    seen = b""
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:  # it exited
                raise RuntimeError(seen.decode(errors="replace"))
            seen += chunk
            if match := SERVING.search(seen.decode(errors="replace")):
                return match.group(1)
    proc.kill()
    raise RuntimeError("server printed no startup line in 120 s:\n" + seen.decode(errors="replace"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted")
    write_scripted_checkpoint(path, SCRIPT)
    return path


def start_server(ckpt, *args: str, name: str = MODEL, new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """`stepflash serve` on a loopback port the OS picks (`--port 0`: no other test process can take it
    in between), once /health answers (`new_session`: in a process group of its own)."""
    proc = subprocess.Popen([sys.executable, "-m", "stepflash.cli", "serve", "--model", str(ckpt), "--port", "0",
                             "--served-model-name", name, *args], start_new_session=new_session,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    base = _startup_base(proc, deadline)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 120 s")


@contextlib.contextmanager
def serving(ckpt, *args: str, name: str = MODEL) -> Iterator[str]:
    """`start_server` for the block: its base URL; the server stops after."""
    proc, base = start_server(ckpt, *args, name=name)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(ckpt):
    with serving(ckpt, "--api-key", KEY, "--max-num-batched-tokens", "64") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def kv_blocks_in_use(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("stepflash_kv_blocks_used"))


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    no_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    assert httpx.get(server + "/health").status_code == 200  # no key needed outside /v1


def test_completion_matches_offline_engine(ckpt, client):
    prompt = "def fib(n):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    offline = LLM(str(ckpt)).generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.choices[0].text == offline.outputs[0].text
    assert out.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert out.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_chat_splits_reasoning_and_parses_tool_calls(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=20)
    choice = out.choices[0]
    assert choice.message.reasoning_content == "I should look up the weather."
    assert choice.message.content == "Checking."
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert out.usage.completion_tokens == len(SCRIPT) + 1  # the script and the end token


def test_streamed_tool_call_equals_the_non_streamed_one(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0,
                                                 max_tokens=20, stream=True, stream_options={"include_usage": True}))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert reasoning == "I should look up the weather." and content == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [("get_weather",
                                                                                   {"city": "Paris", "days": 3})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == len(SCRIPT) + 1


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=20)
    call = first.choices[0].message.tool_calls[0]
    messages = USER + [first.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=20)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered
    assert second.choices[0].message.tool_calls[0].function.name == "get_weather"  # the script runs again


def test_streaming_concatenates_to_the_same_text(client):
    kwargs = dict(model=MODEL, prompt="x = ", max_tokens=12, temperature=0.9, seed=7)
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == full


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"model": "nope"}, 404, "does not exist"),
    ({"temperature": -1}, 400, "temperature"),
    ({"max_tokens": 10**7}, 400, "max_model_len"),
    ({"logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"n": 0}, 400, "n must be"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, needle):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kwargs}
    r = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_wrong_types(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_disconnect_mid_stream_frees_blocks(server, client):
    with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "a" * 50, "max_tokens": 500, "stream": True,
                            "temperature": 1.0}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.monotonic() + 10
    while kv_blocks_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv_blocks_in_use(server) == 0
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices  # still serving


def test_metrics_exposed(server, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    text = httpx.get(server + "/metrics").text
    for name in ("stepflash_time_to_first_token_seconds", "stepflash_num_requests_running",
                 "stepflash_kv_blocks_total", "stepflash_preemptions_total", "stepflash_requests_total"):
        assert name in text
    tau = next(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("stepflash_spec_decode_mean_accepted_length"))
    assert tau > 1.5  # the scripted checkpoint's MTP modules draft its script: most drafts are accepted


@pytest.mark.parametrize("group", [False, True], ids=["server", "process-group"])
def test_sigterm_finishes_open_streams_then_exits(ckpt, group):
    """SIGTERM to the server, or to its whole process group (the engine's process too, as a service
    manager or a terminal sends it): open streams finish, then the server exits."""
    proc, base = start_server(ckpt, new_session=group)
    try:
        lines = []
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "abc", "max_tokens": 300, "stream": True}) as r:
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 2:  # SIGTERM while the stream is open
                    os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate()
        assert lines[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines if x.startswith("data: {")]
        assert finishes[-1] in ("length", "stop")
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so the exit status says so
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in proc.stdout.read()
    finally:
        proc.kill()


def test_event_stream_is_ascii_so_no_client_splits_a_line(server, ckpt):
    """Generated text may hold U+2028 or U+0085, which line-splitting SSE clients (httpx among them)
    treat as line ends; events are ASCII-escaped JSON."""
    from stepflash.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ckpt)
    non_ascii = next(i for i in range(tok.vocab_size) if not tok.decode([i]).isascii())
    body = {"model": MODEL, "prompt": "zq", "max_tokens": 4, "stream": True, "logit_bias": {str(non_ascii): 100}}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        raw = r.read().decode()
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in raw.split("\n")
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert not text.isascii()  # the case is exercised
    assert raw.isascii()


def test_completion_logprobs_offsets_index_the_text(client):
    choice = client.completions.create(model=MODEL, prompt="hi\n", max_tokens=len(SCRIPT), temperature=0,
                                       logprobs=2).choices[0]  # the prompt's last token starts the script
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(SCRIPT)
    assert lp.tokens == SCRIPT and "".join(lp.tokens) == choice.text
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    assert all(len(top) >= 1 for top in lp.top_logprobs)
