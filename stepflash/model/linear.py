"""Weight containers whose parameter names match the hub checkpoint."""

import torch
from torch import nn


class StackedLinear(nn.Module):
    """E linear maps stored as one tensor `weight` [E, out_features, in_features] (hub layout)."""

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
