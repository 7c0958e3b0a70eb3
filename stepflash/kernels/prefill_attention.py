"""Prefill (and chunked-prefill) attention over the paged KV cache, flash-attention style: a tile of
BLOCK_M consecutive query rows of one sequence against tiles of BLOCK_N keys, causal and optionally
windowed, online softmax, tl.dot for both products. Same contract as `paged_attention_ref` (the
rows' keys are already in the cache); `kernels.tiles.prefill_tiles` cuts the rows into per-sequence tiles.
`prefill_attention_ref` is its PyTorch twin.
"""

import math

import torch

from stepflash.kernels.paged_attention import first_blocks, paged_keys
from stepflash.kernels.tiles import prefill_tiles, tile_runs

try:
    import triton
    import triton.language as tl

    from stepflash.kernels.paged_attention import kv_tile, softmax_step, table_row
except ImportError:
    triton = None


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_of: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                          tiles: torch.Tensor | None = None, first_block: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `prefill_attention`, one sequence's rows at a time (`paged_attention_ref`'s
    math); the runs of rows come from seq_of read to the host (a prefill step, not the decode path),
    so `tiles` is not needed."""
    first_block, out = first_blocks(first_block, block_tables), torch.empty_like(q)
    runs = tile_runs(seq_of.tolist(), q.shape[0])
    for start, count in zip(runs[::2], runs[1::2]):
        rows, seq = slice(start, start + count), slice(int(seq_of[start]), int(seq_of[start]) + 1)
        out[rows] = paged_keys(q[None, rows], k_cache, v_cache, block_tables[seq], first_block[seq],
                               q_pos[None, rows], window)[0]
    return out


if triton is not None:

    @triton.jit
    def _prefill_kernel(Q, K, V, Out, Tables, FirstBlock, SeqOf, QPos, Tiles, scale, window,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        stride_ot, stride_oh, stride_tb, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IEEE: tl.constexpr):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        first = tl.load(Tiles + tile * 2)
        count = tl.load(Tiles + tile * 2 + 1)
        m_idx = tl.arange(0, BLOCK_M)
        m_ok = m_idx < count
        rows = first + m_idx
        seq = tl.load(SeqOf + first)
        row_of_seq = table_row(Tables, FirstBlock, seq, stride_tb)
        pos = tl.load(QPos + rows, mask=m_ok, other=0)
        first_pos = tl.load(QPos + first)
        last_pos = tl.load(QPos + first + count - 1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(lo, last_pos + 1, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n <= last_pos
            k = kv_tile(K, row_of_seq, n, n_ok, d, d_ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
            v = kv_tile(V, row_of_seq, n, n_ok, d, d_ok, kv_head, stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
            m, denom, acc = softmax_step(q, k, v, n, n_ok, pos, window, scale, m, denom, acc, IEEE)
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # padded rows have no keys
        tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_of: torch.Tensor, q_pos: torch.Tensor, window: int | None, block_m: int = 16,
                      block_n: int = 16, tiles: torch.Tensor | None = None,
                      first_block: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel; rows of one sequence must be consecutive with consecutive positions.
    `tiles` (from `kernels.tiles.prefill_tiles` with block_m) saves reading seq_of back to the host;
    `first_block` as in `paged_attention`."""
    if triton is None:
        raise RuntimeError("prefill_attention needs triton (pip install triton)")
    rows, num_heads, head_dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if tiles is None:
        tiles = prefill_tiles(seq_of.tolist(), block_m)
    tiles = tiles.to(q.device)
    tables = block_tables.to(torch.int32).contiguous()
    first_block = first_blocks(first_block, tables)
    _prefill_kernel[(tiles.shape[0], num_heads)](
        q, k_cache, v_cache, out, tables, first_block, seq_of.to(torch.int32).contiguous(),
        q_pos.to(torch.int32).contiguous(),
        tiles, 1.0 / math.sqrt(head_dim), window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32)
    return out
