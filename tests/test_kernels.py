"""Triton kernels against their PyTorch twins, on the CPU under TRITON_INTERPRET=1 (fp32 / fp16) or on
a GPU when there is one (fp32 / fp16 / bf16; tests/kernel_env.py), on random inputs of many shapes:
windows crossing block boundaries, ragged batches, one and several query rows per sequence, GQA
groups of 1 to 4 and unpadded head dims. Inputs are built on the CPU and moved to the kernel's
device; the twins run on the CPU."""

import itertools

import pytest
import torch

from kernel_env import KERNEL_DEVICE, KERNEL_DTYPES, on_kernel_device

pytest.importorskip("triton")  # TRITON_INTERPRET=1 on CPU-only machines: see conftest.py

from stepflash.kernels.paged_attention import paged_attention, paged_attention_ref  # noqa: E402
from stepflash.kernels.tiles import length_tiles, prefill_tiles, tile_runs  # noqa: E402


def paged_batch(seq_lens: list[int], queries_per_seq: list[int], heads: int, kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, seed: int):
    """Random caches holding each sequence's keys in shuffled blocks, and query rows at the last
    `queries_per_seq[i]` positions of sequence i."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor(order[used:used + n])
        used += n
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    seq_of = torch.tensor([i for i, q in enumerate(queries_per_seq) for _ in range(q)])
    q_pos = torch.tensor([n - q + j for n, q in zip(seq_lens, queries_per_seq) for j in range(q)])
    q = torch.randn(len(seq_of), heads, head_dim, generator=gen).to(dtype)
    gate = torch.randn(len(seq_of), heads, generator=gen).to(dtype)
    return q, k, v, tables, seq_of, q_pos, gate


def window_tables(tables: torch.Tensor, seq_of: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables cut to the blocks the queries' windows reach (what the runner passes for sliding
    layers): row s starts at block first[s]; the columns before are dropped, not just unused."""
    first = [0] * tables.shape[0]
    if window:
        for s in range(tables.shape[0]):
            lowest = min(int(p) for p, q in zip(q_pos, seq_of) if int(q) == s)
            first[s] = max(0, lowest - window + 1) // block_size
    width = tables.shape[1] - min(first)
    cut = torch.full((tables.shape[0], width), -7, dtype=tables.dtype)  # never read
    for s, f in enumerate(first):
        cut[s, :tables.shape[1] - f] = tables[s, f:]
    return cut, torch.tensor(first, dtype=torch.int32)


def test_tiles_cut_each_sequences_run_of_rows_into_block_m_rows():
    assert tile_runs([0, 0, 0, 1, 1, 2], 2) == [0, 2, 2, 1, 3, 2, 5, 1]  # (first row, rows) pairs
    assert tile_runs([0, 1, 0], 4) == [0, 1, 1, 1, 2, 1]  # a sequence's rows apart: separate runs
    assert length_tiles([3, 2, 1], 2) == [0, 2, 2, 1, 3, 2, 5, 1]
    assert tile_runs([], 4) == length_tiles([], 4) == []


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [
    # seq lens, queries per seq, heads, kv heads, head dim, block size, window
    ([1], [1], 4, 4, 16, 16, None),
    ([37, 5, 64], [1, 1, 1], 8, 2, 32, 16, None),  # ragged decode batch, GQA 4
    ([37, 5, 64], [4, 2, 4], 8, 2, 32, 16, 16),  # verify rows, window 16 crossing blocks
    ([100], [3], 6, 3, 24, 8, 20),  # head dim 24 (padded to 32), window 20 over blocks of 8
    ([17, 33], [1, 4], 4, 1, 64, 4, 7),  # MQA, tiny blocks, odd window
])
def test_paged_attention_matches_reference(dtype, case):
    seq_lens, queries, heads, kv_heads, head_dim, block_size, window = case
    q, k, v, tables, seq_of, q_pos, gate = paged_batch(seq_lens, queries, heads, kv_heads, head_dim, block_size,
                                                       dtype, seed=len(seq_lens) + head_dim)
    # a row per tile; runs of one sequence's rows cut into tiles of 4 or 2 (some tiles partly
    # filled); and graph-style padding: tiles of 0 rows after the real ones
    seqs = seq_of.tolist()
    tilings = [(None, 1), (prefill_tiles(seqs, 4), 4), (prefill_tiles(seqs, 2), 2),
               (torch.cat([prefill_tiles(seqs, 4), torch.zeros(3, 2, dtype=torch.int32)]), 4)]
    inputs = on_kernel_device(q, k, v, tables, seq_of, q_pos)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for g in (None, gate):
        ref = paged_attention_ref(q, k, v, tables, seq_of, q_pos, window, g)
        # key ranges whole, split into 3 or 8 runs (more runs than key tiles: some stay empty), or as
        # kv_splits chooses
        for (tiles, tile_rows), splits in zip(tilings, (1, 3, 8, None)):
            out = paged_attention(*inputs, window, on_kernel_device(g), block_n=16, tiles=on_kernel_device(tiles),
                                  tile_rows=tile_rows, splits=splits)
            assert out.dtype == dtype and out.shape == q.shape and out.device.type == KERNEL_DEVICE
            torch.testing.assert_close(out.float().cpu(), ref.float(), atol=tol, rtol=tol)
        cut, first = window_tables(tables, seq_of, q_pos, window, block_size)  # tables starting late
        out = paged_attention(*inputs[:3], on_kernel_device(cut), *inputs[4:], window,
                              on_kernel_device(g), block_n=16, first_block=on_kernel_device(first))
        torch.testing.assert_close(out.float().cpu(), ref.float(), atol=tol, rtol=tol)


