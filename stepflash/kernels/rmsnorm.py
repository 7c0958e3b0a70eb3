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
    def _add_rmsnorm_kernel(X, Delta, W, Res, Out, eps, H, stride_x, stride_d, stride_r, stride_o,
                            HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per row."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        ok = cols < H
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
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
    """The Triton kernel; same contract as `add_rmsnorm_ref`, for rows x [T, H] (one program each)."""
    if triton is None:
        raise RuntimeError("add_rmsnorm needs triton (pip install triton)")
    if x.dim() != 2:
        raise ValueError(f"add_rmsnorm takes rows [T, H], got x of shape {tuple(x.shape)}")
    x = x.contiguous()
    tokens, hidden = x.shape
    residual = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    d = delta.contiguous() if delta is not None else x
    _add_rmsnorm_kernel[(tokens,)](x, d, weight, residual, out, eps, hidden, x.stride(0), d.stride(0),
                                   residual.stride(0), out.stride(0), HAS_DELTA=delta is not None,
                                   BLOCK_H=triton.next_power_of_2(hidden))
    return residual, out
