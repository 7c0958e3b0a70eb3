"""Gated GQA attention (full or sliding window) over a flat batch of tokens from several sequences."""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stepflash.config import LayerSpec
from stepflash.model.norm import RMSNorm
from stepflash.model.rope import apply_rotary


class AttentionContext(Protocol):
    """Where attention finds keys and values: the batch alone (`BatchLayout`) or a paged KV cache."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], window: int | None, gate: torch.Tensor) -> torch.Tensor:
        """q [T, heads, d], k/v [T, kv_heads, d] of this step's tokens before the rotary embedding
        (`rope` = cos/sin [T, rotary_dim], applied by the context so that a kernel can fuse it with
        the cache write), gate [T, heads] (before the sigmoid) -> gated attention output [T, heads, d]."""
        ...


@dataclass
class BatchLayout:
    """No cache: a flat batch of T tokens that splits into whole sequences, runs of `seq_lens` tokens."""

    seq_lens: list[int]

    @classmethod
    def single(cls, num_tokens: int) -> "BatchLayout":
        return cls([num_tokens])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], window: int | None, gate: torch.Tensor) -> torch.Tensor:
        q, k = rotate_qk(q, k, *rope)
        out = torch.empty_like(q)
        start = 0
        for n in self.seq_lens:
            sl = slice(start, start + n)
            pos = positions[sl][None]
            out[sl] = attention(q[sl][None], k[sl][None], v[sl][None], attention_mask(pos, pos, window))[0]
            start += n
        return apply_gate(out, gate)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding of queries and keys in one call."""
    return apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([q.shape[1], k.shape[1]], dim=1)


def apply_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Head-wise output gate: o [T, heads, d] * sigmoid(gate [T, heads])."""
    return o * torch.sigmoid(gate).unsqueeze(-1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, Q, K] bool for positions [B, Q] / [B, K]: a query sees keys at positions <= its own,
    and with a window only those with q_pos - k_pos < window (512 keys for window 512, the current
    token included)."""
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    return allowed[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention for B padded sequences: q [B, Q, h, d], k/v [B, K, kvh, d] (GQA) -> [B, Q, h, d]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, hidden_size: int, sliding_window: int, eps: float) -> None:
        super().__init__()
        self.layer = spec.index
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
                ctx: AttentionContext) -> torch.Tensor:
        t = h.shape[0]
        q = self.q_norm(self.q_proj(h).view(t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(h).view(t, self.num_kv_heads, self.head_dim)
        o = ctx.attend(self.layer, q, k, v, positions, rope, self.window, self.g_proj(h))  # gated per head
        return self.o_proj(o.reshape(t, -1))
