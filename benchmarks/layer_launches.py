"""Kernel launches per decoder layer on the GPU path, counted on the CPU: one MoE layer of
gpu_decode's model (tiny shapes) runs a decode step with the Triton kernels under the interpreter,
and every PyTorch op it dispatches (outside the kernels) and every Triton launch is counted with
the line of stepflash that issued it. On a GPU each counts as a kernel launch (a few us each inside
a CUDA graph) except views and allocations, listed apart. The engine's own inputs (int32 rows, whole
tables) are what gpu_decode's context hands the layer.

    python benchmarks/layer_launches.py [--weights bf16|fp8|int4] [--rows 1] [--dtype float16]
"""

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_decode  # noqa: E402
from stepflash.config import ModelConfig  # noqa: E402

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "expand", "slice", "select", "alias", "squeeze",
             "permute", "split", "split_with_sizes", "as_strided", "detach", "empty", "empty_strided", "empty_like",
             "reshape", "unbind", "narrow", "new_empty"}


def issuer() -> str:
    """The innermost stepflash line on the stack."""
    frames = [f for f in traceback.extract_stack() if f"{os.sep}stepflash{os.sep}" in f.filename]
    return f"{frames[-1].filename.rsplit('stepflash' + os.sep, 1)[-1]}:{frames[-1].lineno}" if frames else "benchmark"


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.inside_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_kernel:  # the interpreter's own tensor work is not the GPU's
            self.counts[(func.overloadpacket.__name__, issuer())] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "int4"])
    ap.add_argument("--rows", type=int, default=1, help="rows of the step (1 + k for a verify step)")
    ap.add_argument("--dtype", default="float16", help="activations (the interpreter has no bfloat16)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.from_dict(gpu_decode.real_config(4, tiny=True))
    layer = gpu_decode.build(cfg, torch.device("cpu"), dtype, args.weights)[1:2]  # a sliding MoE layer
    ctx = gpu_decode.make_context(cfg, 1, 64, args.rows, torch.device("cpu"), dtype)
    gpu_decode.use_kernels(layer, ctx, True)
    step = gpu_decode.step_fn(layer, cfg, ctx, torch.randn(args.rows, cfg.hidden_size, dtype=dtype))
    counter = Counter()
    launch = interpreter.GridExecutor.__call__

    def counted_launch(self, *a, **k):
        counter.counts[(f"triton {self.fn.__name__}", issuer())] += 1
        counter.inside_kernel = True
        try:
            return launch(self, *a, **k)
        finally:
            counter.inside_kernel = False

    interpreter.GridExecutor.__call__ = counted_launch
    step()  # once unrecorded: first-call work
    counter.counts.clear()
    with counter:
        step()
    launches = {key: n for key, n in counter.counts.items() if key[0] not in NO_KERNEL and key[1] != "benchmark"}
    for (op, where), n in sorted(launches.items(), key=lambda kv: kv[0][1]):
        print(f"{n:3d}  {op:28s} {where}")
    print(f"{sum(launches.values())} launches in one MoE layer ({args.weights} weights, {args.rows} row(s)); "
          f"other ops (views, allocations, the benchmark's own) left out: "
          f"{sum(counter.counts.values()) - sum(launches.values())}")


if __name__ == "__main__":
    main()
