"""Paged attention for decode and MTP verification: GQA, full or sliding window, block tables,
any number of query rows per sequence, the per-head sigmoid gate fused into the output.

Each query row t belongs to sequence `seq_of[t]` and sits at position `q_pos[t]`; it attends to that
sequence's keys at positions lo..q_pos[t] (lo = q_pos - window + 1 with a window, else 0), found
through `block_tables[seq]` in caches laid out [num_blocks, block_size, kv_heads, head_dim]. A
verify step is just several rows of one sequence at consecutive positions (their keys are written
to the cache before the call); the kernel takes them as one tile with the query heads of a kv head,
so the keys are read once per step, not once per row. A long key range is cut into runs that
separate programs take (flash decoding), their partial softmax sums combined by a second kernel: at
batch 1 a 128K-token full layer would otherwise run on 8 programs, one per kv head.
`paged_attention_ref` is the PyTorch twin the kernel is tested against (fp32/fp16 under
TRITON_INTERPRET=1 on the CPU, bf16 on a GPU) and the engine runs where the kernels are off.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepflash.kernels.tiles import multiprocessors

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine never needs the kernels
    triton = None


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, Q, K]: a query at q_pos [B, Q] sees the keys at positions k_pos [B, K] <= its own, and
    with a window only those with q_pos - k_pos < window (512 keys for window 512, its own included)."""
    behind = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    return behind >= 0 if not window else (behind >= 0) & (behind < window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of B padded groups of queries q [B, Q, H, D] over keys/values [B, K, KVH, D]
    (GQA), each query over the keys `visible` [B, 1, Q, K] marks (at least one), in q's dtype: the math
    of every PyTorch path of attention (the twins here and the model without a cache)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=visible, enable_gqa=True)
    return o.transpose(1, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """`attend` of queries at q_pos [B, Q] over keys at k_pos [B, K], causal (and windowed)."""
    return attend(q, k, v, visible_keys(q_pos, k_pos, window))


def paged_keys(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
               first_block: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """`masked_attention` of query groups q [B, Q, H, D] at q_pos [B, Q] over every key their table rows
    [B, W] reach (blocks first_block[b] .. + W - 1), gathered from the caches; positions a query may
    not see (or whose table entry is unused) are masked. Static shapes: nothing is read back."""
    block_size = k_cache.shape[1]
    k_pos = first_block[:, None] * block_size + torch.arange(tables.shape[1] * block_size, dtype=tables.dtype,
                                                             device=q.device)
    blocks = tables.clamp(0, k_cache.shape[0] - 1).flatten()
    keys, values = (c.index_select(0, blocks).view(*k_pos.shape, *c.shape[2:]) for c in (k_cache, v_cache))
    return masked_attention(q, keys, values, q_pos, k_pos, window)


@dataclass
class KeyPlan:
    """What every layer of one kind reads the same way in a step: the query rows of each tile, the
    cache blocks their table rows reach (gathered whole: a block's rows are adjacent), and which of
    those keys each query sees."""

    rows: torch.Tensor  # [C, R]
    blocks: torch.Tensor  # [C, W]
    visible: torch.Tensor  # [C, 1, R, W * block_size]


def key_plan(k_cache: torch.Tensor, block_tables: torch.Tensor, seq_of: torch.Tensor, q_pos: torch.Tensor,
             window: int | None, tiles: torch.Tensor | None, tile_rows: int, first_block: torch.Tensor | None
             ) -> KeyPlan:
    if tiles is None:
        rows = torch.arange(q_pos.shape[0], device=q_pos.device)[:, None]
    else:
        last = (tiles[:, 1:] - 1).clamp(min=0)  # a tile of 0 rows (graph padding) repeats its first
        rows = tiles[:, :1] + torch.arange(tile_rows, dtype=tiles.dtype, device=q_pos.device).minimum(last)  # [C, R]
    seq = seq_of[rows[:, 0]]
    tables, block_size = block_tables[seq], k_cache.shape[1]
    k_pos = first_blocks(first_block, block_tables)[seq][:, None] * block_size + torch.arange(
        tables.shape[1] * block_size, dtype=tables.dtype, device=q_pos.device)
    return KeyPlan(rows, tables.clamp(0, k_cache.shape[0] - 1), visible_keys(q_pos[rows], k_pos, window))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_of: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                        gate: torch.Tensor | None = None, tiles: torch.Tensor | None = None, tile_rows: int = 1,
                        first_block: torch.Tensor | None = None, plans: dict | None = None) -> torch.Tensor:
    """q [T, H, D], caches [blocks, block_size, KVH, D], block_tables [S, max_blocks] (int),
    seq_of / q_pos [T], gate [T, H] (pre-sigmoid) -> [T, H, D] in q's dtype; `tiles`, `tile_rows` and
    `first_block` as `paged_attention` takes them. All tiles at once: each tile's rows (padded to
    tile_rows by repeating its last) against the keys its sequence's table row reaches. `plans`: a
    step's memo of KeyPlans by window, which its layers of one kind share (their other inputs are
    the same)."""
    plans = {} if plans is None else plans
    if window not in plans:
        plans[window] = key_plan(k_cache, block_tables, seq_of, q_pos, window, tiles, tile_rows, first_block)
    plan = plans[window]
    # [C * W, block, ...] -> [C, W, ...] -> [C, W * block, ...]: compiled with an unbacked tile count C
    # (runner.CompiledStep), inductor (torch 2.13) got the one-view reshape [C * W, block] -> [C, W * block] wrong
    keys, values = (c.index_select(0, plan.blocks.flatten()).unflatten(0, plan.blocks.shape).flatten(1, 2)
                    for c in (k_cache, v_cache))
    out = attend(q[plan.rows], keys, values, plan.visible)
    if gate is not None:
        out = (out.float() * torch.sigmoid(gate[plan.rows].float())[..., None]).to(q.dtype)
    result = torch.empty_like(q)
    result[plan.rows] = out  # a padding row writes what the row it repeats wrote
    return result


if triton is not None:

    @triton.jit
    def kv_tile(Cache, row_ptr, n, n_ok, d, d_ok, kv_head, stride_b, stride_s, stride_h, BLOCK_SIZE: tl.constexpr):
        """Keys (or values) at positions n of one sequence, found through its block table (`row_ptr`
        points where block 0's entry would be, see `table_row`): [len(n), len(d)]. Offsets in int64:
        a cache of a few GB holds more than 2^31 elements (int32 offsets wrapped into illegal
        addresses on an H200, where the engine's caches fill most of the card)."""
        block = tl.load(row_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        offsets = block[:, None] * stride_b + (n % BLOCK_SIZE)[:, None] * stride_s + kv_head * stride_h + d[None, :]
        return tl.load(Cache + offsets, mask=n_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def softmax_step(q, k, v, n, n_ok, pos, window, scale, m, denom, acc, IEEE: tl.constexpr):
        """One key tile of online softmax for query rows at positions `pos` (causal, and windowed when
        window > 0): returns the updated running max, denominator and unnormalised output. Rows that
        see no key yet keep m = -inf and add nothing. fp32 dots stay fp32 on a GPU (IEEE, not tf32)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s.to(tl.float32) * scale
        visible = (n[None, :] <= pos[:, None]) & n_ok[None, :]
        visible = visible & ((window <= 0) | (pos[:, None] - n[None, :] < window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, denom * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv.to(tl.float32)

    @triton.jit
    def table_row(Tables, FirstBlock, seq, stride_tb):
        """Where block 0 of sequence `seq` would sit in its table row: the row may start at block
        FirstBlock[seq] (sliding layers pass only the blocks their window can reach)."""
        return Tables + seq * stride_tb - tl.load(FirstBlock + seq)

    @triton.jit
    def _paged_attention_kernel(Q, K, V, Gate, Out, Tables, FirstBlock, SeqOf, QPos, Tiles, Part, Stats, scale,
                                window,
                                num_rows, num_heads,
                                stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                                stride_vb, stride_vs, stride_vh, stride_ot, stride_oh, stride_tb, stride_gt,
                                BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                                BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr, IEEE: tl.constexpr,
                                SPLITS: tl.constexpr):
        """One program per (tile, kv head, split): the up to BLOCK_R rows of the tile (consecutive rows
        of one sequence) times the GROUP query heads sharing the kv head are the BLOCK_R * BLOCK_G rows
        of one matrix, so each key tile is read once for all of them; online softmax over key tiles
        of BLOCK_N positions, tl.dot for both products. With SPLITS > 1 the tile's key range is cut
        into SPLITS runs (flash decoding: long contexts keep every SM busy); each program stores its
        unnormalised sums and (max, denominator) in Part / Stats for `_combine_kernel`. A tile of 0
        rows (graph padding) computes nothing."""
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        first = tl.load(Tiles + tile * 2)
        count = tl.load(Tiles + tile * 2 + 1)
        m_idx = tl.arange(0, BLOCK_R * BLOCK_G)
        r = m_idx // BLOCK_G
        g = m_idx % BLOCK_G
        m_ok = (r < count) & (g < GROUP)
        rows = first + r
        heads = kv_head * GROUP + g
        some = count > 0
        seq = tl.load(SeqOf + first, mask=some, other=0)
        row_of_seq = table_row(Tables, FirstBlock, seq, stride_tb)
        pos = tl.load(QPos + rows, mask=m_ok, other=0)
        first_pos = tl.load(QPos + first, mask=some, other=0)
        last_pos = tl.load(QPos + first + count - 1, mask=some, other=-1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
        m = tl.full([BLOCK_R * BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_R * BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_R * BLOCK_G, BLOCK_D], tl.float32)
        run = tl.cdiv(tl.cdiv(last_pos + 1 - lo, SPLITS), BLOCK_N) * BLOCK_N  # keys per split
        run_lo = lo + split * run
        run_hi = tl.minimum(run_lo + run, last_pos + 1)
        for start in range(run_lo, run_hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < run_hi
            k = kv_tile(K, row_of_seq, n, n_ok, d, d_ok, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
            v = kv_tile(V, row_of_seq, n, n_ok, d, d_ok, kv_head, stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
            m, denom, acc = softmax_step(q, k, v, n, n_ok, pos, window, scale, m, denom, acc, IEEE)
        if SPLITS > 1:
            at = (split * num_rows + rows) * num_heads + heads  # Part [SPLITS, rows, heads, HEAD_DIM]
            tl.store(Part + at[:, None] * HEAD_DIM + d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
            tl.store(Stats + at * 2, m, mask=m_ok)
            tl.store(Stats + at * 2 + 1, denom, mask=m_ok)
        else:
            out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
            if HAS_GATE:
                gate = tl.load(Gate + rows * stride_gt + heads, mask=m_ok, other=0.0).to(tl.float32)
                out = out * tl.sigmoid(gate)[:, None]
            tl.store(Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


    @triton.jit
    def _combine_kernel(Part, Stats, Gate, Out, num_rows, num_heads, stride_gt, stride_ot, stride_oh,
                        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_GATE: tl.constexpr):
        """One program per (row, head): the splits' partial softmax sums rescaled to their common max."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        s_ok = sp < SPLITS
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        at = (sp * num_rows + row) * num_heads + head
        m = tl.load(Stats + at * 2, mask=s_ok, other=float("-inf"))
        denom = tl.load(Stats + at * 2 + 1, mask=s_ok, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
        acc = tl.load(Part + at[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        total = tl.sum(w * denom, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
        if HAS_GATE:
            out = out * tl.sigmoid(tl.load(Gate + row * stride_gt + head).to(tl.float32))
        tl.store(Out + row * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


def first_blocks(first_block: torch.Tensor | None, tables: torch.Tensor) -> torch.Tensor:
    """The kernels' FirstBlock argument: int32 on the tables' device, zeros when not given."""
    if first_block is None:
        return torch.zeros(tables.shape[0], dtype=torch.int32, device=tables.device)
    return first_block.to(device=tables.device, dtype=torch.int32).contiguous()


MAX_SPLITS = 32


def kv_splits(programs: int, device: torch.device) -> int:
    """Key-range splits so that about four programs per SM (eight on a CPU) run: 1 for wide batches,
    up to MAX_SPLITS for one long sequence."""
    sms = multiprocessors(device) or 2
    return max(1, min(MAX_SPLITS, -(-4 * sms // programs)))



def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_of: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                    gate: torch.Tensor | None = None, block_n: int = 32, tiles: torch.Tensor | None = None,
                    tile_rows: int = 1, splits: int | None = None,
                    first_block: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel; same contract as `paged_attention_ref`. `tiles` [C, 2] int32 (first row, row
    count; `kernels.tiles.prefill_tiles` with `tile_rows`, a power of two) groups consecutive rows of
    one sequence at consecutive positions, so a verify step reads its keys once; without them every
    row is its own tile (and seq_of need not be read back to the host). `splits` cuts each tile's key
    range into that many runs combined afterwards (default: `kv_splits`, by the grid's size only,
    so that it stays fixed for a CUDA graph). `first_block` [S] (int): row s of the tables holds
    blocks first_block[s], first_block[s] + 1, ... (default 0: whole tables)."""
    if triton is None:
        raise RuntimeError("paged_attention needs triton (pip install triton)")
    rows, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous in head_dim")
    if tile_rows & (tile_rows - 1):
        raise ValueError(f"tile_rows must be a power of two, got {tile_rows}")
    if tiles is None:
        each = torch.arange(rows, dtype=torch.int32, device=q.device)
        tiles, tile_rows = torch.stack([each, torch.ones_like(each)], 1), 1
    tiles = tiles.to(q.device)
    q = q.contiguous()
    out = torch.empty_like(q)
    group = num_heads // num_kv
    block_g = max(triton.next_power_of_2(group), 16 // tile_rows, 1)  # tl.dot needs 16 rows
    tables = block_tables.to(torch.int32).contiguous()
    first_block = first_blocks(first_block, tables)
    gate_arg = gate.contiguous() if gate is not None else q
    splits = splits or kv_splits(tiles.shape[0] * num_kv, q.device)
    part = torch.empty(splits, rows, num_heads, head_dim, dtype=torch.float32, device=q.device) if splits > 1 else q
    stats = torch.empty(splits, rows, num_heads, 2, dtype=torch.float32, device=q.device) if splits > 1 else q
    _paged_attention_kernel[(tiles.shape[0], num_kv, splits)](
        q, k_cache, v_cache, gate_arg, out, tables, first_block, seq_of.to(torch.int32).contiguous(),
        q_pos.to(torch.int32).contiguous(), tiles, part, stats, 1.0 / math.sqrt(head_dim), window or 0, rows,
        num_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), tables.stride(0),
        gate_arg.stride(0),
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, BLOCK_G=block_g, BLOCK_R=tile_rows, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, HAS_GATE=gate is not None,
        IEEE=q.dtype == torch.float32, SPLITS=splits)
    if splits > 1:
        _combine_kernel[(rows, num_heads)](
            part, stats, gate_arg, out, rows, num_heads, gate_arg.stride(0), out.stride(0), out.stride(1),
            SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim), HAS_GATE=gate is not None)
    return out
