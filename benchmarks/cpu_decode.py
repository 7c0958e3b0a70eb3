"""CPU decode speed: stepflash vs transformers on the same checkpoint, in the same run.

Peers: transformers `generate` (greedy) and a hand-written cached loop (DynamicCache, argmax), at
batch 1 and with 16 concurrent requests (transformers: one batch of 16 equal-length prompts).
stepflash runs once per MTP setting (`--mtp 0,3`: 0 = plain decoding; 3 = the default with the
bundled model's trained MTP modules) with the default settings: computing in fp32 like the peers
(dtype auto), its decode steps compiled (compile auto: on, on the CPU; each engine's first run is not
timed, and its time printed); and once more eagerly (`stepflash_mtp0_eager`, compile off) to show
what compiling gives. Prints
tokens/s, the ratio to each peer, achieved GFLOP/s (2 x active params per token) and GB/s of
weights read, and what a batch-1 step is made of (torch ops per token by the stepflash function that
calls them, and the ops' share of the profiled time); writes JSON to benchmarks/results/.

    python benchmarks/cpu_decode.py [--model DIR | --random] [--mtp 0,3] [--new-tokens 64] [--prompt-len 32]
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from stepflash import LLM, SamplingParams
from stepflash.model.step3p5 import active_weight_bytes
from stepflash.models import default_model_dir
from stepflash.train.configs import small_config
from record import write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # random checkpoints, the oracle
from checkpoints import write_checkpoint  # noqa: E402
from reference import transformers_causal_lm  # noqa: E402


def prompts_from_text(llm: LLM, count: int, length: int) -> list[list[int]]:
    """`count` distinct windows of real text (Python's own json/encoder.py), `length` tokens each."""
    source = Path(json.__file__).with_name("encoder.py").read_text()
    ids = llm.tokenizer.encode(source * 4)
    vocab = llm.engine.model_config.vocab_size
    ids = [t % vocab for t in ids]
    stride = max(1, (len(ids) - length) // count)
    return [ids[i * stride: i * stride + length] for i in range(count)]


def time_stepflash(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return elapsed


class OpCounter(TorchDispatchMode):
    """Counts the torch ops a run dispatches, by the innermost stepflash function calling each."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/stepflash/" in f.filename), None)
        self.calls[f"{Path(caller.filename).name}:{caller.name}" if caller else "other"] += 1
        return func(*args, **(kwargs or {}))


def step_profile(llm: LLM, eager: LLM, prompt: list[int], new_tokens: int) -> dict:
    """Batch 1 without speculation: torch ops per decoded token (prefill included, it is one step)
    by calling function, counted on the eager engine (a dispatch mode would turn torch.compile off
    for good in this process), and the share of profiled CPU time of the costliest ops as `llm`
    runs (compiled)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    with OpCounter() as counter:
        eager.generate([prompt], params)
    llm.generate([prompt], params)  # compiles what this run needs
    with profile() as prof:
        llm.generate([prompt], params)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {"ops_per_token": sum(counter.calls.values()) / new_tokens,
            "ops_per_token_by_function": {k: v / new_tokens for k, v in counter.calls.most_common(12)},
            "self_time_share": {e.key: e.self_cpu_time_total / total
                                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]}}


@torch.inference_mode()
def time_hf_generate(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


@torch.inference_mode()
def time_hf_loop(model, prompts: list[list[int]], new_tokens: int) -> float:
    """The leanest transformers decode: one prefill, then one cached forward per token."""
    from transformers import DynamicCache

    text_model, head = model.model.language_model, model.lm_head

    def run(ids: torch.Tensor, steps: int) -> None:
        cache = DynamicCache(config=text_model.config)
        hidden = text_model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        for _ in range(steps - 1):
            token = head(hidden[:, -1]).argmax(-1, keepdim=True)
            hidden = text_model(input_ids=token, past_key_values=cache, use_cache=True).last_hidden_state

    ids = torch.tensor(prompts)
    run(ids[:, :8], 4)  # warm-up
    start = time.perf_counter()
    run(ids, new_tokens)
    return time.perf_counter() - start


@torch.inference_mode()
def matmul_floor_seconds(model) -> float:
    """Seconds for one batch-1 token's weight matmuls alone (every linear of the decoder and head,
    top_k experts per MoE layer), in fp32 with this machine's BLAS: no engine reading fp32 weights
    decodes faster (stepflash keeps a bf16 checkpoint's experts in bf16: model/loader.py)."""
    from stepflash.model.moe import MoE

    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith("mtp.")]
    for m in model.modules():
        if isinstance(m, MoE):
            weights += [stack.weight[e].float() for stack in (m.gate_proj, m.up_proj, m.down_proj)
                        for e in range(model.config.moe_top_k)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def one_token() -> float:
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        return time.perf_counter() - start

    one_token()
    return statistics.median(one_token() for _ in range(20))


def copy_bandwidth_gbps(nbytes: int = 256 << 20) -> float:
    """This machine's memory bandwidth: a large copy, bytes read + written per second (median of 5)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def once() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return 2 * nbytes / (time.perf_counter() - start) / 1e9

    return statistics.median(once() for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub-format checkpoint (default: the bundled model)")
    parser.add_argument("--random", action="store_true", help="a random ~27M bench model instead (untrained MTP)")
    parser.add_argument("--mtp", default="0,3", help="stepflash's MTP settings to run")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        model_dir = write_checkpoint(Path(tempfile.mkdtemp()) / "bench", small_config())
    else:
        model_dir = Path(args.model) if args.model else default_model_dir()
    options = dict(device="cpu", max_num_seqs=64, max_num_batched_tokens=2048)
    llms = {f"stepflash_mtp{k}": LLM(str(model_dir), mtp=k, **options)
            for k in (int(m) for m in args.mtp.split(","))}
    llms["stepflash_mtp0_eager"] = LLM(str(model_dir), mtp=0, compile="off", **options)
    llm = next(iter(llms.values()))
    hf = transformers_causal_lm(model_dir)
    weight_bytes = active_weight_bytes(llm.engine.model)
    active_params = active_weight_bytes(llm.engine.model, per_param=1)
    ceiling = 1 / matmul_floor_seconds(llm.engine.model)
    copy_gbps = copy_bandwidth_gbps()
    plain = llms.get("stepflash_mtp0", llm)
    profiled = step_profile(plain, llms["stepflash_mtp0_eager"], prompts_from_text(plain, 1, args.prompt_len)[0],
                            args.new_tokens)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_from_text(llm, batch, args.prompt_len)
        tokens = batch * args.new_tokens
        runs = {name: (lambda x=x: time_stepflash(x, prompts, args.new_tokens)) for name, x in llms.items()}
        runs.update(hf_generate=lambda: time_hf_generate(hf, prompts, args.new_tokens),
                    hf_cached_loop=lambda: time_hf_loop(hf, prompts, args.new_tokens))
        first_run_s = {name: runs[name]() for name in llms}  # untimed: compiles what the timed runs need
        # interleaved repeats, median each: this machine is shared and noisy
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(run())
        tps = {name: tokens / statistics.median(v) for name, v in samples.items()}
        row = {"batch": batch, "new_tokens_per_request": args.new_tokens, "prompt_len": args.prompt_len,
               "tokens_per_s": tps, "first_run_s": first_run_s}
        for name in llms:
            row[f"{name}_vs_hf_generate"] = tps[name] / tps["hf_generate"]
            row[f"{name}_vs_hf_cached_loop"] = tps[name] / tps["hf_cached_loop"]
            row[f"{name}_weight_gbps"] = weight_bytes * tps[name] / batch / 1e9
        if batch == 1:
            row["matmul_ceiling_tokens_per_s"] = ceiling
            row["ceiling_ratio_vs_hf_generate"] = ceiling / tps["hf_generate"]
        rows.append(row)
    print(f"model: {model_dir}  active params/token: {active_params / 1e6:.1f}M  threads: {torch.get_num_threads()}")
    print(f"batch-1 ceiling from the weight matmuls alone: {ceiling:.1f} tokens/s "
          f"({4 * active_params * ceiling / 1e9:.1f} GB/s), i.e. at most {rows[0].get('ceiling_ratio_vs_hf_generate', 0):.2f}x "
          "transformers generate for any engine using this BLAS in fp32 without speculation")
    print(f"measured copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")
    print(f"a batch-1 step, eager: {profiled['ops_per_token']:.0f} torch ops per token; by caller: "
          + ", ".join(f"{k} {v:.0f}" for k, v in profiled["ops_per_token_by_function"].items()))
    print("share of profiled CPU time (compiled): " + ", ".join(f"{k} {v:.0%}" for k, v in profiled["self_time_share"].items()))
    print(f"{'batch':>5} {'engine':>20} {'tok/s':>8} {'x generate':>11} {'x loop':>7} {'GB/s':>6}")
    for r in rows:
        t = r["tokens_per_s"]
        for name in [*llms, "hf_generate", "hf_cached_loop"]:
            ratios = (f"{r[name + '_vs_hf_generate']:>11.2f} {r[name + '_vs_hf_cached_loop']:>7.2f} "
                      f"{r[name + '_weight_gbps']:>6.2f}" if name in llms else "")
            print(f"{r['batch']:>5} {name:>20} {t[name]:>8.1f} {ratios}")
        print("      first runs (compiling), s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["first_run_s"].items()))
    model_name = "bench27m" if args.random else model_dir.name
    write_record("cpu_decode", f"cpu_decode-{model_name}-t{torch.get_num_threads()}", {
        "platform": platform.platform(), "model": "random small_config()" if args.random else str(model_dir),
        "active_params": active_params, "repeats": args.repeats, "copy_bandwidth_gbps": copy_gbps, "results": rows,
        "profile_batch1_mtp0": profiled}, Path(args.out))


if __name__ == "__main__":
    main()
