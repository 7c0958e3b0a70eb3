"""`stepflash bench`: workloads of real text against an OpenAI-compatible endpoint, one result per point.

Prompts are real text, never random token ids (speculative decoding must be measured on text it can
predict): windows of a text corpus (default: the Python standard library's source) or prompts from a
JSONL / ShareGPT file. Every prompt starts with a tag unique to its run and request, so prefix caches
do not flatter, neither within a run nor across runs against a warm server (`seed` makes the tags,
and so the prompts, repeatable). Input lengths are targeted in characters (~`CHARS_PER_TOKEN` per token); the reported
token counts are the server's `usage`.
"""

import asyncio
import json
import platform
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np

from stepflash.bench.client import (
    Endpoint,
    fetch_spec_counters,
    request_body,
    spec_delta,
    stream_request,
)
from stepflash.bench.metrics import RequestTrace, aggregate
from stepflash.bench.progress import Progress

CHARS_PER_TOKEN = 3.5


@dataclass
class Workload:
    name: str
    input_len: int = 1024  # tokens, approximately (see CHARS_PER_TOKEN)
    output_len: int = 128
    range_ratio: float = 0.0  # lengths uniform in [L(1-r), L(1+r)] (vLLM random)
    concurrency: int = 1  # requests in flight at most
    request_rate: float | None = None  # requests/s with gamma arrivals; None: as fast as concurrency allows
    burstiness: float = 1.0  # gamma shape (1 = Poisson)
    num_requests: int = 10
    duration: float | None = None  # seconds: keep sending until then (overrides num_requests)
    warmup: int = 1  # requests before measuring, excluded
    fixed_length: bool = True  # ask the server to ignore EOS so outputs have output_len tokens
    temperature: float = 0.0


PRESETS = {
    "aa-1k": Workload("aa-1k", input_len=1000, output_len=1000),
    "aa-1k-parallel": Workload("aa-1k-parallel", input_len=1000, output_len=1000, concurrency=10, num_requests=20),
    "aa-10k": Workload("aa-10k", input_len=10000, output_len=1500),
    "aa-100k": Workload("aa-100k", input_len=100000, output_len=2000, num_requests=3),
    "random": Workload("random", input_len=1024, output_len=128, num_requests=50),
}


