"""Decode step time at the real Step-3.5-Flash shape on one GPU, with the Triton kernels.

Builds the first N decoder layers at the published shape (hidden 4096, 288 experts top-8 of 1280,
64/96 query heads, 8 KV heads of 128, window 512; full attention on every 4th layer from 0, the rest
sliding; every layer MoE, except with all 45 layers, which take the release's layout: dense FFNs on
layers 0-2, clamps on 43-44) with random bf16 weights, a paged KV cache already holding `context`
tokens per sequence, and runs one decode step (and MTP verify steps of 1 + k rows per sequence)
through the model's own layer code with attention = `kernels.paged_attention` and routed experts =
`kernels.fused_moe`. First it checks the kernel path against the PyTorch path on the same inputs.
Times are CUDA-event medians, eager and (where capture works) in a CUDA graph, with the PyTorch path
(the kernels' twins) timed on the same inputs as the peer at the first context only (it is slow).
Per-layer times are extrapolated to the 45 layers (12 full, 33 sliding; the lm_head is timed for the
MTP projection only), printed as an extrapolation unless all 45 were built; achieved GB/s = bytes a
step must read (weights of the experts actually selected, KV) / time, next to the measured copy
bandwidth: `roofline_fraction` = achieved / copy GB/s. The JSON is rewritten after every point, so a
run stopped at its time limit keeps what it measured.

    python benchmarks/gpu_decode.py [--layers 4] [--batch 1,8,32] [--context 1024,32768,131072] [--tau 3.5]
    TRITON_INTERPRET=1 python benchmarks/gpu_decode.py --device cpu --tiny   # a dry run of the code path
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
from torch import nn

from stepflash.config import ModelConfig
from stepflash.kernels.rope_kv import rope_kv_write, rope_kv_write_ref
from stepflash.kernels.tiles import prefill_tiles
from stepflash.kernels.paged_attention import paged_attention, paged_attention_ref
from stepflash.model.linear import Fp8Linear
from stepflash.model.loader import FP32_PARAMS
from stepflash.model.quant import quantize_int4
from stepflash.model.step3p5 import DecoderLayer, rope_tables
from stepflash.model.step3p5 import use_kernels as set_kernels
from stepflash.train.configs import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # random FP8 weights
from checkpoints import quantize_fp8  # noqa: E402

BLOCK = 16


def real_config(layers: int, tiny: bool) -> dict:
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    release = layers == 45  # the whole model: dense layers 0-2 and the clamps of layers 43-44
    moe = range(3, layers) if release else range(layers)
    limits = [7.0 if release and i >= 43 else 0.0 for i in range(layers)]
    if tiny:
        dims = dict(hidden_size=64, head_dim=16, num_attention_heads=8, other_heads=12, experts=16, top_k=4,
                    moe_inter=32, dense_inter=96, vocab=512, window=16)
    else:
        dims = dict(hidden_size=4096, head_dim=128, num_attention_heads=64, other_heads=96, experts=288, top_k=8,
                    moe_inter=1280, dense_inter=11264, vocab=128896, window=512)
    return tiny_config(
        vocab_size=dims["vocab"], hidden_size=dims["hidden_size"], intermediate_size=dims["dense_inter"],
        num_hidden_layers=layers, head_dim=dims["head_dim"], num_attention_heads=dims["num_attention_heads"],
        num_attention_groups=8 if not tiny else 4,
        attention_other_setting={"attention_type": "sliding_attention", "num_attention_heads": dims["other_heads"],
                                 "num_attention_groups": 8 if not tiny else 4, "head_dim": dims["head_dim"]},
        layer_types=types, sliding_window=dims["window"],
        rope_theta=[5e6 if t == "full_attention" else 1e4 for t in types],
        partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in types], rope_scaling=None,
        moe_num_experts=dims["experts"], moe_top_k=dims["top_k"], moe_intermediate_size=dims["moe_inter"],
        share_expert_dim=dims["moe_inter"], moe_layers_enum=",".join(map(str, moe)), swiglu_limits=limits,
        swiglu_limits_shared=[16.0 if x else 0.0 for x in limits], num_nextn_predict_layers=0)


class KernelContext:
    """Paged attention through the Triton kernel: writes this step's K/V at their slots, then attends."""

    def __init__(self, caches, tables, slots, seq_of, q_pos, tiles, tile_rows):
        self.caches, self.tables, self.slots, self.seq_of, self.q_pos = caches, tables, slots, seq_of, q_pos
        self.tiles, self.tile_rows = tiles, tile_rows  # a verify step's rows attend as one tile
        # int32 rows and whole tables, as the engine sends them: no casts or zeros in a timed step
        self.first_block = torch.zeros(tables[next(iter(tables))].shape[0], dtype=torch.int32, device=q_pos.device)
        self.use_kernel = True

    def attend(self, layer, q, k, v, positions, rope, window, gate, norms):
        write = rope_kv_write if self.use_kernel else rope_kv_write_ref
        q = write(q, k, v, *rope, *self.caches[layer], self.slots[layer], norms)
        if self.use_kernel:
            return paged_attention(q, *self.caches[layer], self.tables[layer], self.seq_of, self.q_pos, window, gate,
                                   tiles=self.tiles, tile_rows=self.tile_rows, first_block=self.first_block)
        return paged_attention_ref(q, *self.caches[layer], self.tables[layer], self.seq_of, self.q_pos, window, gate)


