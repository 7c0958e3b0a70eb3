"""Weight containers whose parameter names match the hub checkpoint."""

import torch
from torch import nn

from stepflash.model.quant import dequantize_int4


class StackedLinear(nn.Module):
    """E linear maps stored as one tensor `weight` [E, out_features, in_features] (hub layout), or
    kept as INT4 (`weight` uint8 [E, out, in / 2] + `int4_scale` [E, out, in / group_size], see
    model/quant.py) for the fused-MoE kernel."""

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.register_buffer("int4_scale", None)
        self.group_size = 0

    def keep_int4(self, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.int4_scale = scale
        self.group_size = group_size

    def expert(self, index: int) -> torch.Tensor:
        """Expert `index`'s weight [out, in], dequantized when kept as INT4."""
        if self.int4_scale is None:
            return self.weight[index]
        return dequantize_int4(self.weight[index], self.int4_scale[index], self.group_size).to(self.int4_scale.dtype)