def dense_attention(q, k, v, tables, seq_of, q_pos, window, gate=None) -> torch.Tensor:
    """Softmax attention of each query row over its sequence's visible keys laid out densely, in fp32."""
    out = torch.empty(q.shape)
    group = q.shape[1] // k.shape[2]
    for t, (s, pos) in enumerate(zip(seq_of.tolist(), q_pos.tolist())):
        keys, values = (torch.cat([c[b] for b in tables[s].tolist()[:pos // k.shape[1] + 1]])[:pos + 1].float()
                        for c in (k, v))
        lo = max(0, pos - window + 1) if window else 0
        kk, vv = keys[lo:].repeat_interleave(group, dim=1), values[lo:].repeat_interleave(group, dim=1)
        attn = (torch.einsum("hd,nhd->hn", q[t].float(), kk) / q.shape[-1] ** 0.5).softmax(-1)
        out[t] = torch.einsum("hn,nhd->hd", attn, vv)
        if gate is not None:
            out[t] *= torch.sigmoid(gate[t].float())[:, None]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    ([37, 5, 64], [4, 2, 4], 8, 2, 32, 16, 16),  # verify rows, window 16 crossing blocks
    ([17, 33], [1, 4], 4, 1, 64, 4, 7),  # MQA, tiny blocks, odd window
    ([70, 23], [50, 23], 4, 2, 32, 8, None),  # prefill chunks
])
def test_attention_twins_match_dense_attention(dtype, case):
    """The twins themselves (what the CPU engine runs), on every way the engine calls them: rows one
    by one or in tiles (some padded, some of graph padding's 0 rows), whole tables or cut to the
    window; the prefill twin a sequence's rows at once."""
    from stepflash.kernels.prefill_attention import prefill_attention_ref

    seq_lens, queries, heads, kv_heads, head_dim, block_size, window = case
    q, k, v, tables, seq_of, q_pos, gate = paged_batch(seq_lens, queries, heads, kv_heads, head_dim, block_size,
                                                       dtype, seed=1)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    cut, first = window_tables(tables, seq_of, q_pos, window, block_size)
    seqs = seq_of.tolist()
    for g in (None, gate):
        expected = dense_attention(q, k, v, tables, seq_of, q_pos, window, g)
        for tiles, tile_rows in [(None, 1), (prefill_tiles(seqs, 4), 4), (prefill_tiles(seqs, 2), 2),
                                 (torch.cat([prefill_tiles(seqs, 4), torch.zeros(3, 2, dtype=torch.int32)]), 4)]:
            out = paged_attention_ref(q, k, v, tables, seq_of, q_pos, window, g, tiles=tiles, tile_rows=tile_rows)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
        out = paged_attention_ref(q, k, v, cut, seq_of, q_pos, window, g, first_block=first)
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    expected = dense_attention(q, k, v, tables, seq_of, q_pos, window)
    for t, f in ((tables, None), (cut, first)):
        out = prefill_attention_ref(q, k, v, t, seq_of, q_pos, window, prefill_tiles(seqs, 16), first_block=f)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 64), (7, 96), (33, 256)])
