"""Host time per engine step: the whole step, the model's forwards inside it, and the rest (planning,
inputs, sampling, the readback, updates, detokenization), on the bundled model on the CPU.

Grid: batch 1/16/64 x MTP 0/3 x context 256/4K (the bundled model's longest). The prompts of a point
share all but their last 16 tokens (so one prefill serves them: the prefix cache), then every
sequence decodes `--steps` steps; only those decode steps are timed. Forward time is wall time
inside the model's forward calls (target, MTP modules, heads; compiled steps as the engine runs them,
by default), which on the CPU run synchronously; the host time's parts (packing and unpacking the
runner's inputs, planning, outputs) are printed after it. "wrap ms": the part of the forward time
that compiled steps spend outside their compiled graphs (dynamo's guards and input gathering,
inductor's wrapper): host work too, though inside the forward calls. "bytecodes": the Python
bytecodes a step executes (sys.settrace, on a few steps after the timed ones; C code not counted): a
count of the host's work that, unlike its time, a longer forward does not inflate (on this CPU the
same host work takes longer after a 4K-context forward, which streams more KV through the caches).
Targets (issue 14): host time <= 10% of the step everywhere, and within 10% between 256 and 4K.

    python benchmarks/step_overhead.py [--steps 24] [--batches 1,16,64] [--contexts 256,4096] [--threads 1]
        [--temperature 0.7 [--top-p 0.95]]  (sampled requests, seeded; greedy by default)
"""

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._inductor.output_code import CompiledFxGraph

from stepflash import LLM, SamplingParams
from stepflash.engine.sampler import Sampler
from record import write_record


class StepClock:
    """Wall time per part of a step, from methods patched on the engine's instances: "forward" (the
    runner's compiled steps, the model's eager forwards and heads) and the host parts the runner's
    inputs (pack, unpack), the scheduler (plan: schedule and update) and the outputs take. Also, for
    compiled steps, the time inside inductor's compiled graphs ("graph", patched on their class until
    `close`, counted inside those steps only): the rest of a compiled step's time ("compiled" -
    "graph") is host work inside the forward (dynamo's guards and input gathering, inductor's
    wrapper). "sample": the sampler's call (sampling and verifying the drafts, its compiled verify
    included, the readback), patched on its class like "graph"."""

    PARTS = [("pack", "runner", "_pack"), ("unpack", "runner", "_unpack"), ("plan", "scheduler", "schedule"),
             ("plan", "scheduler", "update"), ("output", "output", "process")]

    def __init__(self, engine) -> None:
        self.seconds: dict[str, float] = {"compiled": 0.0, "graph": 0.0}
        self.timing: set[str] = set()  # the parts being timed now
        runner = engine.runner
        for name in ("forward", "mtp_hidden", "compute_logits", "mtp_logits"):
            self._patch(runner.model, name, "forward")
        for step in runner.compiled:  # timed from outside: a clock inside would be traced
            if step.compiled:
                self._patch(step, "compiled", "forward", "compiled")
        for part, owner, name in self.PARTS:
            self._patch(getattr(engine, owner), name, part)
        self._graph_call, self._sample_call = CompiledFxGraph.__call__, Sampler.__call__
        self._patch(CompiledFxGraph, "__call__", "graph", within="compiled")
        self._patch(Sampler, "__call__", "sample")  # on the class: a call looks __call__ up there

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def close(self) -> None:
        CompiledFxGraph.__call__, Sampler.__call__ = self._graph_call, self._sample_call

    def _patch(self, owner, name: str, *parts: str, within: str | None = None) -> None:
        """Time `owner.name` into `parts` (only while `within` is being timed, if given)."""
        fn = getattr(owner, name)
        for part in parts:
            self.seconds.setdefault(part, 0.0)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            # traced into a compiled step (a recompile): no clock there
            if torch.compiler.is_compiling() or (within is not None and within not in self.timing):
                return fn(*args, **kwargs)
            start = time.perf_counter()
            self.timing.update(parts)
            try:
                return fn(*args, **kwargs)
            finally:
                self.timing.difference_update(parts)
                for part in parts:
                    self.seconds[part] += time.perf_counter() - start
        setattr(owner, name, run)


def bytecodes(step: Callable[[], object], steps: int = 8) -> int:
    """Median over `steps` calls of the Python bytecodes one call of `step` executes."""
    counts = []

    def on_call(frame, event, arg):
        frame.f_trace_opcodes = True
        return on_opcode

    def on_opcode(frame, event, arg):
        if event == "opcode":
            counts[-1] += 1
        return on_opcode

    for _ in range(steps):
        counts.append(0)
        sys.settrace(on_call)
        try:
            step()
        finally:
            sys.settrace(None)
    return int(statistics.median(counts))


