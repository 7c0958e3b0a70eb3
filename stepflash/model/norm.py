"""Zero-centred RMSNorm: the stored weight is an offset, the scale is (1 + w)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    use_kernel = False  # `add_norm` through the fused Triton kernel (kernels/rmsnorm.py); set by the engine

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32: x * rsqrt(mean(x^2) + eps) * (1 + w), cast back to x's dtype."""
        scale = 1.0 + self.weight.float()
        if x.dtype == torch.float32:
            return F.rms_norm(x, scale.shape, scale, self.eps)
        return F.rms_norm(x.float(), scale.shape, scale, self.eps).to(x.dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm residual step: (x + delta, norm(x + delta)); delta None adds nothing. With the
        kernel, one pass over the rows instead of an add and a norm."""
        if self.use_kernel:
            from stepflash.kernels.rmsnorm import add_rmsnorm

            return add_rmsnorm(x, delta, self.weight, self.eps)
        residual = x if delta is None else x + delta
        return residual, self(residual)
