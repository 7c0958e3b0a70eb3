"""Feed-forward blocks: dense SwiGLU (with optional clamp) and the sigmoid-routed MoE with a shared expert."""

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.model.linear import StackedLinear


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up; with limit L > 0: min(silu(gate), L) * clamp(up, -L, L)."""
    act = F.silu(gate)
    if limit > 0:
        act = act.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return act * up


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(h), self.up_proj(h), self.limit))


class MoE(nn.Module):
    """Routed experts in the hub layout: `moe.gate` (router), `moe.router_bias`, stacked
    `moe.{gate,up,down}_proj`. The always-on shared expert is a sibling MLP of the decoder layer."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, top_k: int,
                 scaling: float, use_bias: bool, renormalize: bool, limit: float) -> None:
        super().__init__()
        self.top_k, self.scaling, self.renormalize, self.limit = top_k, scaling, renormalize, limit
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.router_bias = nn.Parameter(torch.zeros(num_experts)) if use_bias else None
        self.gate_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.up_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.down_proj = StackedLinear(num_experts, intermediate_size, hidden_size)

    use_kernel = False  # routed experts through the Triton kernel (kernels/moe.py); set by the engine

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(h)
        if self.use_kernel:
            from stepflash.kernels.moe import fused_moe

            linears = (self.gate_proj, self.up_proj, self.down_proj)
            int4 = tuple(m.int4_scale for m in linears) if self.gate_proj.int4_scale is not None else None
            fp8 = tuple(m.weight_scale_inv for m in linears) if self.gate_proj.weight_scale_inv is not None else None
            return fused_moe(h, *(m.weight for m in linears), ids, weights, self.limit, int4_scales=int4,
                             group_size=self.gate_proj.group_size, fp8_scales=fp8, fp8_block=self.gate_proj.block)
        return self.experts(h, ids, weights)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores in fp32; the bias steers selection only; chosen weights renormalised and
        scaled. Returns (expert ids [T, k], weights [T, k] fp32)."""
        scores = torch.sigmoid(F.linear(h.float(), self.gate.weight.float()))
        choice = scores if self.router_bias is None else scores + self.router_bias.float()
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def experts(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference grouped computation: tokens sorted by expert, one matmul pair per selected expert.
        A single token (decode at batch 1) skips the sorting."""
        if h.shape[0] == 1:
            out = None
            for expert, w in zip(ids[0].tolist(), weights[0]):
                y = self._expert(h, expert) * w
                out = y if out is None else out + y
            return out.to(h.dtype)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.gate_proj.weight.shape[0]).tolist()
        out = torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            y = self._expert(h[token_of[start : start + count]], expert) * weights.flatten()[rows, None]
            out.index_add_(0, token_of[start : start + count], y)
            start += count
        return out.to(h.dtype)

    def _expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's SwiGLU FFN on x [n, hidden] -> fp32 [n, hidden]."""
        gate, up, down = (m.expert(expert).to(x.dtype) for m in (self.gate_proj, self.up_proj, self.down_proj))
        return F.linear(swiglu(F.linear(x, gate), F.linear(x, up), self.limit), down).float()
