"""Kernels alone at the real Step-3.5-Flash shapes, for a few tile sizes each: what their defaults
should be on this card. The routed experts (288 of 4096 x 1280, top 8) in each weight format, and the
FP8 linear at decode (1 and 4 rows) on the projections' shapes, beside PyTorch's bf16 GEMM of the
same shape (the peer).

One-pair kernels (decode: 1 and 8 tokens) with 8, 16 or 32 weight rows per program of 256 columns
(INT4 and FP8 at 1 token also 512 and 1024 columns: 2 and 4 scale blocks); grouped kernels (16
tokens) with tl.dot tiles of 32, 64 or 128. Each point: 8 calls on 8 sets of random
routes (distinct experts per token) replayed from one CUDA graph, the CUDA-event median of `--iters`
replays per call; achieved GB/s = the selected experts' bytes (weights and scales, each read once) /
time, and its fraction of the measured copy bandwidth. FP8 linear: tiles of 8, 16 or 32 output rows
x 128 inputs, 8 copies of the weight (one a call); bytes = the weight and its scales. The JSON is
rewritten after every point.

    python benchmarks/gpu_tiles.py --out tiles.json
    TRITON_INTERPRET=1 python benchmarks/gpu_tiles.py --device cpu --tiny   # a dry run of the code path
"""

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

import stepflash.kernels.moe as moe
from stepflash.kernels.fp8_linear import fp8_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import (FP8_BLOCK, copy_bandwidth, git_commit, graphed, quantize_experts,  # noqa: E402
                        quantize_fp8, time_ms)


def expert_weights(experts: int, hidden: int, inter: int, weights: str, device, dtype) -> tuple[list, dict]:
    """Random gate, up, down stacks in the format, and the fused_moe keywords that say it (INT4 in
    groups of 128, or fewer where a dimension is smaller: tiny shapes)."""
    dense = [torch.randn(experts, inter, hidden, device=device, dtype=dtype) * 0.02 for _ in range(2)]
    dense.append(torch.randn(experts, hidden, inter, device=device, dtype=dtype) * 0.02)
    group = math.gcd(128, hidden, inter)
    if weights == "bf16":
        return dense, {}
    stored, scales = zip(*(quantize_experts(w, weights, group) for w in dense))
    del dense
    if weights == "int4":
        return list(stored), {"int4_scales": scales, "group_size": group}
    return list(stored), {"fp8_scales": scales, "fp8_block": FP8_BLOCK}


def routes(tokens: int, experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(experts, device=device)[:top_k] for _ in range(tokens)])
    return ids, torch.rand(tokens, top_k, device=device)


def per_call_ms(calls: list, device, iters: int) -> float:
    """Device time per call of `calls` run back to back from one CUDA graph (as the engine's graphed
    steps run them: no host time in between). Each call reads other weights (other routes, or another
    copy), so none finds the last one's in L2 (60 MB on an H200: a layer's INT4 experts would fit)."""
    def run():
        for call in calls:
            call()

    return time_ms(graphed(run, device) or run, device, iters) / len(calls)


