"""Fused MoE: only the selected experts' weights are read, SwiGLU (with its clamp) and the routing
weight are applied inside the kernels.

Two launches over the (token, expert) pairs of the step (weights in the model's dtype, INT4 packed
as `model/quant.py` writes them, or FP8 block-scaled as published; quantized weights are decoded in
registers, their scale S[expert, r // SR, c // SC], SR x SC = 1 x group for INT4 and the FP8 block,
applied once per row and scale block where a tile covers whole blocks (the usual case), else per
value): the first computes a = swiglu(x W_gate^T, x W_up^T) for a tile of the intermediate
dimension, the second y = a W_down^T times the pair's routing weight; the k pairs of a token are
summed in fp32, with `add` (the shared expert's output) added before the one rounding to x's dtype
(a third launch: kernels/reduce.py). For a few tokens (decode) each program takes one pair (a
matrix-vector product); for many (prefill), the pairs are sorted by expert and cut into blocks of
one expert's pairs (`expert_blocks`), and each program multiplies a block's rows by a weight tile
with tl.dot, reading each weight tile once per block rather than once per pair. `fused_moe_ref` is
the PyTorch twin, and the model's own MoE where the kernels are off. `swiglu` is the dense MLPs'
(the shared expert's) activation in one launch; `swiglu_ref` its twin.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepflash.kernels.fp8_linear import dequantize_fp8
from stepflash.kernels.reduce import sum_parts, sum_parts_ref

# the twin's tokens x experts up to which, when the tokens pick more pairs than there are experts,
# every token goes through every expert: E / k times the pairs' FLOPs, in three calls (only models of
# few experts ever qualify: E^2 < 256 k, e.g. the bundled model's 8 of top-2, not Step-3.5-Flash's 288)
EVERY_EXPERT_MAX_ROWS = 256
GROUPED_MIN_TOKENS = 16  # from this many tokens on (prefill chunks, wide verify batches) pairs go in blocks

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine never needs the kernels
    triton = None

Scales = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up; with limit L > 0: min(silu(gate), L) * clamp(up, -L, L)."""
    act = F.silu(gate)
    if limit > 0:
        act = act.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return act * up


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """INT4 as `model.quant.quantize_int4` packs it -> fp32: w = (nibble - 8) * scale of its group."""
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=-1).flatten(-2).float()
    return q * scales.float().repeat_interleave(group_size, dim=-1)


