"""Load test for `stepflash serve`: many concurrent streaming clients on /v1/chat/completions and
/v1/completions. Most requests are valid; a share hang up at a random point (mid-stream, right after
the headers, or while waiting for a non-streaming answer) and a share are invalid.

    python benchmarks/server_load.py [--clients 64] [--duration 60] [--model DIR | --base-url URL]
                                     [--seed 0] [--out results.json]

Without --base-url it starts its own server on a free 127.0.0.1 port (a tiny random checkpoint unless
--model is given, an API key, --max-queue below the client count so that 429s happen) and stops it
at the end. Checks afterwards: no 5xx at all; every valid stream that was not dropped on purpose
ended with a finish_reason (stop/length) and `data: [DONE]`; every invalid request got a 4xx with an
OpenAI error body (429 "busy" is counted apart and allowed); /health and a normal completion still
work; /metrics shows no KV blocks or sequences in use within ~10 s, and 499s for abandoned
non-streaming requests; and, for an own server, --max-queue concurrent requests are all admitted
(no leaked request slots) and SIGTERM stops it. Prints a summary (requests by outcome, tokens/s,
p50/p90 time to first token); exit status 1 if a check fails.
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

WORDS = ("the", "model", "server", "stream", "token", "cache", "block", "expert", "router", "attention", "window",
         "prompt", "reply", "fast", "slow", "quiet", "river", "stone", "cloud", "seven", "def", "return", "x", "=",
         "(", ")", "\n", "print", "hello", "world", "résumé", "数据")
FINISH_REASONS = ("stop", "length")
INVALID_KINDS = ("bad_json", "unknown_model", "negative_temperature", "huge_max_tokens", "wrong_type_input",
                 "wrong_type_max_tokens", "missing_input", "n_zero", "bad_logit_bias")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_REQUESTS_PER_CLIENT = 100_000
SETTLE_S = 10.0
TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=10.0, pool=60.0)
# Outcomes that pass; any other outcome fails the run.
PASSING = ("ok", "disconnected", "rejected", "busy")


@dataclass
class Target:
    base: str
    model: str
    headers: dict[str, str]


@dataclass
class Result:
    kind: str  # valid | disconnect | invalid
    endpoint: str  # chat | completions
    label: str  # sampling mode, or which invalid request
    outcome: str = "pending"
    status: int | None = None
    ttft_s: float | None = None
    tokens: int = 0
    detail: str = ""


# -- requests -----------------------------------------------------------------------------------------
def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 16)))


def valid_body(rng: random.Random, endpoint: str, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """A streaming request and its sampling mode: greedy, seeded sampling or unseeded sampling."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    mode = rng.choice(("greedy", "seeded", "seeded", "random"))
    if mode == "greedy":
        body["temperature"] = 0.0
    elif mode == "seeded":
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
    if endpoint == "chat":
        system = [{"role": "system", "content": _prompt(rng)}] if rng.random() < 0.3 else []
        body["messages"] = [*system, {"role": "user", "content": _prompt(rng)}]
    else:
        body["prompt"] = _prompt(rng)
    return mode, body


def invalid_request(rng: random.Random, endpoint: str, model: str) -> tuple[str, bytes]:
    """A request the server must refuse with a 4xx, and what is wrong with it."""
    _, body = valid_body(rng, endpoint, model, rng.randint(8, 64))
    kind = rng.choice(INVALID_KINDS)
    field = "messages" if endpoint == "chat" else "prompt"
    if kind == "bad_json":
        text = json.dumps(body)
        return kind, text[:rng.randint(1, len(text) - 1)].encode()
    if kind == "missing_input":
        del body[field]
    else:
        body.update({"unknown_model": {"model": "no-such-model"}, "negative_temperature": {"temperature": -1},
                     "huge_max_tokens": {"max_tokens": 10**9},
                     "wrong_type_input": {field: {"text": "hi"} if endpoint == "completions" else "hi"},
                     "wrong_type_max_tokens": {"max_tokens": "many"}, "n_zero": {"n": 0},
                     "bad_logit_bias": {"logit_bias": {"not-a-token": 1}}}[kind])
    return kind, json.dumps(body).encode()


