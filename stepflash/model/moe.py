"""Feed-forward blocks: dense SwiGLU (with optional clamp) and the sigmoid-routed MoE with a shared expert."""

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.distributed import Parallel
from stepflash.kernels.moe import fused_moe, fused_moe_ref, swiglu, swiglu_ref
from stepflash.kernels.router import route, route_ref
from stepflash.model.linear import PackedLinear, StackedLinear


class MLP(nn.Module):
    """gate_proj and up_proj (hub names) packed as one GEMM, `gate_up_proj`. Under tensor parallelism
    this rank's slice of the intermediate dim: a partial sum, reduced by the decoder layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, limit: float, parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.limit = limit
        intermediate_size = parallel.part(intermediate_size)
        self.gate_up_proj = PackedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size})
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    use_kernel = False  # the SwiGLU through its Triton kernel (kernels/moe.py), else its PyTorch twin

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj((swiglu if self.use_kernel else swiglu_ref)(*self.gate_up_proj(h), self.limit))


class MoE(nn.Module):
    """Routed experts in the hub layout: `moe.gate` (router), `moe.router_bias`, stacked
    `moe.{gate,up,down}_proj`. The always-on shared expert is a sibling MLP of the decoder layer.

    Under tensor parallelism the output is a partial sum (reduced by the decoder layer): every
    rank holds a slice of every expert's intermediate dim, or, with expert parallelism, whole
    experts `first_expert ..`: the router (replicated) picks the same routes on every rank, and a
    route to another rank's expert weighs 0 here, so no tokens move between ranks."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, top_k: int,
                 scaling: float, use_bias: bool, renormalize: bool, limit: float,
                 parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.top_k, self.scaling, self.renormalize, self.limit = top_k, scaling, renormalize, limit
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.router_bias = nn.Parameter(torch.zeros(num_experts)) if use_bias else None
        ep = parallel.expert_parallel and parallel.size > 1
        self.first_expert = parallel.first(num_experts) if ep else None
        local = parallel.part(num_experts) if ep else num_experts
        intermediate_size = intermediate_size if ep else parallel.part(intermediate_size)
        self.gate_proj = StackedLinear(local, hidden_size, intermediate_size)
        self.up_proj = StackedLinear(local, hidden_size, intermediate_size)
        self.down_proj = StackedLinear(local, intermediate_size, hidden_size)

    use_kernel = False  # routed experts through the Triton kernel (kernels/moe.py), else its PyTorch twin

    def forward(self, h: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' output, plus `add` (the shared expert's) before it is rounded to h's dtype."""
        ids, weights = self.route(h)
        if self.first_expert is not None:
            ids, weights = self.local_routes(ids, weights)
        linears = (self.gate_proj, self.up_proj, self.down_proj)
        int4 = tuple(m.int4_scale for m in linears) if self.gate_proj.int4_scale is not None else None
        fp8 = tuple(m.weight_scale_inv for m in linears) if self.gate_proj.weight_scale_inv is not None else None
        experts = fused_moe if self.use_kernel else fused_moe_ref
        return experts(h, *(m.weight for m in linears), ids, weights, self.limit, int4_scales=int4,
                       group_size=self.gate_proj.group_size, fp8_scales=fp8, fp8_block=self.gate_proj.block, add=add)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores in fp32; the bias steers selection only; chosen weights renormalised and
        scaled (kernels/router.py). Returns (expert ids [T, k], weights [T, k] fp32)."""
        logits = F.linear(h.float(), self.gate.weight.float())
        return (route if self.use_kernel else route_ref)(logits, self.router_bias, self.top_k, self.scaling,
                                                         self.renormalize)

    def local_routes(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes in this rank's expert numbering; another rank's expert becomes local expert 0 at weight 0."""
        local = ids - self.first_expert
        mine = (local >= 0) & (local < self.gate_proj.weight.shape[0])
        return torch.where(mine, local, 0), torch.where(mine, weights, 0.0)