def test_add_rmsnorm_matches_reference_and_the_model_norm(dtype, rows, hidden):
    from stepflash.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref
    from stepflash.model.norm import RMSNorm

    gen = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2))
    norm = RMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(0.1 * torch.randn(hidden, generator=gen))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for d in (delta, None):
        res, out = add_rmsnorm(*on_kernel_device(x, d, norm.weight.detach()), 1e-5)
        ref_res, ref_out = add_rmsnorm_ref(x, d, norm.weight.detach(), 1e-5)
        torch.testing.assert_close(res.cpu(), ref_res, atol=tol, rtol=tol)
        torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=tol, rtol=tol)
        r = ref_res.float()  # the twin is the formula, and the model's own norm
        expected = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + norm.weight.detach())
        torch.testing.assert_close(ref_out.float(), expected, atol=tol, rtol=tol)
        with torch.no_grad():
            assert torch.equal(norm(ref_res), ref_out)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens, hidden, inter, experts, top_k, limit", [
    (1, 64, 48, 8, 2, 0.0),  # decode at batch 1; I not a multiple of the tile
    (5, 96, 64, 16, 4, 7.0),  # several tokens sharing experts, with the SwiGLU clamp
    (3, 40, 24, 4, 4, 0.0),  # every expert, odd sizes
    (40, 64, 48, 8, 2, 7.0),  # a prefill chunk: experts with several blocks of pairs
])
def test_fused_moe_matches_the_model_moe(dtype, tokens, hidden, inter, experts, top_k, limit):
    from stepflash.kernels.moe import fused_moe, fused_moe_ref
    from stepflash.model.moe import MoE

    gen = torch.Generator().manual_seed(tokens * experts)
    moe = MoE(hidden, experts, inter, top_k, scaling=2.5, use_bias=True, renormalize=True, limit=limit)
    scale = 0.6 if limit else 0.2  # large enough for the clamp to bite
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    x = torch.randn(tokens, hidden, generator=gen)
    shared = torch.randn(tokens, hidden, generator=gen)  # a shared expert's output, added to the sum
    with torch.no_grad():
        ids, weights = moe.route(x)
        model_out, model_out_shared = moe(x), moe(x, shared)
    ws = [moe.gate_proj.weight, moe.up_proj.weight, moe.down_proj.weight]
    ws = [w.detach().contiguous().to(dtype) for w in ws]
    ref = fused_moe_ref(x.to(dtype), *ws, ids, weights, limit)
    ref_shared = fused_moe_ref(x.to(dtype), *ws, ids, weights, limit, add=shared.to(dtype))
    # fp16 / bf16: the grouped path rounds the SwiGLU output to x's dtype before the down projection, as
    # the model does
    scale = float(ref.float().abs().max())
    atol, rtol = {torch.float32: (1e-4, 1e-2), torch.float16: (1e-2 * scale, 1e-2),
                  torch.bfloat16: (2e-2 * scale, 2e-2)}[dtype]
    args = on_kernel_device(x.to(dtype), *ws, ids, weights)
    for grouped in (False, True):  # one pair per program; per-expert blocks of pairs through tl.dot
        out = fused_moe(*args, limit, block=16, grouped=grouped)
        torch.testing.assert_close(out.float().cpu(), ref.float(), atol=atol, rtol=rtol)
        if tokens < 16:  # the shared expert's output added (the prefill case would only take longer)
            out = fused_moe(*args, limit, block=16, grouped=grouped, add=on_kernel_device(shared.to(dtype)))
            torch.testing.assert_close(out.float().cpu(), ref_shared.float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:  # the twin is the model's own MoE, and a loop over tokens and experts
        assert torch.equal(ref, model_out) and torch.equal(ref_shared, model_out_shared)
        assert torch.equal(ref_shared, ref + shared)
        torch.testing.assert_close(ref, moe_loop(x, *ws, ids, weights, limit), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens, parts, hidden, with_add", [(1, 8, 64, True), (3, 2, 1100, False), (0, 4, 8, True)])
def test_sum_parts_kernel_matches_its_twin(dtype, tokens, parts, hidden, with_add):
    """Parts summed in fp32 plus the addend, rounded once: parts laid out [P, T, H] (split-K runs) and
    read through a transposed view, hidden past one program's 1024 columns; no tokens at all."""
    from stepflash.kernels.reduce import sum_parts, sum_parts_ref

    gen = torch.Generator().manual_seed(tokens * parts + hidden)
    buffer = torch.randn(parts, tokens, hidden, generator=gen)
    add = torch.randn(tokens, hidden, generator=gen).to(dtype) if with_add else None
    ref = sum_parts_ref(buffer.transpose(0, 1), add, dtype)
    exact = buffer.double().sum(0) + (add.double() if with_add else 0)
    torch.testing.assert_close(ref.double(), exact.to(dtype).double(), atol=1e-5, rtol=1e-5)
    out = sum_parts(on_kernel_device(buffer).transpose(0, 1), on_kernel_device(add), dtype)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # fp32 sums in another order
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=ulp)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens, inter, limit", [(1, 48, 0.0), (5, 1280, 7.0)])
def test_swiglu_kernel_matches_its_twin(dtype, tokens, inter, limit):
    """The dense MLP's SwiGLU, on the two halves of a packed gate/up projection (strided rows), with
    and without the clamp (values large enough for it to bite)."""
    from stepflash.kernels.moe import swiglu, swiglu_ref

    packed = (torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 6).to(dtype)
    gate, up = packed[:, :inter], packed[:, inter:]
    ref = swiglu_ref(gate.float(), up.float(), limit)
    if limit:
        assert not torch.equal(ref, swiglu_ref(gate.float(), up.float(), 0.0))
    kernel_packed = on_kernel_device(packed)
    out = swiglu(kernel_packed[:, :inter], kernel_packed[:, inter:], limit)
    assert out.dtype == dtype and out.shape == (tokens, inter)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.parametrize("tokens, experts, top_k, bias, renormalize", [
    (1, 288, 8, True, True),  # the release's router at batch 1
    (5, 288, 8, False, True),
    (3, 12, 3, True, False),  # experts not a power of two, k not either, weights not renormalised
])
def test_route_kernel_matches_its_twin(tokens, experts, top_k, bias, renormalize):
    """The routing kernel picks the twin's experts (in its order: by score + bias, highest first)
    and gives them the twin's weights; the bias steers the choice but not the weights."""
    from stepflash.kernels.router import route, route_ref

    gen = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    b = torch.randn(experts, generator=gen) if bias else None
    ref_ids, ref_w = route_ref(logits, b, top_k, 2.5, renormalize)
    ids, w = route(*on_kernel_device(logits, b), top_k, 2.5, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, atol=1e-5, rtol=1e-5)  # a GPU's exp may differ in the last bits
    if bias:  # the bias changed the choice here, so the test sees it used
        assert not torch.equal(ref_ids, route_ref(logits, None, top_k, 2.5, renormalize)[0])


def moe_loop(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
             weights: torch.Tensor, limit: float) -> torch.Tensor:
    """The routed experts written out, token by token and expert by expert, in fp32."""
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].float()):
            g, u = x[t].float() @ w_gate[e].float().T, x[t].float() @ w_up[e].float().T
            act = torch.nn.functional.silu(g)
            if limit > 0:
                act, u = act.clamp(max=limit), u.clamp(-limit, limit)
            out[t] += (act * u) @ w_down[e].float().T * w
    return out