class PromptSource:
    """Prompts cut from a text corpus, or taken from a JSONL file (`prompt` field, or the first human
    turn of a ShareGPT `conversations` list)."""

    def __init__(self, corpus: list[Path] | None = None, dataset: Path | None = None, seed: int | None = None
                 ) -> None:
        self.rng = random.Random(seed)  # None: seeded from the OS, so every run's prompts differ
        self.dataset = _read_dataset(dataset) if dataset else None
        if self.dataset is None:
            files = corpus or sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
            self.text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
            if len(self.text) < 1000:
                raise ValueError("the prompt corpus has less than 1000 characters of text")

    def prompt(self, index: int, input_len: int) -> str:
        if self.dataset is not None:
            return f"[request {index}-{self.rng.getrandbits(48):012x}]\n" + self.dataset[index % len(self.dataset)]
        tag = f"# request {index}-{self.rng.getrandbits(48):012x}: continue this code\n"
        chars = max(1, int(input_len * CHARS_PER_TOKEN) - len(tag))
        start = self.rng.randrange(0, max(1, len(self.text) - chars))
        body = (self.text * (1 + chars // len(self.text)))[start:start + chars]
        return tag + body


def _read_dataset(path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if "prompt" in item:
            prompts.append(str(item["prompt"]))
        elif "conversations" in item:
            human = next((t["value"] for t in item["conversations"] if t.get("from") in ("human", "user")), None)
            if human:
                prompts.append(human)
        else:
            raise ValueError(f"{path}:{n}: needs a 'prompt' or a ShareGPT 'conversations' field")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _lengths(w: Workload, rng: random.Random) -> tuple[int, int]:
    def pick(length: int) -> int:
        lo, hi = max(1, int(length * (1 - w.range_ratio))), max(1, int(length * (1 + w.range_ratio)))
        return rng.randint(lo, hi)

    return pick(w.input_len), pick(w.output_len)


async def run_workload(endpoint: Endpoint, w: Workload, source: PromptSource, seed: int = 0,
                       slo: dict[str, float] | None = None, progress: bool = True) -> dict:
    rng = random.Random(seed)
    arrivals = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=w.concurrency + 4, max_keepalive_connections=w.concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        for i in range(w.warmup):
            await stream_request(client, endpoint, request_body(endpoint, source.prompt(-1 - i, 64), 8))
        before = await fetch_spec_counters(client, endpoint)
        semaphore = asyncio.Semaphore(w.concurrency)
        tasks: list[asyncio.Task] = []
        bar = Progress(w.name, w.num_requests if w.duration is None else None, progress)

        async def one(index: int) -> RequestTrace:
            async with semaphore:
                input_len, output_len = _lengths(w, rng)
                body = request_body(endpoint, source.prompt(index, input_len), output_len, w.fixed_length,
                                    w.temperature)
                trace = await stream_request(client, endpoint, body)
                bar.advance(failed=not trace.ok)
                return trace

        start = time.perf_counter()
        index = 0
        while (index < w.num_requests) if w.duration is None else (time.perf_counter() - start < w.duration):
            if w.duration is not None and w.request_rate is None:
                while sum(not t.done() for t in tasks) >= w.concurrency and time.perf_counter() - start < w.duration:
                    await asyncio.sleep(0.01)
                if time.perf_counter() - start >= w.duration:
                    break
            tasks.append(asyncio.create_task(one(index)))
            index += 1
            if w.request_rate is not None:
                await asyncio.sleep(arrivals.gamma(w.burstiness, 1.0 / (w.request_rate * w.burstiness)))
            else:
                await asyncio.sleep(0)
        traces = list(await asyncio.gather(*tasks))
        after = await fetch_spec_counters(client, endpoint)
    bar.close()
    result = aggregate(traces, slo)
    result["spec_decode"] = spec_delta(before, after)
    result["workload"] = asdict(w)
    return result


def run_bench(endpoint: Endpoint, workloads: list[Workload], source: PromptSource, slo: dict[str, float] | None,
              seed: int | None = None) -> list[dict]:
    """Run each workload point in turn; each result carries its configuration and environment."""
    results = []
    for w in workloads:
        result = asyncio.run(run_workload(endpoint, w, source, 0 if seed is None else seed, slo))
        result.update(endpoint={"base_url": endpoint.base_url, "model": endpoint.model, "chat": endpoint.chat},
                      seed=seed,
                      environment={"python": platform.python_version(), "platform": platform.platform(),
                                   "date": time.strftime("%Y-%m-%dT%H:%M:%S")},
                      kind="bench")
        results.append(result)
        print(summary_line(result))
    return results


def summary_line(result: dict) -> str:
    w = result["workload"]
    if not result["completed"]:
        return f"{w['name']} c={w['concurrency']}: all {result['failed']} requests failed: {result['errors']}"
    speed = result["output_speed_tok_s"]["median"] if result["output_speed_tok_s"] else float("nan")
    spec = result.get("spec_decode") or {}
    tau = f", MTP tau {spec['tau']:.2f}" if spec.get("tau") else ""
    if result.get("prefix_cache_hit_rate") is not None:
        tau += f", prefix cache hits {100 * result['prefix_cache_hit_rate']:.0f}%"
    return (f"{w['name']} c={w['concurrency']} in~{w['input_len']} out={w['output_len']}: {result['completed']} ok, "
            f"{result['failed']} failed; output {result['output_throughput']:.1f} tok/s total, "
            f"{speed:.1f} tok/s per request (AA speed, median); TTFT p50 {1e3 * result['ttft_s']['median']:.0f} ms"
            f"{tau}")


def sweep(base: Workload, concurrency: list[int] | None, input_lens: list[int] | None) -> list[Workload]:
    points = [base]
    if concurrency:
        points = [replace(p, concurrency=c) for p in points for c in concurrency]
    if input_lens:
        points = [replace(p, input_len=n) for p in points for n in input_lens]
    return points