FP8_BLOCK = (128, 128)
EXPERT_CHUNK = 32  # experts quantized at a time: bounds the fp32 temporaries


def quantize_experts(stack: torch.Tensor, weights: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [E, out, in] -> (INT4 packed in groups of `group`, scales in the stack's
    dtype) or (FP8, block scales), EXPERT_CHUNK experts at a time."""
    chunks = [stack[e:e + EXPERT_CHUNK] for e in range(0, stack.shape[0], EXPERT_CHUNK)]
    if weights == "int4":
        packed, scales = zip(*(quantize_int4(c, group) for c in chunks))
        return torch.cat(packed), torch.cat(scales).to(stack.dtype)
    fp8, scales = zip(*(quantize_fp8(c, FP8_BLOCK) for c in chunks))
    return torch.cat(fp8), torch.cat(scales)


def quantize_layer(layer: DecoderLayer, weights: str) -> None:
    """Routed experts kept in INT4 (groups of 128, as `stepflash quantize` stores them) or FP8; with
    fp8, every other nn.Linear but the router too (the release keeps the small head gate in bf16:
    here it goes to FP8 with the rest, packed with q/k/v or not; a negligible difference in bytes)."""
    if weights == "bf16":
        return
    moe = getattr(layer, "moe", None)  # dense layers (0-2 of the release) have an MLP instead
    experts = (moe.gate_proj, moe.up_proj, moe.down_proj) if moe else ()
    group = math.gcd(128, *(m.weight.shape[-1] for m in experts)) if experts else 0  # one size, as on disk
    with torch.no_grad():
        for m in experts:
            stored, scales = quantize_experts(m.weight, weights, group)
            m.keep_int4(stored, scales, group) if weights == "int4" else m.keep_fp8(stored, scales, FP8_BLOCK)
        if weights == "fp8":
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear) and not (moe and child is moe.gate):
                        setattr(parent, name, Fp8Linear(*quantize_fp8(child.weight, FP8_BLOCK), FP8_BLOCK))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(cfg: ModelConfig, device, dtype, weights: str, seed: int = 0) -> list[DecoderLayer]:
    torch.manual_seed(seed)
    layers = []
    default = torch.get_default_dtype()
    for spec in cfg.decoder_layers:
        torch.set_default_dtype(dtype)  # allocate in bf16 on the device: fp32 experts would not fit
        try:
            with torch.device(device):
                layer = DecoderLayer(spec, cfg)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
                if f".{name}".endswith(FP32_PARAMS):  # the router in fp32, as the loader keeps it
                    p.data = p.data.float()
        quantize_layer(layer, weights)
        layers.append(layer)
    return layers


def use_kernels(layers: list[DecoderLayer], ctx: "KernelContext", on: bool) -> None:
    """Attention, rotary + KV write, residual + norm and routed experts through the Triton kernels
    (on) or the PyTorch paths (off)."""
    ctx.use_kernel = on
    for layer in layers:
        set_kernels(layer, on)


def make_context(cfg: ModelConfig, batch: int, context: int, rows_per_seq: int, device, dtype) -> KernelContext:
    """Caches holding `context` tokens per sequence (full layers: all of them; sliding: the window)."""
    caches, tables, slots = {}, {}, {}
    total = context + rows_per_seq
    width = math.ceil(total / BLOCK)
    for spec in cfg.decoder_layers:
        if spec.sliding_window:
            per_seq = math.ceil((cfg.sliding_window + rows_per_seq) / BLOCK) + 1
            table = torch.zeros(batch, width, dtype=torch.int32)  # positions before the window: never read
            n = min(per_seq, width)
            for b in range(batch):
                table[b, width - n:] = torch.arange(b * per_seq, b * per_seq + n)
            blocks = batch * per_seq
        else:
            table = torch.arange(batch * width, dtype=torch.int32).view(batch, width)
            blocks = batch * width
        shape = (blocks, BLOCK, spec.num_kv_heads, spec.head_dim)
        caches[spec.index] = (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
        tables[spec.index] = table.to(device)
        pos = torch.arange(context, total)
        slots[spec.index] = torch.cat([table[b, pos // BLOCK].long() * BLOCK + pos % BLOCK for b in range(batch)]).to(device)
    seq_of = torch.arange(batch, dtype=torch.int32).repeat_interleave(rows_per_seq)
    q_pos = torch.arange(context, total, dtype=torch.int32).repeat(batch).to(device)
    tile_rows = triton.next_power_of_2(rows_per_seq)
    return KernelContext(caches, tables, slots, seq_of.to(device), q_pos,
                         prefill_tiles(seq_of.tolist(), tile_rows).to(device), tile_rows)


def step_fn(layers, cfg, ctx, x):
    positions = ctx.q_pos.long()
    rope = rope_tables(cfg.decoder_layers, positions)

    def run():
        h, delta = x, None
        for layer in layers:
            h, delta = layer(h, delta, positions, rope, ctx)
        return h + delta

    return run


def time_ms(fn, device, iters: int) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graphed(fn, device):
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as e:  # report and go on eager
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e})")
        return None


def step_bytes(cfg: ModelConfig, layers, batch: int, context: int, rows: int, elem: int) -> float:
    """Bytes one step reads: non-expert weights (and scales) once as stored, the routed experts that
    B*rows tokens select (expected distinct: E(1 - (1 - k/E)^n)), and the KV each query row reads."""
    total = 0.0
    e, k = cfg.moe_num_experts, cfg.moe_top_k
    n = batch * rows
    for spec, layer in zip(cfg.decoder_layers, layers):
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            size = p.numel() * p.element_size()
            routed = name.startswith("moe.") and p.dim() == 3  # stacked experts (and their scales)
            total += size * (1 - (1 - k / e) ** n) if routed else size
        keys = min(context + rows, cfg.sliding_window) if spec.sliding_window else context + rows
        total += batch * keys * 2 * spec.num_kv_heads * spec.head_dim * elem
    return total


def copy_bandwidth(device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written (None off CUDA)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, 10)
    del src, dst
    return 2 * (1 << 30) / (ms / 1e3) / 1e9


def kernel_vs_torch(layers, cfg, device, dtype) -> list[float]:
    """Each layer's output through the kernels against its PyTorch path on the same inputs (the PyTorch
    path's output feeds the next layer), as max |difference| / max |output|: compared layer by layer, a
    near tie in one layer's top-8 routing (bf16 rounding can flip it) shows as that layer alone, not
    as every layer after it."""
    ctx = make_context(cfg, 2, 40, 2, device, dtype)
    positions = ctx.q_pos.long()
    rope = rope_tables(cfg.decoder_layers, positions)
    h, delta, errors = torch.randn(4, cfg.hidden_size, device=device, dtype=dtype), None, []
    for layer in layers:
        outs = []
        for on in (True, False):
            use_kernels([layer], ctx, on)
            outs.append(layer(h, delta, positions, rope, ctx))
        (got_h, got_d), (h, delta) = outs
        got, ref = (got_h + got_d).float(), (h + delta).float()
        errors.append(float((got - ref).abs().max() / ref.abs().max()))
    return errors


def kernel_profile(layers, cfg, device, dtype, context: int, rows: int, steps: int = 5) -> list[dict]:
    """Device time per kernel name in one step of batch 1 (eager: the kernels a graph replays), the
    largest first: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    ctx = make_context(cfg, 1, context, rows, device, dtype)
    use_kernels(layers, ctx, True)
    fn = step_fn(layers, cfg, ctx, torch.randn(rows, cfg.hidden_size, device=device, dtype=dtype))
    fn()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 or device.type != "cuda"]
    total = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    return [{"kernel": e.key, "calls_per_step": e.count / steps, "us_per_step": total(e) / steps}
            for e in sorted(events, key=total, reverse=True)[:20]]