@pytest.mark.parametrize("tokens", [1, 3, 12, 40])
@pytest.mark.parametrize("weights_as", ["dense", "column-major", "bf16", "int4", "fp8"])
def test_fused_moe_twin_matches_the_loop(tokens, weights_as):
    """The twin (the CPU engine's MoE) in each weight format against `moe_loop` on the weights it
    stands for: one pair, pairs sharing experts and experts left out, more pairs than experts (every
    token through every expert), many pairs per expert. bf16: the loader's CPU storage of a bf16
    checkpoint's experts under fp32 compute, upcast by the twin."""
    from stepflash.kernels.fp8_linear import dequantize_fp8
    from stepflash.kernels.moe import dequantize_int4, fused_moe_ref
    from stepflash.model.quant import quantize_int4
    from checkpoints import quantize_fp8

    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k, limit = 8, 64, 32, 2, 1.5
    dense = [torch.randn(experts, inter, hidden, generator=gen) / 8 for _ in range(2)]
    dense.append(torch.randn(experts, hidden, inter, generator=gen) / 6)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    kwargs = {}
    if weights_as == "column-major":  # the loader's CPU layout
        stored = [w.mT.contiguous().mT for w in dense]
    elif weights_as == "bf16":
        stored = [w.bfloat16().mT.contiguous().mT for w in dense]
        dense = [w.float() for w in stored]
    elif weights_as == "int4":
        stored, scales = zip(*(quantize_int4(w, 16) for w in dense))
        dense = [dequantize_int4(w, s, 16) for w, s in zip(stored, scales)]
        kwargs = {"int4_scales": scales, "group_size": 16}
    elif weights_as == "fp8":
        stored, scales = zip(*(quantize_fp8(w, (16, 32)) for w in dense))
        dense = [dequantize_fp8(w, s, (16, 32)) for w, s in zip(stored, scales)]
        kwargs = {"fp8_scales": scales, "fp8_block": (16, 32)}
    else:
        stored = dense
    out = fused_moe_ref(x, *stored, ids, weights, limit, **kwargs)
    torch.testing.assert_close(out, moe_loop(x, *dense, ids, weights, limit), atol=1e-5, rtol=1e-5)


