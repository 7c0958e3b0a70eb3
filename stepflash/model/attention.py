"""Gated GQA attention (full or sliding window) over a flat batch of tokens from several sequences,
and where it finds its keys: the batch itself (`BatchLayout`, no cache) or the paged KV cache
(`PagedAttention`, the engine's). Both run the kernels' math (kernels/): the paged cache through
the Triton kernels or their PyTorch twins, chosen once by the engine; the batch through the twins'
`masked_attention`."""

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from stepflash.config import LayerSpec
from stepflash.distributed import Parallel
from stepflash.kernels.paged_attention import masked_attention, paged_attention, paged_attention_ref
from stepflash.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from stepflash.kernels.rope_kv import QKNorms, apply_rotary, rope_kv_write, rope_kv_write_ref
from stepflash.model.linear import PackedLinear
from stepflash.model.norm import RMSNorm


class AttentionContext(Protocol):
    """Where attention finds keys and values: the batch alone (`BatchLayout`) or the paged KV cache."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], window: int | None, gate: torch.Tensor,
               norms: QKNorms) -> torch.Tensor:
        """q [T, heads, d], k/v [T, kv_heads, d] of this step's tokens before their per-head norms
        (`norms`) and the rotary embedding (`rope` = cos/sin [T, rotary_dim]), both applied by the
        context so that a kernel can fuse them with the cache write; gate [T, heads] (before the
        sigmoid) -> gated attention output [T, heads, d]."""
        ...


def apply_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Head-wise output gate: o [T, heads, d] * sigmoid(gate [T, heads])."""
    return o * torch.sigmoid(gate).unsqueeze(-1)


@dataclass
class BatchLayout:
    """No cache (training, model tests): a flat batch of T tokens that splits into whole sequences,
    runs of `seq_lens` tokens."""

    seq_lens: list[int]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], window: int | None, gate: torch.Tensor,
               norms: QKNorms) -> torch.Tensor:
        q, k = norms.apply(q, k)
        q, k = apply_rotary(torch.cat([q, k], dim=1), *rope).split([q.shape[1], k.shape[1]], dim=1)
        out = [masked_attention(q_s[None], k_s[None], v_s[None], pos[None], pos[None], window)[0]
               for q_s, k_s, v_s, pos in zip(*(t.split(self.seq_lens) for t in (q, k, v, positions)))]
        return apply_gate(torch.cat(out), gate)


@dataclass
class AttentionRows:
    """Query rows that one attention op takes: their flat indices (None: every row), sequence
    index and position (int32), and its tiles: runs of at most `tile_rows` consecutive rows of one
    sequence that the op takes together (kernels/tiles.py). Built once per step on the host, so no
    layer reads anything back from the device."""

    index: torch.Tensor | None
    seq_of: torch.Tensor
    q_pos: torch.Tensor
    tiles: torch.Tensor
    tile_rows: int


ATTENTION_OPS = {"torch": (rope_kv_write_ref, paged_attention_ref, prefill_attention_ref),
                 "triton": (rope_kv_write, paged_attention, prefill_attention)}


class PagedAttention:
    """Attention over the paged KV cache, reading keys through block tables: the rotary embedding
    with the cache write, then rows of short chunks (decode, verify, MTP drafting) by the paged op
    in tiles of a chunk's rows (the head gate fused), rows of long chunks (prefill) by the prefill op.
    `ops` are the Triton kernels or their PyTorch twins (ATTENTION_OPS), called alike."""

    def __init__(self, ops: tuple, caches: dict[int, tuple[torch.Tensor, torch.Tensor]], kind_of: dict[int, str],
                 slots: dict[str, torch.Tensor], tables: dict[str, torch.Tensor], first_blocks: dict[str, torch.Tensor],
                 decode: AttentionRows | None, prefill: AttentionRows | None) -> None:
        self.ops, self.caches, self.kind_of, self.slots, self.tables = ops, caches, kind_of, slots, tables
        self.first_blocks = first_blocks  # kind -> [S]: the block each table row starts at
        self.decode, self.prefill = decode, prefill
        # the twin's key plans, made by a kind's first layer and read by the others (kernels need none)
        self.plans = {"plans": {}} if ops is ATTENTION_OPS["torch"] else {}

    def moved_on(self) -> "PagedAttention":
        """This context over the same tensors, changed in place (DecodeStep): the twin's plans made again."""
        return PagedAttention(self.ops, self.caches, self.kind_of, self.slots, self.tables, self.first_blocks,
                              self.decode, self.prefill)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], window: int | None, gate: torch.Tensor,
               norms: QKNorms) -> torch.Tensor:
        write, paged, prefill = self.ops
        kind = self.kind_of[layer]
        q = write(q, k, v, *rope, *self.caches[layer], self.slots[kind], norms)
        caches, table, first, d, p = (self.caches[layer], self.tables[kind], self.first_blocks[kind], self.decode,
                                      self.prefill)
        if p is None:
            return paged(q, *caches, table, d.seq_of, d.q_pos, window, gate, tiles=d.tiles, tile_rows=d.tile_rows,
                         first_block=first, **self.plans)
        if d is None:
            return apply_gate(prefill(q, *caches, table, p.seq_of, p.q_pos, window, tiles=p.tiles, first_block=first),
                              gate)
        out = torch.empty_like(q)
        out[p.index] = apply_gate(prefill(q[p.index], *caches, table, p.seq_of, p.q_pos, window, tiles=p.tiles,
                                          first_block=first), gate[p.index])
        out[d.index] = paged(q[d.index], *caches, table, d.seq_of, d.q_pos, window, gate[d.index], tiles=d.tiles,
                             tile_rows=d.tile_rows, first_block=first, **self.plans)
        return out


class Attention(nn.Module):
    """q/k/v/g (hub names) packed as one GEMM, `qkvg_proj`. Under tensor parallelism this rank's
    heads only: q/k/v/g column-parallel, o_proj row-parallel (its partial sums are reduced by the
    decoder layer)."""

    def __init__(self, spec: LayerSpec, hidden_size: int, sliding_window: int, eps: float,
                 parallel: Parallel = Parallel()) -> None:
        super().__init__()
        self.layer = spec.index
        self.num_heads, self.head_dim = parallel.part(spec.num_heads), spec.head_dim
        self.num_kv_heads = parallel.kv_part(spec.num_kv_heads)
        self.window = sliding_window if spec.sliding_window else None
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # g: one sigmoid gate per head
        self.qkvg_proj = PackedLinear(hidden_size, {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows,
                                                    "g_proj": self.num_heads})
        self.o_proj = nn.Linear(q_rows, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        t = h.shape[0]
        q, k, v, g = self.qkvg_proj(h)
        q, k, v = (x.view(t, -1, self.head_dim) for x in (q, k, v))
        norms = QKNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)  # applied where q and k rotate
        o = ctx.attend(self.layer, q, k, v, positions, rope, self.window, g, norms)
        return self.o_proj(o.reshape(t, -1))
