"""`stepflash eval`: answer quality and the speed of the same run, from user-provided task files.

Tasks (JSONL, one item per line):
- gsm8k: {"question", "answer" ending in "#### N"}; correct when the last number of the reply equals N.
- humaneval: {"task_id", "prompt", "test", "entry_point"}; the completion is cut at the first
  top-level statement after the function, then prompt + completion + test + check(entry_point) runs
  in a subprocess (see `run_program`); pass@1 over greedy samples.
- jsonl: {"prompt", "answer", "scorer"?}; scorer "exact" (default, stripped), "contains", "prefix" (the
  reply starts with the answer, e.g. the next line of code) or "number".
"""

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from stepflash.bench.client import (
    Endpoint,
    fetch_spec_counters,
    request_body,
    spec_delta,
    stream_request,
)
from stepflash.bench.metrics import aggregate
from stepflash.bench.progress import Progress

TASKS = ("gsm8k", "humaneval", "jsonl")
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
NO_NETWORK = ("import socket\n"
              "def _no_network(*a, **k):\n    raise OSError('network access is disabled in stepflash eval')\n"
              "socket.socket = _no_network\nsocket.create_connection = _no_network\n")


@dataclass
class Item:
    item_id: str
    prompt: str
    reference: str
    scorer: str = "exact"
    test: str = ""
    entry_point: str = ""


def load_items(task: str, path: Path, limit: int | None = None) -> list[Item]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(_item(task, row, n))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a {task} item ({type(e).__name__}: {e})") from None
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _item(task: str, row: dict, n: int) -> Item:
    if task == "gsm8k":
        prompt = f"Question: {row['question']}\nAnswer: Let's think step by step."
        return Item(f"gsm8k/{n}", prompt, row["answer"].rsplit("####", 1)[1].strip(), "number")
    if task == "humaneval":
        return Item(row["task_id"], row["prompt"], "", "program", row["test"], row["entry_point"])
    return Item(str(row.get("id", n)), str(row["prompt"]), str(row["answer"]), row.get("scorer", "exact"))


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def cut_completion(completion: str) -> str:
    """The function body only: stop at the first line that starts a new top-level statement."""
    cut = len(completion)
    for stop in CODE_STOPS:
        index = completion.find(stop)
        if index >= 0:
            cut = min(cut, index)
    return completion[:cut]


def _limits(seconds: int, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    os.setsid()


def run_program(source: str, timeout: float = 10.0, memory_bytes: int = 1 << 30) -> tuple[bool, str]:
    """Run untrusted `source` in a fresh interpreter (isolated mode, empty environment, its own
    temporary directory, CPU / memory / file-size / open-file limits, sockets disabled) and report
    (passed, reason)."""
    with tempfile.TemporaryDirectory(prefix="stepflash-eval-") as work:
        program = Path(work) / "program.py"
        program.write_text(NO_NETWORK + source, encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-I", str(program)], cwd=work, capture_output=True,
                                  timeout=timeout, env={"PATH": "/usr/bin:/bin"},
                                  preexec_fn=lambda: _limits(int(timeout) + 1, memory_bytes))
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if proc.returncode == 0:
        return True, "passed"
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    return False, lines[-1][:200] if lines else f"exit code {proc.returncode}"


def score(item: Item, text: str) -> tuple[bool, str]:
    if item.scorer == "program":
        body = cut_completion(text)
        return run_program(f"{item.prompt}{body}\n\n{item.test}\n\ncheck({item.entry_point})\n")
    if item.scorer == "number":
        got = last_number(text)
        return got == last_number(item.reference), f"got {got}"
    if item.scorer == "contains":
        return item.reference.strip() in text, ""
    if item.scorer == "prefix":
        return text.startswith(item.reference), ""
    if item.scorer == "exact":
        return text.strip() == item.reference.strip(), ""
    raise ValueError(f"unknown scorer {item.scorer!r} (exact, contains, prefix, number)")


async def evaluate(endpoint: Endpoint, items: list[Item], max_tokens: int, concurrency: int = 1) -> dict:
    """Greedy answers for every item, scored, with the speed of the same requests."""
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:
        before = await fetch_spec_counters(client, endpoint)

        bar = Progress("eval", len(items))

        async def one(item: Item):
            async with semaphore:
                trace = await stream_request(client, endpoint, request_body(endpoint, item.prompt, max_tokens))
                bar.advance(failed=not trace.ok)
                return trace

        traces = await asyncio.gather(*(one(item) for item in items))
        after = await fetch_spec_counters(client, endpoint)
        bar.close()
    rows = []
    for item, trace in zip(items, traces):
        text = "".join(c.content for c in trace.chunks)
        correct, detail = score(item, text) if trace.ok else (False, f"request failed: {trace.error}")
        rows.append({"id": item.item_id, "correct": correct, "detail": detail, "output": text[:300],
                     "output_tokens": trace.completion_tokens, "seconds": trace.e2el if trace.chunks else None,
                     "failed": not trace.ok})
    speed = aggregate(list(traces))
    ok = [r for r in rows if not r["failed"]]
    return {
        "kind": "eval", "items": len(items), "correct": sum(r["correct"] for r in rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "failed_requests": len(rows) - len(ok),
        "output_tokens_per_task": sum(r["output_tokens"] for r in ok) / len(ok) if ok else None,
        "seconds_per_task": sum(r["seconds"] for r in ok) / len(ok) if ok else None,
        "speed": speed, "spec_decode": spec_delta(before, after), "results": rows,
    }


def run_eval(endpoint: Endpoint, task: str, data: Path, max_tokens: int, limit: int | None, concurrency: int) -> dict:
    items = load_items(task, data, limit)
    result = asyncio.run(evaluate(endpoint, items, max_tokens, concurrency))
    result.update(task=task, data=str(data), max_tokens=max_tokens, concurrency=concurrency,
                  endpoint={"base_url": endpoint.base_url, "model": endpoint.model, "chat": endpoint.chat},
                  date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    speed = result["speed"].get("output_speed_tok_s") or {}
    print(f"{task}: {result['correct']}/{result['items']} correct ({100 * result['accuracy']:.1f}%), "
          f"{result['failed_requests']} failed requests; {speed.get('median', float('nan')):.1f} tok/s per request "
          f"(median), {result['output_tokens_per_task'] or 0:.0f} output tokens per task")
    return result
