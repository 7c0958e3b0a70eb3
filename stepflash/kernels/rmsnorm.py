"""Fused residual add + zero-centred RMSNorm: x = x + delta; h = x * rsqrt(mean(x^2) + eps) * (1 + w).

One read of x and delta and one write of x and h per row instead of four passes; the sum is taken
in fp32 and stored back in x's dtype (as the eager `x + delta` would), then normalised from it.
`add_rmsnorm_ref` is the PyTorch twin, and the model's every RMSNorm where the kernels are off.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def add_rmsnorm_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new residual, normalised) for x, delta [..., H] and the stored offset weight [H]."""
    if x.dtype == torch.float32:  # the CPU engine's case: no casts (each is a call per norm)
        residual = x if delta is None else x + delta
        return residual, F.rms_norm(residual, weight.shape, 1.0 + weight, eps)
    residual = x if delta is None else (x.float() + delta.float()).to(x.dtype)
    normed = F.rms_norm(residual.float(), weight.shape, 1.0 + weight.float(), eps)
    return residual, normed.to(x.dtype)


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, Delta, W, Res, Out, eps, H, heads, stride_x, stride_xh, stride_d, stride_r, stride_o,
                            HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per row; row r of x [T, heads, H] is (r // heads, r % heads) (heads = 1: x [T, H])."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        ok = cols < H
        x = tl.load(X + (row // heads) * stride_x + (row % heads) * stride_xh + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x = x + tl.load(Delta + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(Res.dtype.element_ty)
            tl.store(Res + row * stride_r + cols, x, mask=ok)
            x = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_o + cols, (x * inv * (1.0 + w)).to(Out.dtype.element_ty), mask=ok)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel; same contract as `add_rmsnorm_ref` (rows of one program each). x [T, H], or
    without delta also [T, heads, H] in place (per-head q/k norms over a strided view of the packed
    projection: no copy first)."""
    if triton is None:
        raise RuntimeError("add_rmsnorm needs triton (pip install triton)")
    if delta is not None and x.dim() != 2:
        raise ValueError(f"add_rmsnorm with a delta takes rows [T, H], got x of shape {tuple(x.shape)}")
    if delta is not None or x.dim() != 3 or x.stride(-1) != 1:
        x = x.contiguous()
    rows = x if x.dim() == 3 else x.view(x.shape[0], 1, x.shape[1])  # [T, heads, H]
    tokens, heads, hidden = rows.shape
    residual = torch.empty_like(x) if delta is not None else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    d = delta.contiguous() if delta is not None else x
    _add_rmsnorm_kernel[(tokens * heads,)](rows, d, weight, residual, out, eps, hidden, heads, rows.stride(0),
                                           rows.stride(1), d.stride(0), residual.stride(0), hidden,
                                           HAS_DELTA=delta is not None, BLOCK_H=triton.next_power_of_2(hidden))
    return residual, out