def measure(layers, cfg, device, dtype, batch: int, context: int, rows: int, iters: int, peer: bool) -> dict:
    """One step of `rows` query rows per sequence: kernels eager and graphed, and (peer) the PyTorch path."""
    ctx = make_context(cfg, batch, context, rows, device, dtype)
    use_kernels(layers, ctx, True)
    x = torch.randn(batch * rows, cfg.hidden_size, device=device, dtype=dtype)
    fn = step_fn(layers, cfg, ctx, x)
    eager = time_ms(fn, device, iters)
    replay = graphed(fn, device)
    graph = time_ms(replay, device, iters) if replay else None
    torch_ms = None
    if peer:  # the same layers on their PyTorch twins
        use_kernels(layers, ctx, False)
        torch_ms = time_ms(fn, device, max(1, iters // 4))
        use_kernels(layers, ctx, True)
    return {"eager_ms": eager, "graph_ms": graph, "torch_ms": torch_ms}


def projection(results: list[dict], cfg, device, dtype, args) -> dict | None:
    """Single-stream tokens/s with MTP-3: tau tokens per step of (verify of 4 rows over 45 layers +
    head) + 3 drafts (an MTP module costs about one layer + one head)."""
    base = next((r for r in results if r["batch"] == 1 and r["mtp_k"] == 3), None)  # the first context
    single = base and next((r for r in results if r["batch"] == 1 and r["mtp_k"] == 0
                            and r["context"] == base["context"]), None)
    if not single:
        return None
    with torch.inference_mode():
        head = torch.randn(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        rows = torch.randn(4, cfg.hidden_size, device=device, dtype=dtype)
        head_ms = time_ms(lambda: rows @ head.T, device, args.iters)
    layer_ms = single["extrapolated_45_layer_ms"] / 45
    step_ms = base["extrapolated_45_layer_ms"] + head_ms + 3 * (layer_ms + head_ms)
    measured = "measured on all 45 layers" if args.layers == 45 else f"extrapolated from {args.layers} layers"
    return {"tau": args.tau, "tau_source": args.tau_source, "context": base["context"],
            "verify_45_layers_ms": base["extrapolated_45_layer_ms"], "lm_head_ms": head_ms,
            "mtp_draft_ms_estimate": 3 * (layer_ms + head_ms), "step_ms": step_ms,
            "tokens_per_s": args.tau / (step_ms / 1e3),
            "note": f"step times {measured} ({args.weights} weights, random); tau: {args.tau_source}"}


def recount(path: Path) -> int:
    """Print an earlier run's points with this version's byte count: GB/s and roofline_fraction from its
    measured times (the layers built on the meta device: sizes only, nothing computed)."""
    record = json.loads(path.read_text())
    cfg = ModelConfig.from_dict(real_config(record["layers"], record["tiny"]))
    dtype = torch.float32 if record["device"] == "cpu" else torch.bfloat16
    layers = build(cfg, torch.device("meta"), dtype, record["weights"])
    print(f"{path}: {record['weights']}, {record['layers']} layers, copy {record['copy_gb_per_s']:.0f} GB/s")
    for r in record["results"]:
        best = min(t for t in (r["eager_ms"], r["graph_ms"]) if t is not None)
        gigabytes = step_bytes(cfg, layers, r["batch"], r["context"], r["rows_per_seq"], dtype.itemsize) / 1e9
        gb_per_s = gigabytes / (best / 1e3)
        print(f"batch {r['batch']:>3} ctx {r['context']:>6} k {r['mtp_k']}: {best:.2f} ms, {gigabytes:.2f} GB, "
              f"{gb_per_s:.0f} GB/s, roofline {gb_per_s / record['copy_gb_per_s']:.2f}")
    return 0


def git_commit() -> str:
    """STEPFLASH_COMMIT (set by gpu_check.sh: the device's copy of the tree has no .git), else git's."""
    if os.environ.get("STEPFLASH_COMMIT"):
        return os.environ["STEPFLASH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="1024,32768,131072")
    ap.add_argument("--mtp", default="1,2,3", help="draft counts k for verify steps of 1 + k rows")
    ap.add_argument("--tau", type=float, help="tokens per verify step with MTP-3 for the projection (measured "
                    "on the bundled model or a published figure)")
    ap.add_argument("--tau-source", default="as given (--tau)", help="where --tau comes from, for the label")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "int4"],
                    help="fp8: 128x128 block-scaled projections and experts (the release); int4: experts in "
                    "INT4 groups of 128 (stepflash quantize)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the code path")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="first, the time per kernel of a batch-1 step "
                    "(1 and 4 rows) at the first context, from torch.profiler")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/gpu_decode-...json; "
                    "none with --tiny)")
    ap.add_argument("--recount", type=Path, help="a JSON of an earlier run: print its GB/s and roofline with "
                    "this version's byte count, and exit")
    args = ap.parse_args()
    if args.recount:
        return recount(args.recount)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_dict(real_config(args.layers, args.tiny))
    layers = build(cfg, device, dtype, args.weights)
    elem = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; copy bandwidth {bandwidth or float('nan'):.0f} GB/s; {args.layers} layers at "
          f"{'tiny' if args.tiny else 'real'} shape, {args.weights} weights")
    results: list[dict] = []
    errors: list[dict] = []
    record = {"benchmark": "gpu_decode", "date": datetime.date.today().isoformat(), "commit": git_commit(),
              "device": name, "layers": args.layers, "weights": args.weights, "tiny": args.tiny,
              "copy_gb_per_s": bandwidth, "results": results, "errors": errors, "projection": None}
    out = args.out or (None if args.tiny else Path(__file__).parent / "results" / (
        f"gpu_decode-{name.replace(' ', '_')}-{args.weights}-{args.layers}l-{record['date']}.json"))

    def save() -> None:
        if out:
            out.write_text(json.dumps(record, indent=1))

    with torch.inference_mode():
        errors_by_layer = kernel_vs_torch(layers, cfg, device, dtype)
        err = max(errors_by_layer)
        record["kernel_vs_torch_max_rel_diff"], record["kernel_vs_torch_by_layer"] = err, errors_by_layer
        print(f"kernel path vs PyTorch path, layer by layer on the same inputs: max relative difference {err:.2e}, "
              f"median {statistics.median(errors_by_layer):.2e}")
        save()
        contexts = [min(int(c), 64) if args.tiny else int(c) for c in args.context.split(",")]
        if args.profile:  # before the grid, which may run out of time
            record["profile"] = {}
            for rows in (1,) if args.tiny else (1, 4):  # the interpreter: seconds a step
                kernels = record["profile"][f"batch 1, context {contexts[0]}, rows {rows}"] = kernel_profile(
                    layers, cfg, device, dtype, contexts[0], rows, steps=1 if args.tiny else 5)
                print(f"kernels of one step, batch 1, context {contexts[0]}, {rows} row(s), {args.layers} layers "
                      f"(us per step, calls per step):")
                for k in kernels[:12]:
                    print(f"  {k['us_per_step']:9.1f} us {k['calls_per_step']:6.0f}x  {k['kernel'][:90]}")
            save()
        for batch in [int(b) for b in args.batch.split(",")]:
            for context in contexts:
                for k in [0] + [int(m) for m in args.mtp.split(",")]:
                    rows = 1 + k
                    try:
                        times = measure(layers, cfg, device, dtype, batch, context, rows, args.iters,
                                        peer=context == contexts[0])
                    except torch.OutOfMemoryError:
                        print(f"batch {batch} context {context} rows/seq {rows}: out of memory, skipped")
                        torch.cuda.empty_cache()
                        break
                    except Exception as e:  # recorded; the other points still measure
                        traceback.print_exc()
                        errors.append({"batch": batch, "context": context, "mtp_k": k, "error": repr(e)})
                        save()
                        continue
                    best = min(t for t in (times["eager_ms"], times["graph_ms"]) if t is not None)
                    gb_per_s = step_bytes(cfg, layers, batch, context, rows, elem) / (best / 1e3) / 1e9
                    full_model_ms = best / args.layers * 45  # mean layer time x 45 (lm_head not included)
                    point = {"batch": batch, "context": context, "mtp_k": k, "rows_per_seq": rows, **times,
                             "gb_per_s": gb_per_s, "roofline_fraction": gb_per_s / bandwidth if bandwidth else None,
                             "extrapolated_45_layer_ms": full_model_ms,
                             "speedup_vs_torch": times["torch_ms"] / best if times["torch_ms"] else None,
                             "tokens_per_s_45_layers": batch * 1e3 / full_model_ms if k == 0 else None}
                    results.append(point)
                    if args.tau and record["projection"] is None:  # as soon as it can: the grid may run out of time
                        record["projection"] = p = projection(results, cfg, device, dtype, args)
                        if p:
                            print(f"projection, single stream with MTP-3 (tau {args.tau}, {args.tau_source}): "
                                  f"{p['tokens_per_s']:.0f} tokens/s from a {p['step_ms']:.1f} ms step ({p['note']})")
                    save()
                    graph, torch_ms = times["graph_ms"], times["torch_ms"]
                    print(f"batch {batch:>3} ctx {context:>6} rows/seq {rows}: eager {times['eager_ms']:.2f} ms, "
                          f"graph {'-' if graph is None else f'{graph:.2f}'} ms, PyTorch path "
                          f"{'-' if torch_ms is None else f'{torch_ms:.2f} ms ({torch_ms / best:.1f}x)'}, "
                          f"{gb_per_s:.0f} GB/s ({100 * (point['roofline_fraction'] or float('nan')):.0f}% of copy), "
                          f"45 layers ~{full_model_ms:.1f} ms "
                          f"({'measured' if args.layers == 45 else 'extrapolated'})")
    save()
    if out:
        print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
