"""Weight containers: linear maps packed into one GEMM, and weights kept quantized. Checkpoints name
tensors as the hub does; the loader maps them onto these (model/loader.py)."""

import torch
from torch import nn

from stepflash.kernels.fp8_linear import fp8_linear, fp8_linear_ref


class Fp8Linear(nn.Module):
    """y = x W^T with W kept as published in FP8: `weight` float8_e4m3fn [out, in] and its
    `weight_scale_inv` fp32 [ceil(out / block[0]), ceil(in / block[1])] (model/quant.py). The Triton
    kernel (kernels/fp8_linear.py) reads the bytes; its PyTorch twin dequantizes a transient copy
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
        if not self.use_kernel:
            return fp8_linear_ref(x, self.weight, self.weight_scale_inv, self.block)
        y = fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, self.block)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


class PackedLinear(nn.Module):
    """Linear maps of one input computed as one GEMM (q/k/v/g, gate/up): `parts` maps each map's hub
    name to its rows, in order; the call returns the parts' outputs. The weights live in `runs`:
    one nn.Linear of all the rows, except where the parts are kept in FP8 and their scale blocks
    cannot be stacked (a part's rows not a multiple of the block, or parts stored differently):
    then one run per stretch of parts that can (`fill`)."""

    def __init__(self, in_features: int, parts: dict[str, int]) -> None:
        super().__init__()
        self.parts = parts
        self.runs = nn.ModuleList([nn.Linear(in_features, sum(parts.values()), bias=False)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.cat([run(x) for run in self.runs], -1) if len(self.runs) > 1 else self.runs[0](x)
        return y.split(list(self.parts.values()), -1)

    def fill(self, weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], block: tuple[int, int]) -> None:
        """Take each part's weight (dense, or FP8 with its `scales` entry): FP8 parts stack while each
        but the last fills whole blocks of rows, dense parts always."""
        stretches: list[list[str]] = []
        for name in self.parts:
            prev = stretches[-1][-1] if stretches else None
            fp8 = name in scales
            if prev is not None and fp8 == (prev in scales) and (not fp8 or self.parts[prev] % block[0] == 0):
                stretches[-1].append(name)
            else:
                stretches.append([name])
        self.runs = nn.ModuleList(_linear(torch.cat([weights[n] for n in names]),
                                          torch.cat([scales[n] for n in names]) if names[0] in scales else None, block)
                                  for names in stretches)

    def hub_tensors(self) -> dict[str, torch.Tensor]:
        """The parts' tensors as a checkpoint holds them: `q_proj.weight`, `q_proj.weight_scale_inv`, ..."""
        out, parts = {}, iter(self.parts.items())
        for run in self.runs:
            row = block_row = 0
            while row < run.weight.shape[0]:
                name, rows = next(parts)
                out[f"{name}.weight"] = run.weight[row:row + rows]
                if isinstance(run, Fp8Linear):
                    blocks = -(-rows // run.block[0])
                    out[f"{name}.weight_scale_inv"] = run.weight_scale_inv[block_row:block_row + blocks]
                    block_row += blocks
                row += rows
        return out


def _linear(weight: torch.Tensor, scale_inv: torch.Tensor | None, block: tuple[int, int]) -> nn.Module:
    if scale_inv is not None:
        return Fp8Linear(weight, scale_inv, block)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


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
