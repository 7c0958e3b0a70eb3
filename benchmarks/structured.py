"""Decode speed with and without a JSON schema on the bundled model, and the host time spent on grammar
masks (llguidance fills + the walk over drafts) per step.

Each point decodes `--tokens` tokens per sequence from a raw prompt (no reasoning), the same prompt for
every sequence (different seeds), at temperature 1; the schema is an array of at least 1000 small
records, so a constrained reply runs to max_tokens as an unconstrained one does (ignore_eos). Target (issue 15): at most 10%
slower at batch 16.

    python benchmarks/structured.py [--batches 1,16] [--tokens 64] [--mtp 0] [--threads 1]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from stepflash import LLM, SamplingParams
from stepflash.sampling import StructuredOutputsParams
from record import write_record

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer"}, "tag": {"enum": ["a", "b", "c"]}, "note": {"type": "string"}},
    "required": ["id", "tag", "note"], "additionalProperties": False}, "minItems": 1000}


class MaskClock:
    """Wall time inside the engine's mask building (patched on the instance)."""

    def __init__(self, structured) -> None:
        self.seconds, self.calls = 0.0, 0
        bitmask = structured.bitmask

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return bitmask(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        structured.bitmask = timed


def measure(llm: LLM, batch: int, tokens: int, schema: dict | None) -> dict:
    spec = StructuredOutputsParams(json=schema) if schema else None
    params = [SamplingParams(temperature=1.0, max_tokens=tokens, seed=i, ignore_eos=spec is None,
                             structured_outputs=spec) for i in range(batch)]
    llm.generate(["def f(x):"], params[:1])  # warm: prefix cache, grammar cache, first-call costs
    clock = MaskClock(llm.engine.structured)
    steps = llm.engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(["def f(x):"] * batch, params)
    seconds = time.perf_counter() - start
    steps = llm.engine.num_steps - steps
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"batch": batch, "schema": bool(schema), "tokens": generated, "seconds": round(seconds, 3),
            "tokens_per_s": round(generated / seconds, 1), "steps": steps,
            "ms_per_step": round(1e3 * seconds / steps, 2),
            "mask_ms_per_step": round(1e3 * clock.seconds / steps, 3) if schema else 0.0,
            "finished_early": sum(o.outputs[0].finish_reason != "length" for o in outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(mtp=args.mtp, max_num_seqs=max(int(b) for b in args.batches.split(",")))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        plain, constrained = (measure(llm, batch, args.tokens, s) for s in (None, SCHEMA))
        for row in (plain, constrained):
            print(json.dumps(row))
        rows += [plain, constrained]
        print(f"batch {batch}: {constrained['tokens_per_s'] / plain['tokens_per_s']:.2f}x the unconstrained tokens/s, "
              f"masks {constrained['mask_ms_per_step']} ms of {constrained['ms_per_step']} ms per step")
    write_record("structured", f"structured-tiny-t{args.threads}-mtp{args.mtp}", {"mtp": args.mtp, "rows": rows},
                 args.out)


if __name__ == "__main__":
    main()