def test_fused_moe_twin_gradients_match_the_loop():
    """Training runs the twin too: gradients for the input, every expert weight and the routing
    weights equal the loop's."""
    from stepflash.kernels.moe import fused_moe_ref

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens = 8, 64, 32, 12
    inputs = [torch.randn(tokens, hidden, generator=gen)]
    inputs += [torch.randn(experts, inter, hidden, generator=gen) / 8 for _ in range(2)]
    inputs.append(torch.randn(experts, hidden, inter, generator=gen) / 6)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(tokens)])
    inputs.append(torch.rand(tokens, 2, generator=gen))
    grad = torch.randn(tokens, hidden, generator=gen)
    grads = []
    for moe in (fused_moe_ref, moe_loop):
        leaves = [t.clone().requires_grad_() for t in inputs]
        moe(*leaves[:4], ids, leaves[4], 1.5).backward(grad)
        grads.append([t.grad for t in leaves])
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_engine_with_the_kernels_matches_the_torch_path(tmp_path):
    """Greedy tokens and logprobs through the engine are the same with attention (prefill and paged
    kernels) and routed experts in the Triton kernels (interpreted) as in PyTorch: prefill chunks,
    decodes, MTP verify rows, sliding windows, CPU weights in their column-major layout."""
    from stepflash.config import EngineConfig
    from stepflash.engine.engine import LLMEngine
    from stepflash.sampling import SamplingParams
    from checkpoints import write_checkpoint
    from stepflash.train.configs import tiny_config

    ckpt = write_checkpoint(tmp_path, tiny_config(), seed=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 300, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    outputs = {}
    for kernels in ("torch", "triton"):
        # fp32 on a GPU too (its default there is the checkpoint's bf16): the logprobs agree to 1e-4
        engine = LLMEngine(ckpt, EngineConfig(kernels=kernels, max_num_batched_tokens=16, dtype="float32"))
        assert engine.runner.kernels == (kernels == "triton")
        assert engine.model.model.layers[2].moe.use_kernel == (kernels == "triton")
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        outputs[kernels] = [done[str(i)] for i in range(len(prompts))]
    for a, b in zip(outputs["torch"], outputs["triton"]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t] - lb[t]) < 1e-4


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("with_norms", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim, rotary_dim", [(4, 2, 64, 32), (6, 2, 64, 64), (8, 8, 24, 12)])
def test_rope_kv_write_matches_reference(dtype, heads, kv_heads, head_dim, rotary_dim, with_norms):
    """Rotary + cache write, with the per-head q/k norms first or not; q, k and v are strided views of
    one packed projection, as the model hands them over."""
    from stepflash.kernels.rope_kv import QKNorms, rope_kv_write, rope_kv_write_ref
    from stepflash.model.norm import RMSNorm
    from stepflash.model.rope import rotary_cos_sin

    gen = torch.Generator().manual_seed(heads + rotary_dim)
    tokens, blocks, block_size = 7, 6, 4
    packed = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3).to(dtype)
    q, k, v = (x.view(tokens, -1, head_dim) for x in packed.split([heads * head_dim, *[kv_heads * head_dim] * 2], 1))
    norms = QKNorms(torch.randn(head_dim, generator=gen) * 0.5, torch.randn(head_dim, generator=gen) * 0.5, 1e-5)
    positions = torch.tensor([0, 5, 6, 7, 100, 101, 4095])
    cos, sin = rotary_cos_sin(positions, 1e4, rotary_dim, None)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    caches = [torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(6)]
    kernel_caches = on_kernel_device(caches[0], caches[1])  # written in place by the kernel
    kernel_packed = on_kernel_device(packed)
    kq, kk, kv = (x.view(tokens, -1, head_dim) for x in kernel_packed.split([heads * head_dim,
                                                                             *[kv_heads * head_dim] * 2], 1))
    kernel_norms = QKNorms(*on_kernel_device(norms.q_weight, norms.k_weight), norms.eps) if with_norms else None
    out = rope_kv_write(kq, kk, kv, *on_kernel_device(cos, sin), *kernel_caches, on_kernel_device(slots), kernel_norms)
    ref = rope_kv_write_ref(q, k, v, cos, sin, caches[2], caches[3], slots, norms if with_norms else None)
    if with_norms:  # the twin is the model's RMSNorm modules, then the rotation
        q_norm, k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        with torch.no_grad():
            q_norm.weight.copy_(norms.q_weight), k_norm.weight.copy_(norms.k_weight)
            assert torch.equal(ref, rope_kv_write_ref(q_norm(q), k_norm(k), v, cos, sin, caches[4], caches[5], slots))
        assert torch.equal(caches[2], caches[4])
        assert not torch.allclose(ref.float(), rope_kv_write_ref(q, k, v, cos, sin, caches[4], caches[5],
                                                                 slots).float(), atol=0.1)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(kernel_caches[0].cpu(), caches[2], atol=tol, rtol=tol)
    torch.testing.assert_close(kernel_caches[1].cpu(), caches[3], atol=0, rtol=0)
    assert kernel_caches[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [
    # seq lens, query rows per seq (the last ones), heads, kv heads, head dim, block size, window
    ([40], [40], 4, 2, 32, 16, None),  # a whole prompt
    ([70, 23], [50, 23], 4, 2, 32, 8, 16),  # chunked prefill (50 of 70) with a window, plus a short prompt
    ([100], [37], 6, 3, 24, 16, 20),  # head dim padded to 32, window across block boundaries
])
def test_prefill_attention_matches_reference(dtype, case):
    from stepflash.kernels.prefill_attention import prefill_attention, prefill_attention_ref

    seq_lens, queries, heads, kv_heads, head_dim, block_size, window = case
    q, k, v, tables, seq_of, q_pos, _ = paged_batch(seq_lens, queries, heads, kv_heads, head_dim, block_size,
                                                    dtype, seed=head_dim + len(seq_lens))
    ref = prefill_attention_ref(q, k, v, tables, seq_of, q_pos, window)
    out = prefill_attention(*on_kernel_device(q, k, v, tables, seq_of, q_pos), window)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.device.type == KERNEL_DEVICE
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=tol, rtol=tol)
    cut, first = window_tables(tables, seq_of, q_pos, window, block_size)  # tables starting late
    out = prefill_attention(*on_kernel_device(q, k, v, cut, seq_of, q_pos), window,
                            first_block=on_kernel_device(first))
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=tol, rtol=tol)


