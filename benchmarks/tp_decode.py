"""Decode speed under tensor parallelism: tokens/s at TP=1 and TP=N (and TP=N with expert parallelism)
on the same checkpoint, in the same run, with the time rank 0 spends inside collectives per step
(all-reduces, logit gathers, plan broadcasts; waiting for the slower rank included), measured by
timing torch.distributed's calls in rank 0. Greedy outputs of every setting are checked equal to
TP=1's. Backend from the device: gloo on the CPU, NCCL on CUDA (one GPU per rank; the same script).

    python benchmarks/tp_decode.py [--model DIR | --random] [--tp 1,2] [--ep] [--batch 1,8] [--new-tokens 32]

On the CPU the ranks share the machine's cores: read the numbers as the cost of the communication,
not as a speed-up. Writes JSON to benchmarks/results/.
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stepflash import LLM, SamplingParams
from stepflash.train.configs import small_config
from record import write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import write_checkpoint  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "broadcast")


class CollectiveClock:
    """Wall time and count of rank 0's collective calls (synchronized on CUDA so the time is real)."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        for name in COLLECTIVES:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out
        return call

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def run(model: Path, tp: int, ep: bool, batch: int, new_tokens: int, clock: CollectiveClock) -> dict:
    llm = LLM(str(model), tensor_parallel_size=tp, enable_expert_parallel=ep, mtp=0,
              compile="off")  # eager at every size: compile is for one process only
    try:
        prompts = [[(7 * i + j) % 200 + 10 for j in range(16)] for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
        clock.reset()
        steps = llm.get_stats().num_steps
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        steps = llm.get_stats().num_steps - steps
    finally:
        llm.shutdown()
    return {"tp": tp, "ep": ep, "batch": batch, "tokens_per_s": batch * new_tokens / elapsed, "steps": steps,
            "step_ms": 1e3 * elapsed / steps, "comm_ms_per_step": 1e3 * clock.seconds / steps,
            "collectives_per_step": clock.calls / steps, "tokens": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--random", action="store_true", help="a random checkpoint of the 27M `small` layout")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--ep", action="store_true", help="also TP=N with expert parallelism")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = write_checkpoint(Path(tempfile.mkdtemp()) / "small", small_config(), seed=0)
    clock = CollectiveClock()
    rows = []
    for batch in map(int, args.batch.split(",")):
        for tp in map(int, args.tp.split(",")):
            for ep in ([False, True] if args.ep and tp > 1 else [False]):
                row = run(model, tp, ep, batch, args.new_tokens, clock)
                tp1 = [r for r in rows if r["batch"] == batch and r["tp"] == 1]
                if tp > 1 and tp1:
                    row["same_tokens_as_tp1"] = row["tokens"] == tp1[0]["tokens"]
                rows.append(row)
                print(f"batch {batch:3d} TP={tp}{'+EP' if ep else '   '}: {row['tokens_per_s']:8.1f} tokens/s, "
                      f"step {row['step_ms']:7.2f} ms, in collectives {row['comm_ms_per_step']:6.2f} ms "
                      f"({row['collectives_per_step']:.0f} calls)"
                      + ("" if "same_tokens_as_tp1" not in row else f", same tokens as TP=1: {row['same_tokens_as_tp1']}"))
    for row in rows:
        row.pop("tokens")
    write_record("tp_decode", f"tp_decode-{'cuda' if torch.cuda.is_available() else 'cpu'}", {
        "model": str(args.model or "random small (27M)"), "new_tokens": args.new_tokens, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
