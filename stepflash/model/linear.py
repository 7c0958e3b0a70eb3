"""Weight containers whose parameter names match the hub checkpoint, including weights kept quantized."""

import torch
from torch import nn

from stepflash.model.quant import dequantize_fp8, dequantize_int4


class Fp8Linear(nn.Module):
    """y = x W^T with W kept as published in FP8: `weight` float8_e4m3fn [out, in] and its
    `weight_scale_inv` fp32 [ceil(out / block[0]), ceil(in / block[1])] (model/quant.py). The Triton
    kernel (kernels/fp8_linear.py) reads the bytes; the PyTorch path dequantizes a transient copy
    per call. Either way the output is in x's dtype."""

    use_kernel = False  # through the Triton kernel; set per instance by the engine

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale_inv", scale_inv)
        self.block = block

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            from stepflash.kernels.fp8_linear import fp8_linear

            y = fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, self.block)
            return y.view(*x.shape[:-1], self.out_features)
        from stepflash.kernels.fp8_linear import fp8_linear_ref

        return fp8_linear_ref(x, self.weight, self.weight_scale_inv, self.block)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


class StackedLinear(nn.Module):
    """E linear maps stored as one tensor `weight` [E, out_features, in_features] (hub layout), or
    kept quantized for the fused-MoE kernel (model/quant.py): INT4 (`weight` uint8 [E, out, in / 2] +
    `int4_scale` [E, out, in / group_size]) or FP8 as published (`weight` float8_e4m3fn [E, out, in]
    + `weight_scale_inv` fp32 [E, out / block[0], in / block[1]], rounded up)."""

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.register_buffer("int4_scale", None)
        self.group_size = 0
        self.register_buffer("weight_scale_inv", None)
        self.block = (0, 0)

    def keep_int4(self, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.int4_scale = scale
        self.group_size = group_size

    def keep_fp8(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = scale_inv
        self.block = block

    def expert(self, index: int) -> torch.Tensor:
        """Expert `index`'s weight [out, in]; dequantized when kept quantized (INT4: in the scales'
        dtype, FP8: fp32)."""
        if self.int4_scale is not None:
            dense = dequantize_int4(self.weight[index], self.int4_scale[index], self.group_size)
            return dense.to(self.int4_scale.dtype)
        if self.weight_scale_inv is not None:
            return dequantize_fp8(self.weight[index], self.weight_scale_inv[index], self.block)
        return self.weight[index]