def _is_openai_error(content: bytes) -> bool:
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def classify_refusal(result: Result, status: int, content: bytes) -> None:
    """Outcome of a non-200 answer: 429 is `busy`, a 4xx to an invalid request `rejected`."""
    result.status = status
    if status >= 500:
        result.outcome, result.detail = "server_error", content[:200].decode(errors="replace")
    elif not 400 <= status < 500:
        result.outcome, result.detail = "unexpected_status", content[:200].decode(errors="replace")
    elif not _is_openai_error(content):
        result.outcome, result.detail = "bad_error_body", content[:200].decode(errors="replace")
    elif status == 429:
        result.outcome = "busy"
    elif result.kind == "invalid":
        result.outcome = "rejected"
    else:
        result.outcome, result.detail = "unexpected_status", json.loads(content)["error"]["message"][:200]


async def send_invalid(client: httpx.AsyncClient, target: Target, result: Result, content: bytes) -> None:
    headers = {**target.headers, "Content-Type": "application/json"}
    r = await client.post(target.base + PATHS[result.endpoint], content=content, headers=headers)
    classify_refusal(result, r.status_code, r.content)
    if 200 <= r.status_code < 300:
        result.outcome, result.detail = "invalid_accepted", r.text[:200]


async def send_stream(client: httpx.AsyncClient, target: Target, result: Result, body: dict[str, Any],
                      hang_up_after: int | None) -> None:
    """Stream one request; with `hang_up_after`, drop the connection after that many events (0: right
    after the headers)."""
    start = time.perf_counter()
    async with client.stream("POST", target.base + PATHS[result.endpoint], json=body,
                             headers=target.headers) as r:
        if r.status_code != 200:
            classify_refusal(result, r.status_code, await r.aread())
            return
        result.status = 200
        if hang_up_after == 0:  # hang up as soon as the headers are in, likely before the first token
            result.outcome = "disconnected"
            return
        events, finish, done = 0, None, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if done or not line.startswith("data: "):
                result.outcome, result.detail = "incomplete", f"unexpected line {line[:100]!r}"
                return
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                result.outcome = "disconnected"
                return  # leaving the block closes the half-read connection
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.outcome, result.detail = "incomplete", f"error event {line[:200]}"
                return
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                delta = choice.get("delta") or {}
                text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
                if text and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
    if done and finish in FINISH_REASONS:
        result.outcome = "ok"
    else:
        result.outcome, result.detail = "incomplete", f"finish_reason={finish!r}, [DONE] seen: {done}"