def selected_bytes(stored: list, kwargs: dict, ids: torch.Tensor) -> int:
    """Bytes of the distinct selected experts' weights and scales."""
    scales = kwargs.get("int4_scales") or kwargs.get("fp8_scales") or ()
    per_expert = sum(t[0].numel() * t.element_size() for t in [*stored, *scales])
    return ids.unique().numel() * per_expert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the code path")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    experts, hidden, inter, top_k = (16, 64, 32, 4) if args.tiny else (288, 4096, 1280, 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter has no bf16
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {"benchmark": "gpu_tiles", "commit": git_commit(), "device": name, "copy_gb_per_s": bandwidth,
              "shape": {"experts": experts, "hidden": hidden, "inter": inter, "top_k": top_k}, "results": []}
    print(f"device {name}; copy bandwidth {bandwidth or math.nan:.0f} GB/s; default tiles {moe.tile_sizes(device)}")
    copies = 1 if args.tiny else 8  # calls per timing, each on other weights (per_call_ms)
    one_pair = [moe.MoETiles(rows, 256, 64) for rows in (8, 16, 32)]
    # quantized: fewer bytes a row, so also tiles of 2 and 4 scale blocks a row (1 and 2 KB of INT4
    # a step for 16 rows of gate and up), timed right after the 256-column ones
    wide = [moe.MoETiles(rows, inner, 64) for rows, inner in ((16, 512), (32, 512), (16, 1024), (64, 256))]
    grouped = [moe.MoETiles(16, 256, edge) for edge in (32, 64, 128)]
    if args.tiny:  # the interpreter takes seconds a call
        one_pair, wide, grouped = one_pair[:1], [moe.MoETiles(16, 128, 64)], grouped[:1]
    for weights in ("int4", "fp8", "bf16"):
        stored, kwargs = expert_weights(experts, hidden, inter, weights, device, dtype)
        decode = one_pair + (wide if weights != "bf16" else [])
        # decode, a batch of 8, MTP-3 verify of 4 sequences
        points = [(1, decode), (16, grouped)] if args.tiny else [(1, decode), (8, one_pair), (16, grouped)]
        for tokens, configs in points:
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            for tiles in configs:
                moe.tile_sizes = lambda _device, tiles=tiles: tiles
                calls = [routes(tokens, experts, top_k, device) for _ in range(copies)]
                ms = per_call_ms([functools.partial(moe.fused_moe, x, *stored, ids, w, 0.0, **kwargs)
                                  for ids, w in calls], device, args.iters)
                nbytes = sum(selected_bytes(stored, kwargs, ids) for ids, _ in calls) / len(calls)
                gb_per_s = nbytes / (ms / 1e3) / 1e9
                point = {"kernel": "fused_moe", "weights": weights, "tokens": tokens, "rows": tiles.rows,
                         "inner": tiles.inner, "grouped": tiles.grouped, "ms": ms, "gb_per_s": gb_per_s,
                         "roofline_fraction": gb_per_s / bandwidth if bandwidth else None}
                record["results"].append(point)
                args.out.write_text(json.dumps(record, indent=1))
                print(f"{weights:>4} tokens {tokens:>3} tiles {tiles.rows}x{tiles.inner}/{tiles.grouped}: "
                      f"{ms * 1e3:8.1f} us, "
                      f"{gb_per_s:6.0f} GB/s ({100 * (point['roofline_fraction'] or math.nan):.0f}% of copy)")
        del stored, kwargs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fp8_linears(args, device, dtype, bandwidth, record, copies)
    return 0


def fp8_linears(args, device, dtype, bandwidth: float | None, record: dict, copies: int) -> None:
    """The FP8 linear at decode on the projections' shapes (full layer's q/k/v/g, sliding layer's
    o_proj, the shared expert's gate/up), tiles of 8/16/32 rows, and torch's bf16 GEMM as the peer;
    `copies` copies of each weight, one per call (per_call_ms)."""
    shapes = [(96, 64)] if args.tiny else [(10304, 4096), (4096, 12288), (2560, 4096)]
    for n, k in shapes:
        fp8 = [quantize_fp8(torch.randn(n, k, device=device, dtype=dtype), FP8_BLOCK) for _ in range(copies)]
        dense = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
        nbytes = fp8[0][0].numel() + fp8[0][1].numel() * fp8[0][1].element_size()
        for rows in (1,) if args.tiny else (1, 4):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            peer_ms = per_call_ms([functools.partial(torch.nn.functional.linear, x, w) for w in dense], device,
                                  args.iters)
            for block_n in (16,) if args.tiny else (8, 16, 32):
                ms = per_call_ms([functools.partial(fp8_linear, x, w, s, FP8_BLOCK, block_n=block_n) for w, s in fp8],
                                 device, args.iters)
                gb_per_s = nbytes / (ms / 1e3) / 1e9
                record["results"].append({"kernel": "fp8_linear", "n": n, "k": k, "rows": rows, "block_n": block_n,
                                          "ms": ms, "gb_per_s": gb_per_s,
                                          "roofline_fraction": gb_per_s / bandwidth if bandwidth else None,
                                          "bf16_torch_ms": peer_ms})
                args.out.write_text(json.dumps(record, indent=1))
                print(f"fp8_linear {n}x{k} rows {rows} block_n {block_n}: {ms * 1e3:7.1f} us, {gb_per_s:6.0f} GB/s "
                      f"({100 * (record['results'][-1]['roofline_fraction'] or math.nan):.0f}% of copy); "
                      f"torch bf16 GEMM {peer_ms * 1e3:.1f} us")


if __name__ == "__main__":
    raise SystemExit(main())