def fused_moe_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  ids: torch.Tensor, weights: torch.Tensor, limit: float, int4_scales: Scales | None = None,
                  group_size: int = 128, fp8_scales: Scales | None = None,
                  fp8_block: tuple[int, int] = (128, 128), add: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], w_gate/w_up [E, I, H], w_down [E, H, I] (or quantized, as `fused_moe` takes them),
    ids/weights [T, k] -> [T, H] in x's dtype; matmuls in x's dtype, a token's k pairs summed in fp32
    and `add` [T, H] (the shared expert's output) added to the sum before it is rounded.
    The (token, expert) pairs sorted by expert and each projection one grouped GEMM over them, every
    selected expert's weight read once where it lies; a single token's k experts (compiled: those
    of a few tokens) are gathered into one batched GEMM instead (fewer calls); and where a few tokens
    pick more pairs than there are experts (a model of few experts: every expert is read anyway),
    each token goes through every expert (`_every_expert`). Nothing is read back
    to the host, except how many experts are selected when they are quantized: those are
    dequantized, once each. Weights narrower than x (the CPU keeps a bf16 checkpoint's experts in
    bf16 under fp32 compute: model/loader.py) are upcast after the gather, so a step reads only the
    selected experts' 16-bit bytes; compiled, the pairs of up to EVERY_EXPERT_MAX_ROWS / E tokens
    are then gathered rather than every token sent through every expert, which would upcast them all."""
    flat = ids.reshape(-1)
    if int4_scales is None and fp8_scales is None:
        experts, mats = flat, [w_gate, w_up, w_down]
    else:
        used, experts = flat.unique(return_inverse=True)
        mats = [(dequantize_int4(w[used], s[used], group_size) if int4_scales is not None
                 else dequantize_fp8(w[used], s[used], fp8_block)).to(x.dtype)
                for w, s in zip((w_gate, w_up, w_down), int4_scales or fp8_scales)]
    few = ids.shape[0] * w_gate.shape[0] <= EVERY_EXPERT_MAX_ROWS
    narrow = mats[0].dtype != x.dtype
    if not narrow and ids.numel() > w_gate.shape[0] and few:
        return _every_expert(x, *mats, experts.view(ids.shape), weights, limit, add)
    # compiled (torch.compile on the CPU), the experts of a few tokens are gathered too, as long as
    # that reads no more weights than the grouped GEMM (pairs <= experts; narrow weights: as long as
    # every expert would go through them): inductor fuses the gather and the upcast into its batched
    # products, faster there than the grouped GEMM's call per expert. (`narrow` is tested first here
    # and above: each size test compiled becomes a guard, and narrow weights need only `few`, so
    # their steps of 2 to EVERY_EXPERT_MAX_ROWS / E rows share one graph.)
    if ids.shape[0] == 1 or (torch.compiler.is_compiling() and ((narrow and few) or ids.numel() <= w_gate.shape[0])):
        gate, up, down = (_take(m, experts).to(x.dtype) for m in mats)
        rows = x[:, None].expand(-1, ids.shape[1], -1).reshape(-1, 1, x.shape[1])  # token t's row k times
        y = torch.bmm(swiglu_ref(torch.bmm(rows, gate.mT), torch.bmm(rows, up.mT), limit), down.mT)[:, 0]
        return sum_parts_ref((y.float() * weights.reshape(-1, 1)).view(*ids.shape, -1), add, x.dtype)
    gate, up, down = (m.to(x.dtype) for m in mats)
    order = experts.argsort(stable=True)
    ends = torch.searchsorted(experts[order], torch.arange(gate.shape[0], device=x.device), right=True)
    token, ends = order // ids.shape[1], ends.to(torch.int32)
    rows = x.index_select(0, token)

    def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _GroupedLinear.apply(a, w, ends)
        # the custom op only where torch.compile traces: eager, its dispatch costs ~18 us a call
        return grouped_mm(a, w.mT, ends) if torch.compiler.is_compiling() else F.grouped_mm(a, w.mT, offs=ends)

    y = linear(swiglu_ref(linear(rows, gate), linear(rows, up), limit), down).float() * weights.reshape(-1, 1)[order]
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y)
    return sum_parts_ref(total[:, None], add, x.dtype)


@torch.library.custom_op("stepflash::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm(a, b, offs=ends), opaque to torch.compile (whose shape function for it takes
    only bf16 on the CPU)."""
    return F.grouped_mm(a, b, offs=ends)


@grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


def _every_expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, limit: float, add: torch.Tensor | None) -> torch.Tensor:
    """Every token through every expert, each projection one batched GEMM reading each expert's
    weight once where it lies (no gathered copies, no call per expert), the pairs not picked masked
    out of the fp32 sum."""
    rows = x.expand(gate.shape[0], *x.shape)
    y = torch.bmm(swiglu_ref(torch.bmm(rows, gate.mT), torch.bmm(rows, up.mT), limit), down.mT)  # [E, T, H]
    picked = torch.zeros(x.shape[0], gate.shape[0], dtype=torch.float32, device=x.device)
    # [E, T, 1]: the routing weights, 0 unpicked; added, as expert parallelism maps other ranks' experts
    # onto local expert 0 at weight 0 (model/moe.py local_routes): a token may pick it twice
    picked = picked.scatter_add(1, ids, weights.float()).mT[:, :, None]
    parts = torch.where(picked != 0, y.float() * picked, 0.0)  # not 0 * y: an unpicked inf would be NaN
    return sum_parts_ref(parts.transpose(0, 1), add, x.dtype)