async def send_and_cancel(client: httpx.AsyncClient, target: Target, result: Result, body: dict[str, Any],
                          after_s: float) -> None:
    """A non-streaming request whose client gives up after `after_s` seconds unless answered by then."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    try:
        r = await asyncio.wait_for(client.post(target.base + PATHS[result.endpoint], json=body,
                                               headers=target.headers), timeout=after_s)
    except TimeoutError:
        result.outcome = "disconnected"
        return
    if r.status_code != 200:
        classify_refusal(result, r.status_code, r.content)
        return
    reply = r.json()
    result.status, result.tokens = 200, reply["usage"]["completion_tokens"]
    finish = reply["choices"][0]["finish_reason"]
    result.outcome, result.detail = ("ok", "") if finish in FINISH_REASONS else ("incomplete", f"finish {finish!r}")


async def one_request(client: httpx.AsyncClient, target: Target, rng: random.Random, disconnect_share: float,
                      invalid_share: float) -> Result:
    endpoint = rng.choice(("chat", "completions"))
    draw = rng.random()
    if draw < invalid_share:
        kind, content = invalid_request(rng, endpoint, target.model)
        result = Result("invalid", endpoint, kind)
        send = send_invalid(client, target, result, content)
    elif draw < invalid_share + disconnect_share:
        mode, body = valid_body(rng, endpoint, target.model, rng.randint(32, 64))
        if rng.random() < 0.25:
            result = Result("disconnect", endpoint, f"{mode}/non-streaming")
            send = send_and_cancel(client, target, result, body, after_s=rng.uniform(0.0, 0.5))
        else:
            result = Result("disconnect", endpoint, mode)
            send = send_stream(client, target, result, body, hang_up_after=rng.randint(0, 12))
    else:
        mode, body = valid_body(rng, endpoint, target.model, rng.randint(8, 64))
        result = Result("valid", endpoint, mode)
        send = send_stream(client, target, result, body, hang_up_after=None)
    try:
        await send
    except httpx.TimeoutException as e:
        result.outcome, result.detail = "timeout", repr(e)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # transport errors, malformed events
        result.outcome, result.detail = "client_error", repr(e)
    return result


async def client_loop(client: httpx.AsyncClient, target: Target, rng: random.Random, deadline: float,
                      disconnect_share: float, invalid_share: float, results: list[Result]) -> None:
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        result = await one_request(client, target, rng, disconnect_share, invalid_share)
        results.append(result)
        if result.outcome == "busy":
            await asyncio.sleep(rng.uniform(0.1, 0.3))  # back off a little while the queue is full


# -- checks after the load ------------------------------------------------------------------------------
async def engine_load(client: httpx.AsyncClient, base: str) -> float:
    """KV blocks in use plus sequences running or waiting, from /metrics."""
    text = (await client.get(base + "/metrics")).text
    names = ("stepflash_kv_blocks_used", "stepflash_num_requests_running", "stepflash_num_requests_waiting")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(names))


async def responses_with_status(client: httpx.AsyncClient, base: str, status: int) -> float:
    """How many responses the server has answered with `status` so far, from /metrics."""
    text = (await client.get(base + "/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("stepflash_requests_total{") and f'status="{status}"' in line)


async def completion_ok(client: httpx.AsyncClient, target: Target) -> str | None:
    """None if a plain non-streaming completion succeeds, else what went wrong."""
    r = await client.post(target.base + "/v1/completions", headers=target.headers,
                          json={"model": target.model, "prompt": "hello", "max_tokens": 2})
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    finish = r.json()["choices"][0]["finish_reason"]
    return None if finish in FINISH_REASONS else f"finish_reason {finish!r}"


async def post_checks(client: httpx.AsyncClient, target: Target, max_queue: int | None, hang_ups: int,
                      aborted_before: float) -> list[str]:
    """`hang_ups`: non-streaming requests given up while in flight; `aborted_before`: 499s before the load."""
    failures = []
    health = await client.get(target.base + "/health")
    if health.status_code != 200:
        failures.append(f"/health answered {health.status_code} after the load")
    if (problem := await completion_ok(client, target)) is not None:
        failures.append(f"a normal completion after the load failed: {problem}")
    deadline = time.monotonic() + SETTLE_S
    while (load := await engine_load(client, target.base)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if load:
        failures.append(f"/metrics still shows {load:g} KV blocks + sequences in use {SETTLE_S:g} s after the load")
    # A few may finish before the server notices; none aborted means hang-ups are ignored.
    if hang_ups >= 10 and await responses_with_status(client, target.base, 499) == aborted_before:
        failures.append(f"none of {hang_ups} abandoned non-streaming requests was aborted (no 499 in /metrics)")
    if max_queue is not None:  # every slot must be free again: exactly max_queue requests fit at once
        problems = await asyncio.gather(*(completion_ok(client, target) for _ in range(max_queue)))
        refused = [p for p in problems if p is not None]
        if refused:
            failures.append(f"{len(refused)} of {max_queue} concurrent requests refused after the load "
                            f"(leaked request slots?): {refused[0]}")
    return failures


def run_failures(results: list[Result]) -> list[str]:
    failures = []
    by_outcome = Counter(r.outcome for r in results)
    for outcome, count in sorted(by_outcome.items()):
        if outcome not in PASSING:
            example = next(r for r in results if r.outcome == outcome)
            failures.append(f"{count} request(s) {outcome}, e.g. {example.kind}/{example.endpoint}/{example.label}: "
                            f"status {example.status}, {example.detail}")
    if not any(r.outcome == "ok" for r in results):
        failures.append("no valid request completed")
    return failures


# -- the server -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, model: str, api_key: str, max_queue: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "stepflash.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", model, "--api-key", api_key, "--max-queue", str(max_queue)]
    with log.open("wb") as out:  # a file, not a pipe: an undrained pipe would block the server's logging
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # the server compiles its steps first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not healthy within 300 s:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> float | None:
    """SIGTERM the server; seconds it took to exit, or None if it had to be killed after 30 s."""
    start = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        return None
    return time.monotonic() - start


# -- driver -----------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: int) -> float | None:
    """q-th percentile (q in 1..99), None without data."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: list[Result], elapsed: float) -> dict[str, Any]:
    ok = [r for r in results if r.outcome == "ok"]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "by_outcome": dict(Counter(r.outcome for r in results).most_common()),
            "by_kind": dict(Counter(r.kind for r in results).most_common()),
            "by_endpoint": dict(Counter(r.endpoint for r in results).most_common()),
            "completion_tokens": tokens, "tokens_per_s": tokens / elapsed, "requests_per_s": len(results) / elapsed,
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p90_s": _percentile(ttfts, 90), "elapsed_s": elapsed}


