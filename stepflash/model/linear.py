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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (fp8_linear if self.use_kernel else fp8_linear_ref)(x, self.weight, self.weight_scale_inv, self.block)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, block={self.block}"


class PackedLinear(nn.Module):
    """Linear maps of one input computed as one GEMM (q/k/v/g, gate/up): `parts` maps each map's hub
    name to its rows, in order; the call returns the parts' outputs. The weights live in `runs`:
    one nn.Linear of all the rows, except where the parts are kept in FP8 and their scale blocks
    cannot be stacked (a part's rows not a multiple of the block, or parts stored differently):
    then one run per stretch of parts that can (`fill`)."""

    def __init__(self, in_features: int, parts: dict[str, int]) -> None:
        super().__init__()
        self.parts, self.stretches = parts, [list(parts)]  # the parts of each run
        self.runs = nn.ModuleList([nn.Linear(in_features, sum(parts.values()), bias=False)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.cat([run(x) for run in self.runs], -1) if len(self.runs) > 1 else self.runs[0](x)
        return y.split(list(self.parts.values()), -1)

    def fill(self, weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], block: tuple[int, int]) -> None:
        """Take each part's weight (dense, or FP8 with its `scales` entry): FP8 parts stack while each
        but the last fills whole blocks of rows, dense parts always."""
        self.stretches = []
        for name in self.parts:
            prev = self.stretches[-1][-1] if self.stretches else None
            stacks = prev not in scales or self.parts[prev] % block[0] == 0  # prev FP8: whole blocks
            if prev and (name in scales) == (prev in scales) and stacks:
                self.stretches[-1].append(name)
            else:
                self.stretches.append([name])
        self.runs = nn.ModuleList(_linear(torch.cat([weights[n] for n in names]),
                                          torch.cat([scales[n] for n in names]) if names[0] in scales else None, block)
                                  for names in self.stretches)

    def hub_tensors(self) -> dict[str, torch.Tensor]:
        """The parts' tensors as a checkpoint holds them: `q_proj.weight`, `q_proj.weight_scale_inv`, ..."""
        out = {}
        for run, names in zip(self.runs, self.stretches):
            rows = [self.parts[n] for n in names]
            out.update({f"{n}.weight": w for n, w in zip(names, run.weight.split(rows))})
            if isinstance(run, Fp8Linear):
                blocks = [-(-r // run.block[0]) for r in rows]
                out.update({f"{n}.weight_scale_inv": s for n, s in zip(names, run.weight_scale_inv.split(blocks))})
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
