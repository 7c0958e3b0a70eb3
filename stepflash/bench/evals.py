"""`stepflash eval`: answer quality and the speed of the same run, from user-provided task files.

Tasks (JSONL, one item per line):
- gsm8k: {"question", "answer" ending in "#### N"}; correct when the last number of the reply equals N.
- humaneval: {"task_id", "prompt", "test", "entry_point"}; the completion is cut at the first
  top-level statement after the function, then prompt + completion + test + check(entry_point) runs
  in a bubblewrap sandbox (see `sandbox.py`); pass@1 over greedy samples.
- jsonl: {"prompt", "answer", "scorer"?}; scorer "exact" (default, stripped), "contains", "prefix" (the
  reply starts with the answer, e.g. the next line of code) or "number".
"""

import asyncio
import json
import re
import sys
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
from stepflash.bench.sandbox import UNCONFINED, Limits, Sandbox, bubblewrap

TASKS = ("gsm8k", "humaneval", "jsonl")
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
UNSAFE_WARNING = ("model-written code runs WITHOUT a sandbox (--unsafe-no-sandbox): it can read and write your "
                  "files, use the network and leave processes running")


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


def run_program(source: str, sandbox: Sandbox | None = None, limits: Limits = Limits()) -> tuple[bool, str]:
    """Run untrusted `source` in `sandbox` (default: bubblewrap) and report (passed, reason)."""
    outcome = (sandbox or bubblewrap()).run(source, limits)
    if outcome.returncode is None:
        return False, "timeout"
    if outcome.returncode == 0:
        return True, "passed"
    lines = outcome.stderr.strip().splitlines()
    return False, lines[-1][:200] if lines else f"exit code {outcome.returncode}"


def score(item: Item, text: str, sandbox: Sandbox | None = None) -> tuple[bool, str]:
    if item.scorer == "program":
        body = cut_completion(text)
        return run_program(f"{item.prompt}{body}\n\n{item.test}\n\ncheck({item.entry_point})\n", sandbox)
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


async def evaluate(endpoint: Endpoint, items: list[Item], max_tokens: int, concurrency: int = 1,
                   sandbox: Sandbox | None = None) -> dict:
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
        correct, detail = score(item, text, sandbox) if trace.ok else (False, f"request failed: {trace.error}")
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


def code_sandbox(items: list[Item], unsafe_no_sandbox: bool) -> Sandbox | None:
    """Where the items' code runs (None: they run none); SandboxUnavailable before any request is sent."""
    if not any(item.scorer == "program" for item in items):
        return None
    if unsafe_no_sandbox:
        print(f"stepflash: warning: {UNSAFE_WARNING}", file=sys.stderr)
        return UNCONFINED
    return bubblewrap()


def run_eval(endpoint: Endpoint, task: str, data: Path, max_tokens: int, limit: int | None, concurrency: int,
             unsafe_no_sandbox: bool = False) -> dict:
    items = load_items(task, data, limit)
    sandbox = code_sandbox(items, unsafe_no_sandbox)
    result = asyncio.run(evaluate(endpoint, items, max_tokens, concurrency, sandbox))
    result.update(task=task, data=str(data), max_tokens=max_tokens, concurrency=concurrency,
                  endpoint={"base_url": endpoint.base_url, "model": endpoint.model, "chat": endpoint.chat},
                  sandbox=sandbox.name if sandbox else None,
                  warnings=[UNSAFE_WARNING] if sandbox is UNCONFINED else [],
                  date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    speed = result["speed"].get("output_speed_tok_s") or {}
    print(f"{task}: {result['correct']}/{result['items']} correct ({100 * result['accuracy']:.1f}%), "
          f"{result['failed_requests']} failed requests; {speed.get('median', float('nan')):.1f} tok/s per request "
          f"(median), {result['output_tokens_per_task'] or 0:.0f} output tokens per task")
    return result