def stdlib_tokens(llm: LLM, count: int) -> list[int]:
    text = "".join(p.read_text(errors="replace") for p in sorted(Path(json.__file__).parent.glob("*.py")))
    text += "".join(p.read_text(errors="replace") for p in sorted(Path(argparse.__file__).parent.glob("a*.py")))
    ids = llm.tokenizer.encode(text)
    return (ids * (count // len(ids) + 1))[:count]


def measure(mtp: int, batch: int, context: int, steps: int, tokens: list[int], temperature: float = 0.0,
            top_p: float = 1.0) -> dict:
    llm = LLM(mtp=mtp, max_num_seqs=max(batch, 1), max_num_batched_tokens=max(1024, 16 * batch))
    engine = llm.engine
    max_tokens = (steps + 13) * (1 + mtp) + 4
    length = min(context, engine.max_model_len - max_tokens)  # the context reached by the timed steps
    shared = tokens[:length - 16]
    prompts = [shared + tokens[context + 16 * i: context + 16 * (i + 1)] for i in range(batch)]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([shared + [tokens[0]]], SamplingParams(temperature=0.0, max_tokens=2))  # prefill the shared part
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    for _ in range(4):  # untimed decode steps: first verify shapes, and what they compile
        engine.step()
    clock = StepClock(engine)
    step_times, parts = [], []
    for _ in range(steps):
        clock.reset()
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
        parts.append(dict(clock.seconds))
    clock.close()
    host_bytecodes = bytecodes(engine.step)
    running = len(engine.scheduler.running)
    for i in range(batch):
        engine.abort_request(f"p{i}")
    step, forward = statistics.median(step_times), statistics.median(p["forward"] for p in parts)
    host_parts = {part: round(statistics.median(p[part] for p in parts) * 1e3, 3) for part in parts[0]
                  if part not in ("forward", "compiled", "graph")}
    wrapper = statistics.median(p["compiled"] - p["graph"] for p in parts)
    return {"mtp": mtp, "batch": batch, "context": context, "temperature": temperature, "top_p": top_p,
            "running": running,
            "step_ms": round(step * 1e3, 3), "forward_ms": round(forward * 1e3, 3),
            "host_ms": round((step - forward) * 1e3, 3), "host_share": round((step - forward) / step, 4),
            "host_parts_ms": host_parts,  # the rest of the host time: drafting's own work, the engine
            # inside forward_ms: compiled steps' time outside their graphs (dynamo, inductor's wrapper)
            "compiled_wrapper_ms": round(wrapper * 1e3, 3), "host_bytecodes": host_bytecodes,
            "tau": round(engine.output.spec.mean_accepted_length, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="256,4096")
    ap.add_argument("--mtp", default="0,3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="the decoding requests' (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="the decoding requests' (with --temperature)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.top_p < 1 and not args.temperature:
        ap.error("--top-p applies to sampled requests: give --temperature too (greedy requests ignore top-p)")
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    tokens = stdlib_tokens(LLM(mtp=0, max_num_seqs=1, compile="off"), max(contexts) + 16 * 70)
    rows = []
    print(f"{'mtp':>3} {'batch':>5} {'ctx':>5} {'step ms':>8} {'fwd ms':>8} {'host ms':>8} {'host %':>6} "
          f"{'wrap ms':>7} {'bytecodes':>9} {'tau':>5}  host parts, ms")
    for mtp in (int(m) for m in args.mtp.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for context in contexts:
                r = measure(mtp, batch, context, args.steps, tokens, args.temperature, args.top_p)
                rows.append(r)
                print(f"{mtp:>3} {batch:>5} {context:>5} {r['step_ms']:>8.2f} {r['forward_ms']:>8.2f} "
                      f"{r['host_ms']:>8.2f} {100 * r['host_share']:>5.1f}% {r['compiled_wrapper_ms']:>7.2f} "
                      f"{r['host_bytecodes']:>9} "
                      f"{r['tau']:>5.2f}  "
                      + " ".join(f"{part} {ms:.2f}" for part, ms in r["host_parts_ms"].items()), flush=True)
    sampled = f"-temp{args.temperature:g}" if args.temperature else ""
    sampled += f"-top_p{args.top_p:g}" if args.temperature and args.top_p < 1 else ""
    write_record("step_overhead", f"step_overhead-tiny-t{args.threads}{sampled}", {"steps": args.steps, "points": rows},
                 args.out)


if __name__ == "__main__":
    main()
