"""Partial NeoX rotary embedding of q and k fused with the KV-cache write: one pass reads q, k, v
and the cos/sin rows, returns rotated q and stores rotated k and v at their cache slots.

The first `rotary_dim` dims of each head rotate (x1, x2 halves: x1 cos - x2 sin, x2 cos + x1 sin);
the tail passes through. `rope_kv_write_ref` is the PyTorch twin; `apply_rotary` is also the model's
rotary embedding where there is no cache (model/attention.py).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D], cos/sin [T, rotary_dim] fp32, caches [blocks, block_size, KVH, D],
    slots [T] -> rotated q; rotated k and v are written to the caches."""
    q, k = apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([q.shape[1], k.shape[1]], dim=1)
    k_cache.flatten(0, 1).index_copy_(0, slots, k)
    v_cache.flatten(0, 1).index_copy_(0, slots, v)
    return q


if triton is not None:

    @triton.jit
    def _rope_kv_kernel(Q, K, V, Cos, Sin, KC, VC, Slots, QOut, num_heads,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                        stride_cs, stride_ch, stride_ot, stride_oh,
                        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
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
        else:
            kv_head = head - num_heads
            src = K + t * stride_kt + kv_head * stride_kh
            dst = KC + tl.load(Slots + t) * stride_cs + kv_head * stride_ch
            v = tl.load(V + t * stride_vt + kv_head * stride_vh + d, mask=d < HEAD_DIM)
            tl.store(VC + tl.load(Slots + t) * stride_cs + kv_head * stride_ch + d, v, mask=d < HEAD_DIM)
        x1 = tl.load(src + j, mask=j_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
        tl.store(dst + j, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=j_ok)
        tl.store(dst + HALF + j, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=j_ok)
        rest = tl.load(src + d, mask=tail, other=0.0)
        tl.store(dst + d, rest, mask=tail)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The Triton kernel; same contract as `rope_kv_write_ref` (caches contiguous)."""
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
    _rope_kv_kernel[(tokens, num_heads + num_kv)](
        q, k, v, cos, sin, kc, vc, slots.to(torch.int64).contiguous(), out, num_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), out.stride(0), out.stride(1),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim))
    return out