def test_attention_kernels_reach_blocks_past_2_31_cache_elements():
    """A sequence whose blocks lie at the end of a cache of more than 2^31 elements (4 GiB in fp16: a
    real engine's caches are tens of GB) is read where it lies: int32 offsets wrapped there (an
    illegal address on the GPU). Keys and values share the one big tensor; the twins read a small
    cache holding the same blocks."""
    from stepflash.kernels.prefill_attention import prefill_attention, prefill_attention_ref

    block_size, head_dim, rows = 16, 64, 40
    q, k, _, tables, seq_of, q_pos, gate = paged_batch([rows], [rows], 2, 1, head_dim, block_size, torch.float16,
                                                       seed=5)
    far = (1 << 31) // (block_size * head_dim) + 1  # block `far` starts past element 2^31
    cache = torch.empty(far + k.shape[0], block_size, 1, head_dim, dtype=torch.float16, device=KERNEL_DEVICE)
    cache[far:] = on_kernel_device(k)
    decode_rows = slice(rows - 4, rows)  # a verify step's rows: one tile
    ref = paged_attention_ref(q[decode_rows], k, k, tables, seq_of[decode_rows], q_pos[decode_rows], None,
                              gate[decode_rows])
    out = paged_attention(on_kernel_device(q[decode_rows]), cache, cache, on_kernel_device(tables + far),
                          *on_kernel_device(seq_of[decode_rows], q_pos[decode_rows]), None,
                          on_kernel_device(gate[decode_rows]))
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=2e-3, rtol=2e-3)
    ref = prefill_attention_ref(q, k, k, tables, seq_of, q_pos, 16)
    out = prefill_attention(on_kernel_device(q), cache, cache, *on_kernel_device(tables + far, seq_of, q_pos), 16)
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("tokens, group", [(1, 16), (4, 32)])
def test_fused_moe_reads_int4_experts_packed(tokens, group):
    """INT4 experts used packed inside the kernel equal the twin on the dequantized weights."""
    from stepflash.kernels.moe import dequantize_int4, fused_moe, fused_moe_ref
    from stepflash.model.quant import quantize_int4

    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k = 8, 64, 32, 2
    dense = [torch.randn(experts, inter, hidden, generator=gen), torch.randn(experts, inter, hidden, generator=gen),
             torch.randn(experts, hidden, inter, generator=gen)]
    packed, scales = zip(*(quantize_int4(w, group) for w in dense))
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    ref = fused_moe_ref(x, *(dequantize_int4(p, s, group) for p, s in zip(packed, scales)), ids, weights, 0.0)
    assert torch.equal(fused_moe_ref(x, *packed, ids, weights, 0.0, int4_scales=scales, group_size=group), ref)
    args, kernel_scales = on_kernel_device(x, *packed, ids, weights), on_kernel_device(*scales)
    # tiles of 16, 32 or 64 columns: inside one group (one pass: scaled per row and tile, each byte read
    # once), over 2 or 4 whole groups (one pass: scaled per row and group) or, grouped through tl.dot,
    # across groups (scaled per value); the grouped path's tl.dot takes half a tile of 32 per nibble
    for block, grouped in itertools.product((16, 32, 64), (False, True)):
        out = fused_moe(*args, 0.0, block=block, int4_scales=kernel_scales, group_size=group, grouped=grouped)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(ref, fused_moe_ref(x, *dense, ids, weights, 0.0), atol=1e-3)  # it is lossy


