"""What serving costs over the offline engine, on the bundled model on the CPU: the same workload
offline (`LLM.generate`, at most `--concurrency` sequences at once), through `stepflash serve` (the
engine in a process of its own, as shipped) and through the same app with the engine's loop in a
thread of the server's process (`AsyncLLMEngine(in_process=True)`: how the server ran before
2026-11-28, sharing the GIL with the HTTP event loop). Prints output tokens/s of each and the ratio
to offline; the servers are loaded by `stepflash bench`'s client (completions, fixed output length,
greedy) from this process.

    python benchmarks/serve_overhead.py [--mtp 0] [--concurrency 1,16] [--num-requests 64]
                                        [--input-len 32] [--output-len 64] [--threads 1]
"""

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from stepflash import LLM, SamplingParams
from stepflash.bench.client import Endpoint
from stepflash.bench.load import PromptSource, Workload, run_workload
from stepflash.models import default_model_dir
from record import write_record

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, threads: int) -> Iterator[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def serve_in_thread(port: int, mtp: int, max_num_seqs: int) -> None:
    """The app with the engine's loop in a thread of this process (the peer)."""
    import uvicorn

    from stepflash.config import EngineConfig
    from stepflash.engine.front import AsyncLLMEngine
    from stepflash.server.app import create_app

    engine = AsyncLLMEngine(default_model_dir(), EngineConfig(mtp=mtp, max_num_seqs=max_num_seqs), in_process=True)
    try:
        uvicorn.run(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning")
    finally:
        engine.shutdown()


def measure_server(base: str, w: Workload, seed: int) -> float:
    endpoint = Endpoint(base, MODEL, chat=False)
    result = asyncio.run(run_workload(endpoint, w, PromptSource(seed=seed), seed, progress=False))
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed: {result['errors']}")
    return result["output_throughput"]


def measure_offline(llm: LLM, w: Workload, seed: int) -> float:
    source = PromptSource(seed=seed)
    prompts = [source.prompt(i, w.input_len) for i in range(w.num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # as the bench's warm-up request
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (its process or this one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-in-thread", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the peer's process
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.serve_in_thread:
        torch.set_num_threads(args.threads)
        serve_in_thread(args.serve_in_thread, args.mtp, max(concurrency))
        return
    torch.set_num_threads(args.threads)
    points = []
    llm = LLM(mtp=args.mtp, max_num_seqs=max(concurrency))
    servers = {
        "process": lambda port: [sys.executable, "-m", "stepflash.cli", "serve", "--port", str(port),
                                 "--served-model-name", MODEL, "--mtp", str(args.mtp),
                                 "--max-num-seqs", str(max(concurrency))],
        "thread": lambda port: [sys.executable, __file__, "--serve-in-thread", str(port), "--mtp", str(args.mtp),
                                "--threads", str(args.threads), "--concurrency", args.concurrency],
    }
    for c in concurrency:
        w = Workload("serve_overhead", input_len=args.input_len, output_len=args.output_len, concurrency=c,
                     num_requests=args.num_requests if c > 1 else max(8, args.num_requests // 8))
        llm.engine.scheduler.max_num_seqs = c  # offline: at most c sequences at once, as the clients allow
        point = {"concurrency": c, "num_requests": w.num_requests, "offline_tok_s": measure_offline(llm, w, args.seed)}
        for name, command in servers.items():
            port = free_port()
            with server(command(port), port, args.threads) as base:
                point[f"{name}_tok_s"] = measure_server(base, w, args.seed)
            point[f"{name}_vs_offline"] = round(point[f"{name}_tok_s"] / point["offline_tok_s"], 3)
        points.append(point)
        print(f"c={c:<3} offline {point['offline_tok_s']:7.1f} tok/s | served, engine in its own process "
              f"{point['process_tok_s']:7.1f} ({point['process_vs_offline']:.2f}x offline) | engine in the "
              f"server's thread {point['thread_tok_s']:7.1f} ({point['thread_vs_offline']:.2f}x)", flush=True)
    write_record("serve_overhead", f"serve_overhead-tiny-mtp{args.mtp}-t{args.threads}",
                 {"mtp": args.mtp, "input_len": args.input_len, "output_len": args.output_len, "points": points},
                 args.out)


if __name__ == "__main__":
    main()
