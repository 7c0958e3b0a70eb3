"""y = x W^T with W kept in FP8 (float8_e4m3fn, block-scaled as in the Step-3.5-Flash-FP8 release):
W[r, c] = fp8[r, c] * scale_inv[r // BR, c // BC], BR x BC blocks (128 x 128 in the release).

The weight stays one byte per value in memory; each program decodes a [BLOCK_N, BLOCK_K] tile of
bytes in registers, multiplies it by its blocks' scales in fp32, rounds the product to x's dtype (the
values a model holding dequantized weights in that dtype would use) and feeds tl.dot with an fp32
accumulator: tensor cores for fp16 / bf16, IEEE fp32 (no TF32) for fp32. A few rows (decode) take
matrix-vector products in fp32 instead, each tile scaled once after its sum. The decode does not need the
hardware's float8 type: the magnitude bits of an e4m3fn byte, `(b & 0x7F) << 7`, read as an fp16 are
|value| / 256 for every finite value, subnormals included (same 3 mantissa bits on top; exponent bias
7 vs 15 -> 2^-8), so |value| = that * 256 and the sign is bit 7. Bytes 0x7F / 0xFF (NaN) do not occur in weights.
`fp8_linear_ref` is the PyTorch twin: dequantize in fp32 (`dequantize_fp8`, also the loader's), then F.linear.
"""

import math

import torch
import torch.nn.functional as F

from stepflash.kernels.reduce import sum_parts
from stepflash.kernels.tiles import multiprocessors

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 [..., R, C] * scale_inv[..., r // block[0], c // block[1]] -> fp32 [..., R, C]."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :]
    return weight.float() * scale.repeat_interleave(block[1], -1)[..., :cols]


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor:
    """x [..., K], weight float8_e4m3fn [N, K], scale_inv [ceil(N / BR), ceil(K / BC)] -> [..., N] in
    x's dtype (computed in fp32)."""
    return F.linear(x.float(), dequantize_fp8(weight, scale_inv, block)).to(x.dtype)


if triton is not None:

    @triton.jit
    def fp8_decode(byte):
        """uint8 / int32 tile of float8_e4m3fn bytes -> fp32 values (see the module docstring)."""
        bits = byte.to(tl.int32)
        magnitude = ((bits & 0x7F) << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        return tl.where((bits & 0x80) != 0, -magnitude, magnitude)

    @triton.jit
    def _fp8_linear_kernel(X, W, S, Y, M, N, K, k_run, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn,
                           stride_sk, stride_ys, stride_ym, stride_yn, BR: tl.constexpr, BC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           ONE_SCALE: tl.constexpr, GEMV: tl.constexpr, IEEE: tl.constexpr):
        """Program (m tile, n tile, split): the inputs k_run * split .. k_run * (split + 1) (split-K:
        at M = 1 the n tiles alone are too few programs to keep the memory system busy); with
        several splits Y holds fp32 partial sums [splits, M, N]. GEMV (a few rows, one m tile): each
        weight tile is decoded once and multiplied into every row in fp32 registers, no tl.dot (whose
        rows would be padded to 16 and operands rounded to x's dtype); a tile inside one scale block is
        then scaled once per output column, after its sum."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < M, n < N
        k_lo = tl.program_id(2) * k_run
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + k_run, K), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = fp8_decode(tl.load(W + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=w_mask, other=0))
            if ONE_SCALE:  # the tile lies in one scale block: a load per output column, not per value
                scale = tl.load(S + (n // BR) * stride_sn + (k0 // BC) * stride_sk, mask=n_ok, other=0.0)
            else:
                w = w * tl.load(S + (n // BR)[:, None] * stride_sn + (k // BC)[None, :] * stride_sk, mask=w_mask,
                                other=0.0)
            if GEMV:
                part = tl.sum(w[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
                if ONE_SCALE:
                    part = part * scale[None, :]
                acc += part
            else:
                if ONE_SCALE:
                    w = w * scale[:, None]
                w = w.to(x.dtype)
                if IEEE:  # fp32 stays fp32 on a GPU (not tf32)
                    acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
        tl.store(Y + tl.program_id(2) * stride_ys + m[:, None] * stride_ym + n[None, :] * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


GEMV_MAX_ROWS = 4  # up to this many rows fp8_linear takes matrix-vector products


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               block_n: int | None = None, block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """The Triton kernel; same contract as `fp8_linear_ref` (x fp32, fp16 or bf16, rows M). The weight
    (float8_e4m3fn, or its uint8 view) is read as bytes in any memory layout; N and K need not be
    multiples of the tiles or of the scale blocks. Up to GEMV_MAX_ROWS rows (decode, a verify step at
    batch 1) take matrix-vector products in fp32 (the kernel's GEMV, tiles of 16 x 128 by default);
    more take tl.dot on rows padded to a tile of at least 16 (tiles of 64 x 64). `split_k` cuts K
    into that many runs summed afterwards (default: enough for ~2 programs per SM on a GPU, 1
    elsewhere)."""
    if triton is None:
        raise RuntimeError("fp8_linear needs triton (pip install triton)")
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    (rows, inner), (out_features, w_inner) = x.shape, weight.shape
    expected = (math.ceil(out_features / block[0]), math.ceil(inner / block[1]))
    if w_inner != inner or tuple(scale_inv.shape) != expected:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale_inv {tuple(scale_inv.shape)}: "
                         f"expected weight [N, {inner}] and scale_inv {expected} for blocks {block}")
    w = weight.view(torch.uint8)
    gemv = rows <= GEMV_MAX_ROWS
    if gemv:
        block_m = triton.next_power_of_2(max(rows, 1))
        block_n = block_n or 16
        block_k = block_k or (min(128, block[1]) if block[1] & (block[1] - 1) == 0 else 128)
    else:
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        block_n, block_k = block_n or 64, block_k or 64
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    if split_k is None:
        split_k = max(1, min(16, triton.cdiv(2 * multiprocessors(x.device), tiles), triton.cdiv(inner, block_k)))
    k_run = triton.cdiv(triton.cdiv(inner, split_k), block_k) * block_k
    partial = split_k > 1
    y = torch.empty(split_k, rows, out_features, dtype=torch.float32 if partial else x.dtype, device=x.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n), split_k)
    _fp8_linear_kernel[grid](x, w, scale_inv, y, rows, out_features, inner, k_run, *x.stride(), *w.stride(),
                             *scale_inv.stride(), *y.stride(), BR=block[0], BC=block[1], BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=block_k,
                             ONE_SCALE=block[0] % block_n == 0 and block[1] % block_k == 0, GEMV=gemv,
                             IEEE=x.dtype == torch.float32)
    return (sum_parts(y.transpose(0, 1), None, x.dtype) if partial else y[0]).view(*lead, out_features)