@pytest.mark.parametrize("tokens, top_k, experts, block_m", [(1, 2, 8, 16), (9, 3, 4, 4), (40, 8, 16, 16)])
def test_expert_blocks_cover_every_pair_once(tokens, top_k, experts, block_m):
    """Blocks hold only pairs of their expert, at most block_m each, every pair exactly once; the
    spare blocks of the static grid are empty."""
    from stepflash.kernels.moe import expert_blocks

    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    order, expert, start, rows = (t.cpu() for t in expert_blocks(on_kernel_device(ids), experts, block_m))
    flat = ids.flatten()
    seen = []
    for e, s, r in zip(expert.tolist(), start.tolist(), rows.tolist()):
        assert 0 <= r <= block_m
        pairs = order[s:s + r].tolist()
        assert all(flat[p] == e for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(flat.numel()))
    counts = torch.bincount(flat, minlength=experts)
    assert int((rows > 0).sum()) == int(((counts + block_m - 1) // block_m).sum())


def test_engine_serves_int4_experts_packed_through_the_kernel(tmp_path):
    """An INT4 checkpoint: kept packed and run by the fused-MoE kernel, the engine gives the greedy
    tokens it gives with the experts dequantized on load."""
    from stepflash.cli import main
    from stepflash.config import EngineConfig
    from stepflash.engine.engine import LLMEngine
    from stepflash.sampling import SamplingParams
    from checkpoints import write_checkpoint
    from stepflash.train.configs import tiny_config

    src = write_checkpoint(tmp_path / "src", tiny_config(), seed=6)
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--group-size", "16"]) == 0
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0, ignore_eos=True)
    outs = {}
    for kernels in ("torch", "triton"):
        engine = LLMEngine(tmp_path / "q", EngineConfig(kernels=kernels, mtp=0, dtype="float32"))
        assert (engine.model.model.layers[2].moe.gate_proj.weight.dtype == torch.uint8) == (kernels == "triton")
        engine.add_request("a", list(range(20, 32)), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[kernels] = out.outputs[0]
    assert outs["torch"].token_ids == outs["triton"].token_ids
    for la, lb, t in zip(outs["torch"].logprobs, outs["triton"].logprobs, outs["torch"].token_ids):
        assert abs(la[t] - lb[t]) < 1e-3
