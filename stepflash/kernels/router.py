"""MoE routing of a step's tokens in one launch: sigmoid scores of the router logits, the top k experts
by score + bias (the bias steers the choice only), their scores renormalised and scaled.

In PyTorch this is seven kernels a layer after the router's GEMV (sigmoid, add, topk with its sort,
gather, sum, divide, multiply), each a few microseconds on a GPU where the whole layer's decode step
is a few hundred: one program per token here, the k choices taken by repeated argmax. `route_ref` is
the PyTorch twin, and the model's routing where the kernels are off.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine never needs the kernels
    triton = None


def route_ref(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scaling: float,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (expert ids [T, k], routing weights [T, k] fp32)."""
    scores = torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias.float()
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


if triton is not None:

    @triton.jit
    def _route_kernel(Logits, Bias, Ids, Weights, experts, stride_l, scaling, TOP_K: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RENORMALIZE: tl.constexpr):
        t = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < experts
        scores = tl.sigmoid(tl.load(Logits + t * stride_l + e, mask=e_ok, other=0.0).to(tl.float32))
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(Bias + e, mask=e_ok, other=0.0).to(tl.float32)
        choice = tl.where(e_ok, choice, float("-inf"))
        k = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_K], tl.int32)
        weights = tl.zeros([BLOCK_K], tl.float32)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(choice, 0)
            ids = tl.where(k == j, best, ids)
            weights = tl.where(k == j, tl.sum(tl.where(e == best, scores, 0.0), 0), weights)
            choice = tl.where(e == best, float("-inf"), choice)
        if RENORMALIZE:
            weights = weights / (tl.sum(weights, 0) + 1e-20)
        tl.store(Ids + t * TOP_K + k, ids, mask=k < TOP_K)
        tl.store(Weights + t * TOP_K + k, weights * scaling, mask=k < TOP_K)


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scaling: float,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel; same contract as `route_ref`, the ids int32 (what the MoE kernels read)."""
    if triton is None:
        raise RuntimeError("route needs triton (pip install triton)")
    tokens, experts = logits.shape
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    if tokens:
        _route_kernel[(tokens,)](logits, bias if bias is not None else logits, ids, weights, experts, logits.stride(0),
                                 float(scaling), TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                                 BLOCK_E=triton.next_power_of_2(experts), HAS_BIAS=bias is not None,
                                 RENORMALIZE=renormalize)
    return ids, weights