def _take(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """w[index] along the first dim, copied in w's own layout (the loader keeps CPU weights
    column-major, which a gather of rows would transpose on the way)."""
    return w.mT.index_select(0, index).mT if w.stride(-1) != 1 else w.index_select(0, index)


class _GroupedLinear(torch.autograd.Function):
    """y = x W_g^T for the rows of each group g (rows of group g end at ends[g]): F.grouped_mm, with
    the backward written out (PyTorch's fails on the CPU for 3-D weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, ends)
        return F.grouped_mm(x, w.mT, offs=ends)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w, ends = ctx.saved_tensors
        return F.grouped_mm(dy, w, offs=ends), F.grouped_mm(dy.T, x, offs=ends), None


if triton is not None:
    from stepflash.kernels.fp8_linear import fp8_decode

    @triton.jit
    def _weight_tile(W, S, expert, r, c, mask, stride_we, stride_wr, stride_wc, stride_se, stride_sr, stride_sc,
                     INT4: tl.constexpr, FP8: tl.constexpr, SR: tl.constexpr, SC: tl.constexpr):
        """fp32 tile W[expert, r, c]. INT4: nibble c % 2 of byte c // 2, minus 8; FP8: the byte decoded;
        both times S[expert, r // SR, c // SC]."""
        if INT4 or FP8:
            scale = tl.load(S + expert * stride_se + (r[:, None] // SR) * stride_sr + (c[None, :] // SC) * stride_sc,
                            mask=mask, other=0.0).to(tl.float32)
            if INT4:
                byte = tl.load(W + expert * stride_we + r[:, None] * stride_wr + (c[None, :] // 2) * stride_wc,
                               mask=mask, other=0).to(tl.int32)
                q = ((byte >> ((c[None, :] % 2) * 4)) & 0xF).to(tl.float32) - 8.0
            else:
                q = fp8_decode(tl.load(W + expert * stride_we + r[:, None] * stride_wr + c[None, :] * stride_wc,
                                       mask=mask, other=0))
            return q * scale
        return tl.load(W + expert * stride_we + r[:, None] * stride_wr + c[None, :] * stride_wc,
                       mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _int4_pairs(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C: tl.constexpr):
        """The bytes of W[expert, r, c0 .. c0 + BLOCK_C] as int32 [len(r), BLOCK_C // 2] (low nibble: the
        even column c, high: c + 1), with those even columns and their mask. Offsets and mask are
        taken over the bytes (C is even: whole groups), so the compiler sees both contiguous and
        loads several bytes at once, which c // 2 and c < C over the even columns would hide."""
        half = c0 // 2 + tl.arange(0, BLOCK_C // 2)
        c = 2 * half
        c_ok = half < C // 2
        byte = tl.load(W + expert * stride_we + r[:, None] * stride_wr + half[None, :] * stride_wc,
                       mask=r_ok[:, None] & c_ok[None, :], other=0).to(tl.int32)
        return byte, c, c_ok

    @triton.jit
    def _fp8_values(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C: tl.constexpr):
        """W[expert, r, c0 .. c0 + BLOCK_C] decoded to fp32 (unscaled), with the columns and their mask."""
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w = fp8_decode(tl.load(W + expert * stride_we + r[:, None] * stride_wr + c[None, :] * stride_wc,
                               mask=r_ok[:, None] & c_ok[None, :], other=0))
        return w, c, c_ok

    @triton.jit
    def _block_scales(S, expert, r, r_ok, c0, C, stride_se, stride_sr, stride_sc, SR: tl.constexpr,
                      SC: tl.constexpr, GROUPS: tl.constexpr):
        """The scales of rows r in the GROUPS scale blocks from column c0's on: [len(r), GROUPS] fp32
        (0 for blocks past the C columns)."""
        g = c0 // SC + tl.arange(0, GROUPS)
        return tl.load(S + expert * stride_se + (r // SR)[:, None] * stride_sr + g[None, :] * stride_sc,
                       mask=r_ok[:, None] & (g * SC < C)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _row_dots(W, S, X, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, stride_se, stride_sr, stride_sc,
                  BLOCK_C: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, SR: tl.constexpr, SC: tl.constexpr,
                  GROUPS: tl.constexpr):
        """sum over c in c0 .. c0 + BLOCK_C of W[expert, r, c] x[c] (x at X, fp32 products): [len(r)].
        Quantized weights whose column tile covers whole scale blocks (GROUPS of them: a tile of one
        block, or of several, as wide tiles at decode read more bytes a step) are summed as stored
        per block and each block's sum scaled once per row, not once per value; INT4 then reads each
        byte once, its low and high nibbles against x's even and odd columns. GROUPS = 0: scaled
        per value (a tile that cuts a scale block)."""
        if (INT4 or FP8) and GROUPS > 0:
            if INT4:
                byte, c, c_ok = _int4_pairs(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C)
                x_even = tl.load(X + c, mask=c_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(X + c + 1, mask=c_ok, other=0.0).to(tl.float32)
                products = (((byte & 0xF).to(tl.float32) - 8.0) * x_even[None, :]
                            + ((byte >> 4).to(tl.float32) - 8.0) * x_odd[None, :])  # a column pair each
            else:
                w, c, c_ok = _fp8_values(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C)
                products = w * tl.load(X + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            sums = tl.sum(tl.reshape(products, [products.shape[0], GROUPS, products.shape[1] // GROUPS]), axis=2)
            scales = _block_scales(S, expert, r, r_ok, c0, C, stride_se, stride_sr, stride_sc, SR, SC, GROUPS)
            dots = tl.sum(sums * scales, axis=1)
        else:
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            w = _weight_tile(W, S, expert, r, c, r_ok[:, None] & c_ok[None, :], stride_we, stride_wr, stride_wc,
                             stride_se, stride_sr, stride_sc, INT4, FP8, SR, SC)
            dots = tl.sum(w * tl.load(X + c, mask=c_ok, other=0.0).to(tl.float32)[None, :], axis=1)
        return dots

    @triton.jit
    def _gate_up_kernel(X, Wg, Wu, Sg, Su, Ids, A, H: tl.constexpr, I: tl.constexpr, limit, top_k, stride_x,
                        stride_we, stride_wi, stride_wh, stride_se, stride_si, stride_sh, stride_a,
                        BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr,
                        SR: tl.constexpr, SC: tl.constexpr, GROUPS: tl.constexpr):
        """One program per (pair, tile of I). The shape is compiled in (one model, one variant): the
        column masks are then known to hold on whole tiles, and the loads are as wide as they can be."""
        pair = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < I
        expert = tl.load(Ids + pair)
        x_row = X + (pair // top_k) * stride_x
        acc_g = tl.zeros([BLOCK_I], tl.float32)
        acc_u = tl.zeros([BLOCK_I], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            acc_g += _row_dots(Wg, Sg, x_row, expert, i, i_ok, h0, H, stride_we, stride_wi, stride_wh, stride_se,
                               stride_si, stride_sh, BLOCK_H, INT4, FP8, SR, SC, GROUPS)
            acc_u += _row_dots(Wu, Su, x_row, expert, i, i_ok, h0, H, stride_we, stride_wi, stride_wh, stride_se,
                               stride_si, stride_sh, BLOCK_H, INT4, FP8, SR, SC, GROUPS)
        act = acc_g * tl.sigmoid(acc_g)
        if limit > 0:
            act = tl.minimum(act, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        tl.store(A + pair * stride_a + i, act * acc_u, mask=i_ok)

    @triton.jit
    def _down_kernel(A, Wd, Sd, Ids, RouteW, Y, H: tl.constexpr, I: tl.constexpr, stride_a, stride_we, stride_wo,
                     stride_wi, stride_se, stride_so, stride_si, stride_y, BLOCK_O: tl.constexpr,
                     BLOCK_I: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, SR: tl.constexpr,
                     SC: tl.constexpr, GROUPS: tl.constexpr):
        pair = tl.program_id(0)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < H
        expert = tl.load(Ids + pair)
        acc = tl.zeros([BLOCK_O], tl.float32)
        for i0 in range(0, I, BLOCK_I):
            acc += _row_dots(Wd, Sd, A + pair * stride_a, expert, o, o_ok, i0, I, stride_we, stride_wo, stride_wi,
                             stride_se, stride_so, stride_si, BLOCK_I, INT4, FP8, SR, SC, GROUPS)
        route = tl.load(RouteW + pair).to(tl.float32)
        tl.store(Y + pair * stride_y + o, acc * route, mask=o_ok)


    @triton.jit
    def _swiglu_kernel(Gate, Up, Out, I, limit, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
        """One program per (row, tile of I): the dense MLP's SwiGLU in fp32, rounded once."""
        t = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        i_ok = i < I
        gate = tl.load(Gate + t * stride_g + i, mask=i_ok, other=0.0).to(tl.float32)
        up = tl.load(Up + t * stride_u + i, mask=i_ok, other=0.0).to(tl.float32)
        act = gate * tl.sigmoid(gate)
        if limit > 0:
            act = tl.minimum(act, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        tl.store(Out + t * stride_o + i, (act * up).to(Out.dtype.element_ty), mask=i_ok)

    @triton.jit
    def _block_of_pairs(Sorted, BlockExpert, BlockStart, BlockRows, BLOCK_M: tl.constexpr):
        """This program's block (`expert_blocks`): its expert, row count, row mask and pair indices."""
        b = tl.program_id(0)
        count = tl.load(BlockRows + b)
        m_ok = tl.arange(0, BLOCK_M) < count
        pair = tl.load(Sorted + tl.load(BlockStart + b) + tl.arange(0, BLOCK_M), mask=m_ok, other=0)
        return tl.load(BlockExpert + b), count, m_ok, pair

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b with an fp32 accumulator; fp32 inputs stay fp32 on a GPU (IEEE, not tf32)."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _tile_dots(W, S, x_rows, m_ok, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, stride_se,
                   stride_sr, stride_sc, BLOCK_C: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr,
                   SR: tl.constexpr, SC: tl.constexpr, PER_TILE: tl.constexpr, IEEE: tl.constexpr):
        """[M, len(r)]: rows x (pointers x_rows [M, 1], masked by m_ok) times W[expert, r, c]^T over the
        columns c0 .. c0 + BLOCK_C, by tl.dot in x's dtype. With PER_TILE (the column tile inside one
        scale block) quantized values enter the product as stored (exact in fp16 / bf16) and each
        output column is scaled once; INT4 as two products, low nibbles against x's even columns and
        high ones against its odd columns."""
        if (INT4 or FP8) and PER_TILE:
            if INT4:
                byte, c, c_ok = _int4_pairs(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C)
                x_even = tl.load(x_rows + c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                x_odd = tl.load(x_rows + c[None, :] + 1, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                low = ((byte & 0xF) - 8).to(x_even.dtype)
                high = ((byte >> 4) - 8).to(x_even.dtype)
                dots = _dot(x_even, tl.trans(low), IEEE) + _dot(x_odd, tl.trans(high), IEEE)
            else:
                w, c, c_ok = _fp8_values(W, expert, r, r_ok, c0, C, stride_we, stride_wr, stride_wc, BLOCK_C)
                x = tl.load(x_rows + c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                dots = _dot(x, tl.trans(w.to(x.dtype)), IEEE)
            scales = _block_scales(S, expert, r, r_ok, c0, C, stride_se, stride_sr, stride_sc, SR, SC, 1)
            dots = dots * tl.sum(scales, axis=1)[None, :]  # the tile's one block
        else:
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            x = tl.load(x_rows + c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            w = _weight_tile(W, S, expert, r, c, r_ok[:, None] & c_ok[None, :], stride_we, stride_wr, stride_wc,
                             stride_se, stride_sr, stride_sc, INT4, FP8, SR, SC).to(x.dtype)
            dots = _dot(x, tl.trans(w), IEEE)
        return dots

    @triton.jit
    def _grouped_gate_up_kernel(X, Wg, Wu, Sg, Su, Sorted, BlockExpert, BlockStart, BlockRows, A, H: tl.constexpr,
                                I: tl.constexpr, limit, top_k, stride_x, stride_we, stride_wi, stride_wh, stride_se,
                                stride_si, stride_sh, stride_a, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                                BLOCK_H: tl.constexpr,
                                INT4: tl.constexpr, FP8: tl.constexpr, SR: tl.constexpr, SC: tl.constexpr,
                                PER_TILE: tl.constexpr, IEEE: tl.constexpr):
        """One program per (block of up to BLOCK_M pairs routed to one expert, tile of I): x rows
        [BLOCK_M, BLOCK_H] times the expert's weight tiles by tl.dot, so a weight tile is read once
        for the block. Blocks with no rows (the static grid's spare ones) read nothing."""
        expert, rows, m_ok, pair = _block_of_pairs(Sorted, BlockExpert, BlockStart, BlockRows, BLOCK_M)
        x_rows = X + (pair // top_k)[:, None] * stride_x
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < I
        acc_g = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
        for h0 in range(0, tl.where(rows > 0, H, 0), BLOCK_H):
            acc_g += _tile_dots(Wg, Sg, x_rows, m_ok, expert, i, i_ok, h0, H, stride_we, stride_wi, stride_wh,
                                stride_se, stride_si, stride_sh, BLOCK_H, INT4, FP8, SR, SC, PER_TILE, IEEE)
            acc_u += _tile_dots(Wu, Su, x_rows, m_ok, expert, i, i_ok, h0, H, stride_we, stride_wi, stride_wh,
                                stride_se, stride_si, stride_sh, BLOCK_H, INT4, FP8, SR, SC, PER_TILE, IEEE)
        act = acc_g * tl.sigmoid(acc_g)
        if limit > 0:
            act = tl.minimum(act, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        tl.store(A + pair[:, None] * stride_a + i[None, :], act * acc_u, mask=m_ok[:, None] & i_ok[None, :])

    @triton.jit
    def _grouped_down_kernel(A, Wd, Sd, Sorted, BlockExpert, BlockStart, BlockRows, RouteW, Y, H: tl.constexpr,
                             I: tl.constexpr, stride_a, stride_we, stride_wo, stride_wi, stride_se, stride_so,
                             stride_si, stride_y, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                             INT4: tl.constexpr, FP8: tl.constexpr, SR: tl.constexpr, SC: tl.constexpr,
                             PER_TILE: tl.constexpr, IEEE: tl.constexpr):
        expert, rows, m_ok, pair = _block_of_pairs(Sorted, BlockExpert, BlockStart, BlockRows, BLOCK_M)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < H
        acc = tl.zeros([BLOCK_M, BLOCK_O], tl.float32)
        for i0 in range(0, tl.where(rows > 0, I, 0), BLOCK_I):
            acc += _tile_dots(Wd, Sd, A + pair[:, None] * stride_a, m_ok, expert, o, o_ok, i0, I, stride_we, stride_wo,
                              stride_wi, stride_se, stride_so, stride_si, BLOCK_I, INT4, FP8, SR, SC, PER_TILE, IEEE)
        route = tl.load(RouteW + pair, mask=m_ok, other=0.0).to(tl.float32)
        tl.store(Y + pair[:, None] * stride_y + o[None, :], acc * route[:, None], mask=m_ok[:, None] & o_ok[None, :])


def expert_blocks(ids: torch.Tensor, num_experts: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (token, slot) sorted by expert and cut into blocks of at most block_m pairs of one
    expert: (sorted pair indices [P], and per block its expert, first sorted index and row count,
    each [ceil(P / block_m) + min(E, P)] int32; spare blocks have 0 rows). Device ops with static
    shapes only, so it can run inside a CUDA graph."""
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks_of = (counts + block_m - 1) // block_m
    block_end = blocks_of.cumsum(0)
    num_blocks = (pairs + block_m - 1) // block_m + min(num_experts, pairs)
    b = torch.arange(num_blocks, device=ids.device)
    expert = torch.searchsorted(block_end, b, right=True).clamp(max=num_experts - 1)
    local = b - (block_end - blocks_of)[expert]
    start = (counts.cumsum(0) - counts)[expert] + local * block_m
    rows = (counts[expert] - local * block_m).clamp(0, block_m)
    rows = torch.where(b < block_end[-1], rows, 0)
    return order, expert.to(torch.int32), start.to(torch.int32), rows.to(torch.int32)

@dataclass
class MoETiles:
    rows: int  # weight rows per program of the one-pair kernels
    inner: int  # input columns per step of their loop
    grouped: int  # tile edge of the grouped (tl.dot) kernels


def tile_sizes(device: torch.device) -> MoETiles:
    """On a GPU, one-pair programs stream wide rows (16 x 256 values of gate and up per step: long
    contiguous loads, ~600 programs for 8 pairs at the real shape; quantized, two scale blocks a
    row, 128 bytes of INT4); bf16 measured at 2.2-4 TB/s on an H200 (benchmarks/results/GPU.md), the
    quantized formats' tiles not yet (benchmarks/gpu_tiles.py sweeps them). The interpreter on a CPU
    is fastest with small tiles."""
    return MoETiles(16, 256, 64) if device.type == "cuda" else MoETiles(32, 32, 32)


def scale_blocks_per_tile(inner: int, block: int) -> int:
    """How many whole scale blocks of `block` columns a one-pair kernel's column tile of `inner` covers:
    1 for a tile inside one block, 0 for a tile that cuts a block (its values scaled one by one)."""
    if inner % block == 0 and (inner // block) & (inner // block - 1) == 0:  # a power of two: tl.reshape
        return inner // block
    return 1 if block % inner == 0 else 0


def fused_moe(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              ids: torch.Tensor, weights: torch.Tensor, limit: float, block: int | None = None,
              int4_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              group_size: int = 128, fp8_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              fp8_block: tuple[int, int] = (128, 128), grouped: bool | None = None,
              block_m: int = 16, add: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels; same contract as `fused_moe_ref` (weights in any memory layout, e.g. the
    column-major copies the loader makes on CPU; gate and up alike). With `int4_scales` the weights
    are INT4 as `model.quant.quantize_int4` packs them (uint8 [E, out, in / 2]) and are used packed;
    with `fp8_scales` (scale_inv [E, ceil(out / fp8_block[0]), ceil(in / fp8_block[1])]) they are
    float8_e4m3fn (or its uint8 view) [E, out, in] and are read one byte per value. `grouped`
    (default: from GROUPED_MIN_TOKENS tokens on) takes the pairs in per-expert blocks of `block_m`
    through tl.dot instead of one pair per program. `block` sets every tile edge (tests use small
    ones); by default `tile_sizes` picks them for the device."""
    if triton is None:
        raise RuntimeError("fused_moe needs triton (pip install triton)")
    if int4_scales is not None and fp8_scales is not None:
        raise ValueError("expert weights are either INT4 or FP8, not both")
    tokens, hidden = x.shape
    inter = w_gate.shape[1]
    top_k = ids.shape[1]
    if fp8_scales is not None:
        w_gate, w_up, w_down = (w.view(torch.uint8) for w in (w_gate, w_up, w_down))
    s_gate, s_up, s_down = int4_scales or fp8_scales or (w_gate, w_up, w_down)  # unread unless quantized
    if w_gate.stride() != w_up.stride() or s_gate.stride() != s_up.stride():
        raise ValueError("gate and up expert weights must share one memory layout")
    sr, sc = (1, group_size) if int4_scales is not None else fp8_block  # the scale block
    quant = {"INT4": int4_scales is not None, "FP8": fp8_scales is not None, "SR": sr, "SC": sc}
    tiles = tile_sizes(x.device) if block is None else MoETiles(block, block, block)
    x = x.contiguous()
    flat_ids = ids.reshape(-1).to(torch.int32).contiguous()
    flat_w = weights.reshape(-1).float().contiguous()
    pairs = flat_ids.numel()
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    if grouped if grouped is not None else tokens >= GROUPED_MIN_TOKENS:
        a = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)  # rounded as the model's own FFN rounds
        blocks = expert_blocks(ids, w_gate.shape[0], block_m)
        # INT4 per tile takes two products of half the tile's columns: tl.dot wants 16 at least
        per_tile = sc % tiles.grouped == 0 and (not quant["INT4"] or tiles.grouped >= 32)
        dots = {**quant, "BLOCK_M": block_m, "PER_TILE": per_tile, "IEEE": x.dtype == torch.float32}
        _grouped_gate_up_kernel[(blocks[1].numel(), triton.cdiv(inter, tiles.grouped))](
            x, w_gate, w_up, s_gate, s_up, *blocks, a, hidden, inter, float(limit), top_k, x.stride(0),
            *w_gate.stride(), *s_gate.stride(), a.stride(0), BLOCK_I=tiles.grouped, BLOCK_H=tiles.grouped, **dots)
        _grouped_down_kernel[(blocks[1].numel(), triton.cdiv(hidden, tiles.grouped))](
            a, w_down, s_down, *blocks, flat_w, y, hidden, inter, a.stride(0), *w_down.stride(), *s_down.stride(),
            y.stride(0), BLOCK_O=tiles.grouped, BLOCK_I=tiles.grouped, **dots)
        return sum_parts(y.view(tokens, top_k, hidden), add, x.dtype)
    a = torch.empty(pairs, inter, dtype=torch.float32, device=x.device)
    groups = scale_blocks_per_tile(tiles.inner, sc) if quant["INT4"] or quant["FP8"] else 0
    _gate_up_kernel[(pairs, triton.cdiv(inter, tiles.rows))](
        x, w_gate, w_up, s_gate, s_up, flat_ids, a, hidden, inter, float(limit), top_k, x.stride(0), *w_gate.stride(),
        *s_gate.stride(), a.stride(0), BLOCK_I=tiles.rows, BLOCK_H=tiles.inner, **quant, GROUPS=groups)
    _down_kernel[(pairs, triton.cdiv(hidden, tiles.rows))](
        a, w_down, s_down, flat_ids, flat_w, y, hidden, inter, a.stride(0), *w_down.stride(), *s_down.stride(),
        y.stride(0), BLOCK_O=tiles.rows, BLOCK_I=tiles.inner, **quant, GROUPS=groups)
    return sum_parts(y.view(tokens, top_k, hidden), add, x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """The Triton kernel; same contract as `swiglu_ref` (gate and up [T, I], rows of any stride: the
    two halves of the packed gate/up projection), one launch where the twin takes two to four."""
    if triton is None:
        raise RuntimeError("swiglu needs triton (pip install triton)")
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        gate, up = gate.contiguous(), up.contiguous()
    tokens, inter = gate.shape
    out = torch.empty(tokens, inter, dtype=gate.dtype, device=gate.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(inter))
        _swiglu_kernel[(tokens, triton.cdiv(inter, block))](gate, up, out, inter, float(limit), gate.stride(0),
                                                             up.stride(0), out.stride(0), BLOCK=block)
    return out
