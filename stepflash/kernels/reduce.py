"""Partial results summed in fp32, plus an optional addend, rounded once: out[t] = sum_p parts[t, p] + add[t].

The last step of kernels that leave fp32 parts behind (a token's k expert outputs, an FP8 linear's
split-K runs) in one launch, in place of a sum, a cast and an add. `sum_parts_ref` is the PyTorch twin.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def sum_parts_ref(parts: torch.Tensor, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """parts [T, P, H] (fp32), add [T, H] or None -> [T, H] in dtype."""
    total = parts.float().sum(1)
    return (total if add is None else total + add.float()).to(dtype)


if triton is not None:

    @triton.jit
    def _sum_parts_kernel(Parts, Add, Out, H, P, stride_t, stride_p, stride_add, stride_out, HAS_ADD: tl.constexpr,
                          BLOCK: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        h_ok = h < H
        acc = tl.zeros([BLOCK], tl.float32)
        for p in range(P):
            acc += tl.load(Parts + t * stride_t + p * stride_p + h, mask=h_ok, other=0.0)
        if HAS_ADD:
            acc += tl.load(Add + t * stride_add + h, mask=h_ok, other=0.0).to(tl.float32)
        tl.store(Out + t * stride_out + h, acc.to(Out.dtype.element_ty), mask=h_ok)


def sum_parts(parts: torch.Tensor, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel; same contract as `sum_parts_ref` (parts fp32 with unit stride along H, any
    other strides: e.g. a [P, T, H] buffer viewed as [T, P, H])."""
    if triton is None:
        raise RuntimeError("sum_parts needs triton (pip install triton)")
    if parts.dtype != torch.float32 or parts.stride(-1) != 1:
        raise ValueError(f"sum_parts takes fp32 parts with unit stride along the last dim, got {parts.dtype}, "
                         f"strides {parts.stride()}")
    tokens, count, hidden = parts.shape
    out = torch.empty(tokens, hidden, dtype=dtype, device=parts.device)
    if tokens:
        add_arg = add.contiguous() if add is not None else out
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_parts_kernel[(tokens, triton.cdiv(hidden, block))](
            parts, add_arg, out, hidden, count, parts.stride(0), parts.stride(1), add_arg.stride(0), out.stride(0),
            HAS_ADD=add is not None, BLOCK=block)
    return out
