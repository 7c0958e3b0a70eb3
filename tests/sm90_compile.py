"""Compile every Triton kernel variant the host wrappers launch for sm_90 (H100 / H200), on any
machine: each launch is replaced by `triton.compile` for that target, nothing runs. Run as a script
in a process without TRITON_INTERPRET (tests/test_kernels_compile.py does); prints one line per
variant, `ok` or `FAILED` with the compiler's message. The shapes are the release's (head dim 128,
8 KV heads, hidden 4096, experts of 1280, 288 experts top 8) so the constexprs are the GPU's; the
launch choices are an H200's (132 SMs, the CUDA tile sizes)."""

import collections
import os
import re
import sys
import traceback

assert "TRITON_INTERPRET" not in os.environ, "the kernels must be JIT functions, not the interpreter's"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8", torch.int32: "i32",
         torch.int64: "i64"}
seen: set = set()


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict) -> None:
    """Compile as the JIT would for these arguments: tensors' pointers and integers that are multiples
    of 16 marked so (CUDA allocations are), integers equal to 1 made constants. The ok line ends
    with the kernel's global loads by width (PTX), e.g. ld.global.v4.b32 for 16 bytes a thread."""
    bound = {**dict(zip(fn.arg_names, args)), **kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name]
        if p.is_constexpr or (type(value) is int and value == 1):
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = (fn.__name__, repr(sorted(constexprs.items())), repr(signature))
    if key in seen:
        return
    seen.add(key)
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32))
        loads = collections.Counter(re.findall(r"ld\.global(?:\.\w+)+", kernel.asm["ptx"]))
        print(f"ok {fn.__name__} {sorted(constexprs.items())} loads {dict(sorted(loads.items()))}")
    except Exception as e:  # noqa: BLE001  (reported, and the test fails)
        message = "".join(traceback.format_exception_only(e)).strip().replace("\n", " | ")
        print(f"FAILED {fn.__name__} {sorted(constexprs.items())}: {message[-2000:]}")


JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: compile_launch(self, args, kwargs)

import stepflash.kernels.fp8_linear as fp8_module  # noqa: E402
import stepflash.kernels.moe as moe  # noqa: E402
import stepflash.kernels.paged_attention as paged_module  # noqa: E402
from stepflash.kernels.prefill_attention import prefill_attention  # noqa: E402
from stepflash.kernels.rmsnorm import add_rmsnorm  # noqa: E402
from stepflash.kernels.rope_kv import QKNorms, rope_kv_write  # noqa: E402
from stepflash.kernels.router import route  # noqa: E402

paged_module.multiprocessors = fp8_module.multiprocessors = lambda device: 132
moe.tile_sizes = lambda device: moe.MoETiles(16, 256, 64)


def attention(dtype: torch.dtype) -> None:
    rows, heads, kv_heads, dim = 4, 64, 8, 128
    q, cache = torch.zeros(rows, heads, dim, dtype=dtype), torch.zeros(8, 16, kv_heads, dim, dtype=dtype)
    tables, seq_of, q_pos = torch.zeros(2, 4, dtype=torch.int32), torch.tensor([0, 0, 1, 1]), torch.arange(5, 9)
    gate, tiles = torch.zeros(rows, heads, dtype=dtype), torch.tensor([[0, 2], [2, 2]], dtype=torch.int32)
    for splits in (1, None):  # one run of keys, or split with the combine kernel
        paged_module.paged_attention(q, cache, cache, tables, seq_of, q_pos, 512, gate, splits=splits)
        paged_module.paged_attention(q, cache, cache, tables, seq_of, q_pos, None, gate, tiles=tiles, tile_rows=4,
                                     splits=splits)
    prefill_attention(q, cache, cache, tables, seq_of, q_pos, 512, tiles=tiles)
    k = torch.zeros(rows, kv_heads, dim, dtype=dtype)
    for norms in (None, QKNorms(torch.zeros(dim), torch.zeros(dim), 1e-5)):  # with the q/k norms fused, or not
        rope_kv_write(q, k, k, torch.zeros(rows, 64), torch.zeros(rows, 64), cache, cache, torch.zeros(rows).long(),
                      norms)


def norms(dtype: torch.dtype) -> None:
    x = torch.zeros(4, 4096, dtype=dtype)
    add_rmsnorm(x, x, torch.zeros(4096), 1e-5)
    add_rmsnorm(x, None, torch.zeros(4096), 1e-5)


def fp8_linears(dtype: torch.dtype) -> None:
    weight = torch.zeros(1024, 4096, dtype=torch.uint8)
    for rows in (1, 16):  # matrix-vector products; tl.dot
        x = torch.zeros(rows, 4096, dtype=dtype)
        fp8_module.fp8_linear(x, weight, torch.ones(8, 32), (128, 128))
        fp8_module.fp8_linear(x, weight, torch.ones(64, 171), (16, 24))  # tiles across scale blocks


def experts(dtype: torch.dtype) -> None:
    count, hidden, inter = 16, 4096, 1280
    int4 = {"int4_scales": tuple(torch.ones(count, o, i // 128, dtype=dtype) for o, i in
                                 ((inter, hidden), (inter, hidden), (hidden, inter))), "group_size": 128}
    fp8 = {"fp8_scales": tuple(torch.ones(count, -(-o // 128), -(-i // 128)) for o, i in
                               ((inter, hidden), (inter, hidden), (hidden, inter))), "fp8_block": (128, 128)}
    for tokens in (1, 16):  # one pair a program; blocks of pairs through tl.dot
        x, ids, weights = torch.zeros(tokens, hidden, dtype=dtype), torch.zeros(tokens, 8).long(), torch.ones(tokens, 8)
        moe.fused_moe(x, *(torch.zeros(count, o, i, dtype=dtype) for o, i in
                           ((inter, hidden), (inter, hidden), (hidden, inter))), ids, weights, 7.0)
        moe.fused_moe(x, *(torch.zeros(count, o, i // 2, dtype=torch.uint8) for o, i in
                           ((inter, hidden), (inter, hidden), (hidden, inter))), ids, weights, 0.0, **int4)
        moe.fused_moe(x, *(torch.zeros(count, o, i, dtype=torch.uint8) for o, i in
                           ((inter, hidden), (inter, hidden), (hidden, inter))), ids, weights, 0.0, **fp8)
        packed = torch.zeros(tokens, 2 * inter, dtype=dtype)  # the shared expert's gate/up projection
        moe.swiglu(packed[:, :inter], packed[:, inter:], 7.0)


for dtype in (torch.bfloat16, torch.float32):  # the release's; the tests' (IEEE dots)
    attention(dtype)
    norms(dtype)
    fp8_linears(dtype)
    experts(dtype)
route(torch.zeros(4, 288), torch.zeros(288), 8, 2.5, True)
sys.stdout.flush()
