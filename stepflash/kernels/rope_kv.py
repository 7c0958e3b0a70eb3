"""Per-head q/k RMSNorm and partial NeoX rotary embedding of q and k fused with the KV-cache write:
one pass reads q, k, v and the cos/sin rows, returns normalised and rotated q and stores normalised and
rotated k, and v, at their cache slots.

Each head of q and k is first normalised (`QKNorms`: zero-centred weights, as model/norm.py's
RMSNorm; rounded to the input's dtype, as the separate norm would), then its first `rotary_dim` dims
rotate (x1, x2 halves: x1 cos - x2 sin, x2 cos + x1 sin); the tail passes through.
`rope_kv_write_ref` is the PyTorch twin; `apply_rotary` is also the model's rotary embedding where
there is no cache (model/attention.py).
"""

from typing import NamedTuple

import torch

from stepflash.kernels.rmsnorm import add_rmsnorm_ref

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class QKNorms(NamedTuple):
    """The per-head RMSNorms of q and k: their weights [head_dim] and epsilon."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The PyTorch path: q [T, H, D] and k [T, KVH, D] normalised per head."""
        return tuple(add_rmsnorm_ref(x, None, w, self.eps)[1] for x, w in ((q, self.q_weight), (k, self.k_weight)))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head of x [T, heads, head_dim]; the tail passes."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd].float(), x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    out = rot * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]
    if rd == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def rope_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      norms: QKNorms | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D], cos/sin [T, rotary_dim] fp32, caches [blocks, block_size, KVH, D],
    slots [T] -> q normalised (with `norms`) and rotated; k likewise, and v, are written to the caches."""
    if norms is not None:
        q, k = norms.apply(q, k)
    q, k = apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([q.shape[1], k.shape[1]], dim=1)
    k_cache.flatten(0, 1).index_copy_(0, slots, k)
    v_cache.flatten(0, 1).index_copy_(0, slots, v)
    return q


if triton is not None:

    @triton.jit
    def _rope_kv_kernel(Q, K, V, Cos, Sin, KC, VC, Slots, QOut, WQ, WK, eps, num_heads,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                        stride_cs, stride_ch, stride_ot, stride_oh,
                        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        NORM: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        c = tl.load(Cos + t * stride_ct + j, mask=j_ok, other=1.0)
        s = tl.load(Sin + t * stride_ct + j, mask=j_ok, other=0.0)
        d = tl.arange(0, BLOCK_D)
        tail = (d >= 2 * HALF) & (d < HEAD_DIM)
        if head < num_heads:
            src = Q + t * stride_qt + head * stride_qh
            dst = QOut + t * stride_ot + head * stride_oh
            w = WQ
        else:
            kv_head = head - num_heads
            src = K + t * stride_kt + kv_head * stride_kh
            dst = KC + tl.load(Slots + t) * stride_cs + kv_head * stride_ch
            v = tl.load(V + t * stride_vt + kv_head * stride_vh + d, mask=d < HEAD_DIM)
            tl.store(VC + tl.load(Slots + t) * stride_cs + kv_head * stride_ch + d, v, mask=d < HEAD_DIM)
            w = WK
        x1 = tl.load(src + j, mask=j_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
        rest = tl.load(src + d, mask=tail, other=0.0)
        if NORM:  # the head's RMSNorm first, its output rounded to the input's dtype
            r = rest.to(tl.float32)
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0) + tl.sum(r * r, 0)) / HEAD_DIM + eps)
            dtype = rest.dtype
            x1 = (x1 * inv * (1.0 + tl.load(w + j, mask=j_ok, other=0.0).to(tl.float32))).to(dtype).to(tl.float32)
            x2 = (x2 * inv * (1.0 + tl.load(w + HALF + j, mask=j_ok, other=0.0).to(tl.float32))).to(dtype).to(
                tl.float32)
            rest = (r * inv * (1.0 + tl.load(w + d, mask=tail, other=0.0).to(tl.float32))).to(dtype)
        tl.store(dst + j, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=j_ok)
        tl.store(dst + HALF + j, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=j_ok)
        tl.store(dst + d, rest.to(dst.dtype.element_ty), mask=tail)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  norms: QKNorms | None = None) -> torch.Tensor:
    """The Triton kernel; same contract as `rope_kv_write_ref` (caches contiguous; q, k and v may be
    strided views of the packed projection)."""
    if triton is None:
        raise RuntimeError("rope_kv_write needs triton (pip install triton)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    half = cos.shape[-1] // 2
    out = torch.empty_like(q)
    kc, vc = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, KVH, D]
    cos, sin = cos.contiguous(), sin.contiguous()
    q_weight, k_weight, eps = norms if norms is not None else (cos, cos, 0.0)  # unread without norms
    _rope_kv_kernel[(tokens, num_heads + num_kv)](
        q, k, v, cos, sin, kc, vc, slots.to(torch.int64).contiguous(), out, q_weight, k_weight, float(eps), num_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), out.stride(0), out.stride(1),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        NORM=norms is not None)
    return out
