"""End to end on a GPU: `LLM` at the real Step-3.5-Flash layer shapes (a few layers, random weights)
with the Triton kernels, CUDA graphs and MTP-3, against the same engine on the PyTorch path.

The checkpoint (hub format): 4 decoder layers (0: full attention + dense FFN; 1, 2: sliding + MoE;
3: full + MoE with the release's clamps) and 3 MTP modules at the published shapes (hidden 4096,
64/96 query heads, 8 KV heads of 128, window 512, dense FFN 11264, experts of 1280 top-8 + shared),
but with 16 routed experts of 288 and a 16384-token vocabulary of 128896, so that it is drawn (on the
GPU: the CPU's generator takes minutes at this size), written and loaded in seconds; the output says
so. Per dtype, greedy generation of a few prompts (one past the window) with kernels="torch" and with
kernels="triton", cuda_graphs="on", mtp=3 on both. The check is token equality in float32; in
bfloat16 the two paths round differently and a near-tie may flip, so agreement there is reported, not
required. tokens/s = generated tokens / wall time of `generate` (prefill included) after the same
`generate` as a warm-up (on CUDA); random MTP modules
draft almost nothing acceptable, so this is the mechanism's cost, not a trained model's speed.
Exit status 1 if float32 tokens differ or a run failed (the others still run).

    python benchmarks/gpu_e2e.py --out e2e.json
    TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --device cpu --tiny --dtypes float32   # dry run
"""

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepflash import LLM, SamplingParams
from stepflash.config import ModelConfig
from stepflash.train.configs import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # random checkpoints
from checkpoints import random_weights, write_byte_level_tokenizer  # noqa: E402
from gpu_decode import git_commit  # noqa: E402  (this folder)

REAL = dict(hidden_size=4096, head_dim=128, heads=64, other_heads=96, groups=8, experts=16, top_k=8,
            moe_inter=1280, dense_inter=11264, vocab=16384, window=512, prompts=(5, 200, 700, 1500), max_tokens=32)
TINY = dict(hidden_size=64, head_dim=16, heads=4, other_heads=6, groups=2, experts=8, top_k=2, moe_inter=32,
            dense_inter=96, vocab=512, window=16, prompts=(3, 20), max_tokens=2)


def config(d: dict) -> dict:
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    return tiny_config(
        vocab_size=d["vocab"], hidden_size=d["hidden_size"], intermediate_size=d["dense_inter"], num_hidden_layers=4,
        head_dim=d["head_dim"], num_attention_heads=d["heads"], num_attention_groups=d["groups"],
        attention_other_setting={"attention_type": "sliding_attention", "num_attention_heads": d["other_heads"],
                                 "num_attention_groups": d["groups"], "head_dim": d["head_dim"]},
        layer_types=types + ["sliding_attention"] * 3, sliding_window=d["window"],
        rope_theta=[5e6, 1e4, 1e4, 5e6] + [1e4] * 3, partial_rotary_factors=[0.5, 1.0, 1.0, 0.5] + [1.0] * 3,
        rope_scaling={"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                      "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        moe_num_experts=d["experts"], moe_top_k=d["top_k"], moe_intermediate_size=d["moe_inter"],
        share_expert_dim=d["moe_inter"], moe_layers_enum="1,2,3", swiglu_limits=[0.0, 0.0, 0.0, 7.0],
        swiglu_limits_shared=[0.0, 0.0, 0.0, 16.0])


def write_random(out: Path, cfg_dict: dict, dtype: torch.dtype, device: torch.device) -> Path:
    """A random hub-format checkpoint: `tests/checkpoints.random_weights`' tensors (names and shapes
    taken from it on the meta device, its scales restated here) drawn on `device` in `dtype`, the
    router in fp32 as released."""
    cfg = ModelConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        shapes = {name: w.shape for name, w in random_weights(cfg).items()}
    gen = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        std = (0.2 if name.endswith("norm.weight") else 0.3 if name.endswith("router_bias")
               else 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5)
        kind = torch.float32 if name.endswith(("moe.gate.weight", "router_bias")) else dtype
        w = torch.randn(shape, generator=gen, device=device, dtype=kind) * std
        tensors[name] = w.cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**cfg_dict, "torch_dtype": str(dtype).removeprefix("torch.")}))
    write_byte_level_tokenizer(out, cfg.vocab_size)
    return out


