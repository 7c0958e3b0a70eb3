"""Gated GQA attention (full or sliding window) over a flat batch of tokens from several sequences."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import LayerSpec
from stepflash.model.norm import RMSNorm
from stepflash.model.rope import apply_rotary


@dataclass
class BatchLayout:
    """How a flat batch of T tokens splits into sequences: consecutive runs of `seq_lens` tokens."""

    seq_lens: list[int]

    @classmethod
    def single(cls, num_tokens: int) -> "BatchLayout":
        return cls([num_tokens])


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, hidden_size: int, sliding_window: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window = sliding_window if spec.sliding_window else None
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.num_heads, bias=False)  # one sigmoid gate per head
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: BatchLayout) -> torch.Tensor:
        t = h.shape[0]
        q = self.q_norm(self.q_proj(h).view(t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(h).view(t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attend(q, k, v, positions, layout, self.window)
        o = o * torch.sigmoid(self.g_proj(h)).unsqueeze(-1)
        return self.o_proj(o.reshape(t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
           layout: BatchLayout, window: int | None) -> torch.Tensor:
    """Causal softmax attention within each sequence; a sliding layer sees keys with q_pos - k_pos < window.

    Plain PyTorch reference: each sequence attends only to its own tokens of this batch.
    """
    out = torch.empty_like(q)
    start = 0
    for n in layout.seq_lens:
        sl = slice(start, start + n)
        pos = positions[sl]
        allowed = pos[None, :] <= pos[:, None]
        if window is not None:
            allowed &= (pos[:, None] - pos[None, :]) < window
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
            attn_mask=allowed, enable_gqa=True,
        )
        out[sl] = o.transpose(0, 1)
        start += n
    return out
