"""MTP speculative decoding on real code: acceptance (tau) per k and tokens/s against k = 0.

Prompts are windows of held-out Python standard-library files (the files `stepflash train` held out
when it trained the bundled model: the split is by path hash). For each batch size and each k, the
same prompts are decoded greedily; the script reports tau (tokens per verify step), acceptance per
draft position, decode tokens/s and its ratio to k = 0 measured in the same run, and what one step
costs: the target forward (1 + k rows per sequence) and the MTP pass (drafting), so that the gap
between tau and the speed-up is explained. Writes JSON to benchmarks/results/.

    python benchmarks/mtp.py [--model DIR] [--batch-sizes 1,4,16] [--mtp 0,1,2,3] [--max-tokens 128]
"""

import argparse
import sysconfig
import time
from collections import defaultdict
from pathlib import Path

import torch

from stepflash import LLM, SamplingParams
from stepflash.model.step3p5 import active_weight_bytes
from stepflash.models import default_model_dir
from stepflash.train.tokenizer import corpus_files
from stepflash.train.trainer import split_files
from record import write_record


def heldout_prompts(llm: LLM, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, each starting at a line of a different held-out stdlib file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _, heldout = split_files(corpus_files([stdlib], (".py",), ("site-packages",)), 0.05)
    prompts = []
    for path in heldout:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        start = sum(len(line) for line in lines[: len(lines) // 3])  # a third of the way in: code, not headers
        ids = llm.tokenizer.encode(text[start:], add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} held-out files have {length} tokens")


class StepTimer:
    """Wall time of the engine's target forwards and MTP passes (they run synchronously on CPU)."""

    def __init__(self, llm: LLM) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        engine = llm.engine
        self._wrap(engine.runner, "execute", "target forward")
        if engine.drafter is not None:
            self._wrap(engine.drafter, "propose", "MTP pass")

    def _wrap(self, obj: object, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def run_point(model: Path, prompts: list[list[int]], k: int, max_tokens: int) -> dict:
    llm = LLM(str(model), mtp=k, max_num_seqs=len(prompts), enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    timer = StepTimer(llm)
    spec_before = llm.get_stats().spec.num_verify_steps, llm.get_stats().spec.num_accepted_tokens
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    spec = llm.get_stats().spec
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    decode_tokens = tokens - len(outs)
    steps = timer.calls["target forward"]
    target_forwards_per_seq = (decode_tokens - (spec.num_accepted_tokens - spec_before[1])) / len(outs)
    return {
        "k": k, "batch": len(prompts), "output_tokens": tokens, "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "decode_tokens_per_s": decode_tokens / (last - first),
        "tau": spec.mean_accepted_length if k else 1.0,
        "acceptance_per_position": spec.acceptance_per_position,
        "verify_steps": spec.num_verify_steps - spec_before[0],
        "engine_steps": steps,
        "ms_per_step": {label: 1e3 * s / max(timer.calls[label], 1) for label, s in timer.seconds.items()},
        "ms_total": {label: 1e3 * s for label, s in timer.seconds.items()},
        "weight_gb_per_s": active_weight_bytes(llm.engine.model) * target_forwards_per_seq / (last - first) / 1e9,
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="hub-format model (default: the bundled model)")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--mtp", default="0,1,2,3")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model_dir()
    ks = [int(k) for k in args.mtp.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    probe = LLM(str(model), mtp=0, compile="off")  # its tokenizer only
    prompts = heldout_prompts(probe, max(batches), args.prompt_len)
    del probe
    results = []
    for batch in batches:
        base = None
        for k in ks:
            point = run_point(model, prompts[:batch], k, args.max_tokens)
            if k == 0:
                base = point
            else:
                point["speedup_vs_k0"] = point["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
                point["same_tokens_as_k0"] = point["outputs"] == base["outputs"] if base else None
            results.append(point)
            steps = ", ".join(f"{label} {ms:.1f} ms" for label, ms in point["ms_per_step"].items())
            ratio = f"  {point['speedup_vs_k0']:.2f}x vs k=0" if k and base else ""
            accept = " ".join(f"{100 * a:.0f}%" for a in point["acceptance_per_position"])
            print(f"batch {batch:>3} k={k}: {point['decode_tokens_per_s']:7.1f} tok/s{ratio}  tau {point['tau']:.2f} "
                  f"[{accept}]  {point['weight_gb_per_s']:.2f} GB/s  per step: {steps}", flush=True)
    for point in results:
        del point["outputs"]
    write_record("mtp", f"mtp-{Path(model).name}-t{args.threads}", {
        "model": str(model), "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "results": results},
        args.out_dir)


if __name__ == "__main__":
    main()
