"""Zero-centred RMSNorm: the stored weight is an offset, the scale is (1 + w)."""

import torch
from torch import nn

from stepflash.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref


class RMSNorm(nn.Module):
    use_kernel = False  # `add_norm` through the fused Triton kernel (kernels/rmsnorm.py); set by the engine

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32: x * rsqrt(mean(x^2) + eps) * (1 + w), cast back to x's dtype (x [T, H])."""
        return (add_rmsnorm if self.use_kernel else add_rmsnorm_ref)(x, None, self.weight, self.eps)[1]

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm residual step: (x + delta, norm(x + delta)); delta None adds nothing. With the
        kernel, one pass over the rows instead of an add and a norm."""
        return (add_rmsnorm if self.use_kernel else add_rmsnorm_ref)(x, delta, self.weight, self.eps)