async def drive(target: Target, args: argparse.Namespace, max_queue: int | None) -> tuple[list[Result], float,
                                                                                            list[str]]:
    limits = httpx.Limits(max_connections=args.clients + max(max_queue or 0, 8), max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        results: list[Result] = []
        aborted_before = await responses_with_status(client, target.base, 499)
        start = time.monotonic()
        loops = [client_loop(client, target, random.Random(f"{args.seed}-{i}"), start + args.duration,
                             args.disconnect_share, args.invalid_share, results) for i in range(args.clients)]
        grace = 2 * TIMEOUT.read + 30
        try:
            await asyncio.wait_for(asyncio.gather(*loops), timeout=args.duration + grace)
        except TimeoutError:
            hung = [f"clients still busy {grace:g} s after the deadline (a hang?)"]
        else:
            hung = []
        elapsed = time.monotonic() - start
        hang_ups = sum(r.kind == "disconnect" and r.label.endswith("/non-streaming") and r.outcome == "disconnected"
                       for r in results)
        return results, elapsed, hung + await post_checks(client, target, max_queue, hang_ups, aborted_before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which requests start")
    parser.add_argument("--model", help="model directory for the server started here (default: tiny random)")
    parser.add_argument("--base-url", help="test this running server instead of starting one")
    parser.add_argument("--served-model-name", help="model id (default: tiny for an own server, else /v1/models)")
    parser.add_argument("--api-key", help="bearer token for --base-url")
    parser.add_argument("--max-queue", type=int, help="--max-queue of the server started here (default: 7/8 of "
                        "--clients, so that some requests get 429)")
    parser.add_argument("--disconnect-share", type=float, default=0.2)
    parser.add_argument("--invalid-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the summary and failures as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="stepflash-load-") as tmp:
        proc = None
        if args.base_url:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = args.served_model_name or httpx.get(args.base_url + "/v1/models", headers=headers,
                                                        timeout=10).json()["data"][0]["id"]
            target, max_queue = Target(args.base_url.rstrip("/"), model, headers), None
        else:
            if args.model:
                model_dir = Path(args.model)
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                from checkpoints import write_checkpoint
                from stepflash.train.configs import tiny_config

                model_dir = write_checkpoint(Path(tmp) / "tiny", tiny_config())
            api_key, model = secrets.token_hex(16), args.served_model_name or "tiny"
            max_queue = args.max_queue or max(1, args.clients * 7 // 8)
            proc, base = start_server(model_dir, model, api_key, max_queue, Path(tmp) / "server.log")
            target = Target(base, model, {"Authorization": f"Bearer {api_key}"})
        print(f"load: {args.clients} clients for {args.duration:g} s against {target.base} (model {target.model!r})",
              file=sys.stderr)
        try:
            results, elapsed, failures = asyncio.run(drive(target, args, max_queue))
        finally:
            shutdown_s = stop_server(proc) if proc is not None else None
        failures = run_failures(results) + failures
        if proc is not None and shutdown_s is None:
            failures.append("the server did not exit within 30 s of SIGTERM")
        if failures and proc is not None:
            print(f"server log tail:\n{(Path(tmp) / 'server.log').read_text()[-3000:]}", file=sys.stderr)

    summary = summarize(results, elapsed)
    ms = {k: f"{summary[k] * 1e3:.1f} ms" if summary[k] is not None else "n/a" for k in ("ttft_p50_s", "ttft_p90_s")}
    print(f"requests: {summary['requests']} ({summary['requests_per_s']:.1f}/s) "
          + ", ".join(f"{k} {v}" for k, v in summary["by_outcome"].items()))
    print(f"tokens: {summary['completion_tokens']} generated in {elapsed:.1f} s = {summary['tokens_per_s']:.1f} "
          f"tokens/s; TTFT p50 {ms['ttft_p50_s']}, p90 {ms['ttft_p90_s']}")
    if shutdown_s is not None:
        print(f"server shut down {shutdown_s:.1f} s after SIGTERM")
    print("checks: " + ("all passed" if not failures else "FAILED\n  " + "\n  ".join(failures)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "summary": summary, "shutdown_s": shutdown_s, "failures": failures,
                  "failed_requests": [asdict(r) for r in results if r.outcome not in PASSING][:50]}
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