def run(ckpt: Path, prompts: list[list[int]], max_tokens: int, device: str, dtype: str, kernels: str) -> dict:
    start = time.perf_counter()
    graphs = "on" if kernels == "triton" else "off"
    llm = LLM(str(ckpt), device=device, dtype=dtype, mtp=3, kernels=kernels, cuda_graphs=graphs,
              max_num_seqs=len(prompts), max_model_len=4096, enable_prefix_caching=False,
              kv_cache_bytes=1 << 30 if device == "cuda" else 64 << 20)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if device == "cuda":  # warm-up: kernels compiled, graphs captured (on first use)
        llm.generate(prompts, params)
        sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    spec = [o.metrics.spec for o in outs]
    steps = sum(s.num_verify_steps for s in spec)
    tau = 1 + sum(s.num_accepted_tokens for s in spec) / steps if steps else None
    del llm, outs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": dtype, "kernels": kernels, "cuda_graphs": graphs, "mtp": 3, "load_s": load_s,
            "generated": sum(map(len, tokens)), "seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
            "tau": tau, "token_ids": tokens}


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Per prompt: the first position where the two greedy outputs differ (None: equal)."""
    firsts = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None if len(p) == len(q) else
                   min(len(p), len(q))) for p, q in zip(a, b)]
    return {"tokens_equal": all(f is None for f in firsts), "first_divergence": firsts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the code path")
    ap.add_argument("--out", type=Path, help="JSON path (rewritten after every run)")
    args = ap.parse_args()
    d = TINY if args.tiny else REAL
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, d["vocab"], (n,), generator=gen).tolist() for n in d["prompts"]]
    record = {"benchmark": "gpu_e2e", "date": datetime.date.today().isoformat(), "commit": git_commit(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "label": f"4 decoder layers + 3 MTP modules at {'tiny' if args.tiny else 'real'} shapes, "
                       f"{d['experts']} routed experts (release: 288), vocab {d['vocab']} (release: 128896), "
                       "random weights", "prompt_lengths": list(d["prompts"]), "max_tokens": d["max_tokens"],
              "runs": [], "checks": {}}
    failed = False

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(record, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ckpt = write_random(Path(tmp), config(d), torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        record["checkpoint_s"] = time.perf_counter() - start
        print(f"{record['label']}: checkpoint written in {record['checkpoint_s']:.1f} s")
        for dtype in args.dtypes.split(","):
            runs = {}
            for kernels in ("torch", "triton"):
                try:
                    runs[kernels] = r = run(ckpt, prompts, d["max_tokens"], device.type, dtype, kernels)
                except Exception as e:  # recorded; the other runs still give their numbers
                    traceback.print_exc()
                    record["runs"].append({"dtype": dtype, "kernels": kernels, "error": repr(e)})
                    save()
                    failed = True
                    continue
                record["runs"].append({k: v for k, v in r.items() if k != "token_ids"})
                print(f"{dtype:>8} {kernels:>6}{' + graphs' if kernels == 'triton' else '         '} mtp=3: "
                      f"{r['tokens_per_s']:.1f} tokens/s ({r['generated']} tokens in {r['seconds']:.2f} s, "
                      f"load {r['load_s']:.1f} s, tau {r['tau'] or float('nan'):.2f})")
                save()
            if len(runs) < 2:
                continue
            check = compare(runs["torch"]["token_ids"], runs["triton"]["token_ids"])
            check["required"] = dtype == "float32"
            check["speedup"] = runs["triton"]["tokens_per_s"] / runs["torch"]["tokens_per_s"]
            record["checks"][dtype] = check
            failed |= check["required"] and not check["tokens_equal"]
            print(f"{dtype:>8} greedy tokens equal: {check['tokens_equal']} (first divergence per prompt "
                  f"{check['first_divergence']}); kernels + graphs {check['speedup']:.2f}x the PyTorch path")
            save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
