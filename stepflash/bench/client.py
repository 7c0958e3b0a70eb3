"""Streaming OpenAI-compatible client for benchmarks: every request streamed, every chunk timestamped.

Errors never hang a run: HTTP errors, timeouts (connect and between chunks) and streams that end
before `[DONE]` become a failed `RequestTrace` with the reason, reported apart from the successes.
"""

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from stepflash.bench.metrics import Chunk, RequestTrace


@dataclass
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str
    api_key: str | None = None
    chat: bool = True  # /v1/chat/completions, else /v1/completions
    timeout: float = 600.0  # per request; also the longest silence between chunks

    @property
    def v1(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def served_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model the endpoint lists at /v1/models (what vLLM's and SGLang's benchmarks use
    when no model is given)."""
    endpoint = Endpoint(base_url, "", api_key)
    try:
        response = httpx.get(endpoint.v1 + "/models", headers=endpoint.headers, timeout=timeout)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"no --model given and {endpoint.v1}/models names none ({type(e).__name__}: {e}); "
                         "pass --model") from None


def request_body(endpoint: Endpoint, prompt: str, max_tokens: int, fixed_length: bool = False,
                 temperature: float = 0.0) -> dict:
    body = {"model": endpoint.model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if fixed_length:  # vLLM's extensions; servers that do not know them ignore them
        body.update(ignore_eos=True, min_tokens=max_tokens)
    if endpoint.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _events(lines: list[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


async def stream_request(client: httpx.AsyncClient, endpoint: Endpoint, body: dict) -> RequestTrace:
    """Send one streaming request; returns its trace (error set on any failure)."""
    path = "/chat/completions" if "messages" in body else "/completions"
    trace = RequestTrace(send=time.perf_counter())
    finished = False
    try:
        async with client.stream("POST", endpoint.v1 + path, json=body, headers=endpoint.headers,
                                 timeout=httpx.Timeout(endpoint.timeout, connect=30.0)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                trace.error = f"HTTP {response.status_code}: {text[:200]}"
                return trace
            async for line in response.aiter_lines():
                now = time.perf_counter()
                for data in _events([line]):
                    if data == "[DONE]":
                        finished = True
                        break
                    _record(trace, json.loads(data), now)
    except httpx.TimeoutException:
        trace.error = "timeout"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        trace.error = f"{type(e).__name__}: {e}"[:200]
    if trace.error is None and not finished:
        trace.error = "stream ended before [DONE]"
    elif trace.error is None and not trace.chunks:
        trace.error = "no tokens"
    return trace


def _record(trace: RequestTrace, event: dict, now: float) -> None:
    if event.get("usage"):
        trace.prompt_tokens = event["usage"].get("prompt_tokens", 0)
        trace.completion_tokens = event["usage"].get("completion_tokens", 0)
        cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        trace.cached_tokens = cached if isinstance(cached, int) else None
    if "error" in event:
        trace.error = str(event["error"].get("message", event["error"]))[:200]
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        content = delta.get("content") or choice.get("text") or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        if content or reasoning:  # role-only and empty chunks carry no token
            trace.chunks.append(Chunk(now, content, reasoning))


async def fetch_spec_counters(client: httpx.AsyncClient, endpoint: Endpoint) -> dict[str, float] | None:
    """stepflash's MTP counters from /metrics (None when the server exposes none)."""
    try:
        text = (await client.get(endpoint.v1.removesuffix("/v1") + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return None
    found = {m.group(1) + (f"_{m.group(2)}" if m.group(2) else ""): float(m.group(3)) for m in re.finditer(
        r'^stepflash_spec_decode_(\w+?)(?:\{position="(\d+)"\})? ([0-9.eE+-]+)$', text, re.M)}
    return found or None


def spec_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Acceptance over a run from two counter snapshots: rate, tau and per-position rates."""
    if not before or not after:
        return None
    diff = {k: after[k] - before.get(k, 0.0) for k in after if not k.startswith("mean_accepted_length")}
    steps, drafted = diff.get("verify_steps", 0.0), diff.get("num_draft_tokens", 0.0)
    if not steps:
        return {"verify_steps": 0}
    positions = sorted(int(k.rsplit("_", 1)[1]) for k in diff if k.startswith("num_accepted_tokens_per_pos_"))
    return {"verify_steps": steps, "draft_tokens": drafted, "accepted_tokens": diff.get("num_accepted_tokens", 0.0),
            "acceptance_rate": diff.get("num_accepted_tokens", 0.0) / drafted if drafted else 0.0,
            "tau": 1 + diff.get("num_accepted_tokens", 0.0) / steps,
            "acceptance_per_position": [diff[f"num_accepted_tokens_per_pos_{p}"] / steps for p in positions]}

