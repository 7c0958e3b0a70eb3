"""FP8 block-scaled weights used as they are: the byte decode, the FP8 GEMM and fused-MoE kernels
against their twins (TRITON_INTERPRET=1 on CPU, fp32 / fp16; on a GPU when there is one, bf16 too:
tests/kernel_env.py), and a checkpoint loaded with `keep_fp8` that holds the checkpoint's bytes and
computes what the dequantized model computes."""

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernel_env import KERNEL_DEVICE, KERNEL_DTYPES, on_kernel_device
from stepflash.kernels.fp8_linear import fp8_linear_ref
from stepflash.model.linear import Fp8Linear
from stepflash.model.loader import CheckpointError, hub_state_dict, load_model
from stepflash.model.moe import MoE
from checkpoints import write_checkpoint
from checkpoints import quantize_fp8

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
BLOCK = (24, 40)  # divides none of the tiny model's 64, 96 and 32: every matrix has partial blocks
K_PROJ = "model.layers.1.self_attn.k_proj.weight"
EXPERTS = "model.layers.3.moe.up_proj.weight"


def finite_fp8_bytes() -> torch.Tensor:
    """All 254 float8_e4m3fn bit patterns that are not NaN (0x7F, 0xFF), as uint8."""
    b = torch.arange(256, dtype=torch.int32)
    return b[(b & 0x7F) != 0x7F].to(torch.uint8)


def expand(scale_inv: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Per-element scales, built independently of the code under test (Kronecker product)."""
    return torch.kron(scale_inv, torch.ones(block))[:rows, :cols]


# ---------------------------------------------------------------- the decode and the GEMM

def test_decode_claim_holds_for_every_finite_byte():
    """(b & 0x7F) << 7 read as fp16 is |value| / 256 (normals and subnormals), bit 7 the sign."""
    b = finite_fp8_bytes()
    magnitude = ((b & 0x7F).to(torch.int16) << 7).view(torch.float16).float() * 256.0
    decoded = torch.where((b & 0x80) != 0, -magnitude, magnitude)
    expected = b.view(torch.float8_e4m3fn).float()
    assert torch.equal(decoded, expected)
    assert expected.abs().max() == 448 and (expected.abs() == 2.0 ** -9).sum() == 2  # the extremes are in
    assert torch.equal(expected[(b & 0x7F) == 0], torch.tensor([0.0, -0.0]))


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_decodes_every_finite_byte(dtype):
    """y = 1 * W^T with W = each byte in a row of its own: the kernel's decode, exactly."""
    from stepflash.kernels.fp8_linear import fp8_linear

    w = finite_fp8_bytes().view(torch.float8_e4m3fn)[:, None]  # [254, 1]
    scale_inv = torch.full((math.ceil(254 / 16), 1), 0.5)
    y = fp8_linear(*on_kernel_device(torch.ones(1, 1, dtype=dtype), w, scale_inv), (16, 16))
    assert y.dtype == dtype and y.device.type == KERNEL_DEVICE
    assert torch.equal(y[0].float().cpu(), w[:, 0].float() * 0.5)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m, n, k, block", [
    (1, 50, 70, (16, 32)),  # decode row; N, K ragged against blocks and tiles
    (3, 33, 96, (16, 32)),
    (17, 64, 47, (16, 32)),  # M over one 16-row tile
    (3, 130, 200, (128, 128)),  # the release's blocks, partial at both edges
])
def test_fp8_linear_matches_twin(dtype, m, n, k, block):
    from stepflash.kernels.fp8_linear import fp8_linear

    gen = torch.Generator().manual_seed(m * n + k)
    w, scale_inv = quantize_fp8(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4, block)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = fp8_linear_ref(x, w, scale_inv, block)
    assert ref.dtype == dtype and ref.float().abs().max() > 1
    dense = w.float() * expand(scale_inv, block, n, k)  # the twin: dequantize, then F.linear
    torch.testing.assert_close(ref.float(), F.linear(x.float(), dense).to(dtype).float(), atol=1e-5, rtol=1e-5)
    # errors scale with the output's size: fp32 sums in another order (split-K, tiles), bf16 rounds the
    # weight tile to bf16 before tl.dot and the output to bf16
    scale = float(ref.float().abs().max())
    atol, rtol = {torch.float32: (1e-5 * scale, 1e-5), torch.float16: (1e-2, 1e-2),
                  torch.bfloat16: (2e-2 * scale, 2e-2)}[dtype]
    x, w, scale_inv = on_kernel_device(x, w, scale_inv)
    out = fp8_linear(x, w, scale_inv, block, block_n=32, block_k=32, split_k=3)  # K in 3 runs, some empty
    assert out.dtype == dtype and out.shape == (m, n) and out.device.type == KERNEL_DEVICE
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=atol, rtol=rtol)
    column_major = w.T.contiguous().T  # any weight layout is read through its strides
    torch.testing.assert_close(fp8_linear(x, column_major, scale_inv, block).float().cpu(), ref.float(), atol=atol,
                               rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tokens, block", [(1, (16, 32)), (4, (128, 128)), (3, (16, 24)), (2, (16, 8))])
def test_fused_moe_reads_fp8_experts(dtype, tokens, block):
    """FP8 experts read byte-wise by the kernel equal the twin on the dequantized weights; kernel tiles
    of 16 or 32 columns lie inside one scale block (scaled once per row and tile), cover several
    whole blocks of 8 columns (scaled once per row and block; the last tile of the 40 intermediate
    columns past the last block) or cut blocks of 24 columns (scaled per value)."""
    from stepflash.kernels.moe import fused_moe, fused_moe_ref

    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k = 8, 64, 40, 2  # inter ragged against the blocks and the tile
    dense = [torch.randn(experts, inter, hidden, generator=gen), torch.randn(experts, inter, hidden, generator=gen),
             torch.randn(experts, hidden, inter, generator=gen) * 0.3]
    fp8, scales = zip(*(quantize_fp8(w, block) for w in dense))
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    dequantized = [w.float() * torch.stack([expand(s_e, block, *w.shape[1:]) for s_e in s])
                   for w, s in zip(fp8, scales)]
    ref = fused_moe_ref(x, *dequantized, ids, weights, 0.0)
    # fp16 / bf16: the grouped path rounds the SwiGLU output to x's dtype before the down projection, as
    # the model does
    scale = float(ref.float().abs().max())
    atol, rtol = {torch.float32: (1e-4, 1e-2), torch.float16: (1e-2 * scale, 1e-2),
                  torch.bfloat16: (2e-2 * scale, 2e-2)}[dtype]
    args, kernel_scales = on_kernel_device(x, *fp8, ids, weights), on_kernel_device(*scales)
    for edge, grouped in ((16, False), (16, True), (32, False)):  # wider tiles: the one-pair kernels
        out = fused_moe(*args, 0.0, block=edge, fp8_scales=kernel_scales, fp8_block=block, grouped=grouped)
        assert out.dtype == dtype and out.device.type == KERNEL_DEVICE
        torch.testing.assert_close(out.float().cpu(), ref.float(), atol=atol, rtol=rtol)
    assert not torch.allclose(ref.float(), fused_moe_ref(x, *dense, ids, weights, 0.0).float(), atol=1e-3)


# ---------------------------------------------------------------- a checkpoint kept in FP8

@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fp8"), fp8_block=BLOCK, seed=5)


def logits(model: torch.nn.Module, tokens: int = 20) -> torch.Tensor:
    """Logits (on the CPU) of a seeded prompt, run on the model's device."""
    device = model.lm_head.weight.device
    ids = torch.randint(10, 300, (tokens,), generator=torch.Generator().manual_seed(tokens)).to(device)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(tokens, device=device))).cpu()


def test_kept_model_holds_the_checkpoint_bytes(fp8_ckpt: Path) -> None:
    """Every FP8 tensor of a linear map stays FP8 (its exact bytes, scales beside it); nothing else
    is stored, so parameter + buffer bytes are what the checkpoint's layout implies."""
    stored = load_file(fp8_ckpt / "model.safetensors")
    kept = load_model(fp8_ckpt, keep_fp8=True)
    state = hub_state_dict(kept)
    fp8_names = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert K_PROJ in fp8_names and EXPERTS in fp8_names and "model.layers.5.eh_proj.weight" in fp8_names
    for name in fp8_names:
        assert state[name].dtype == torch.float8_e4m3fn, name
        assert torch.equal(state[name].view(torch.uint8), stored[name].view(torch.uint8)), name
        assert torch.equal(state[name + "_scale_inv"], stored[name + "_scale_inv"]), name
    # q/k/v pack where a part fills whole 24-row blocks (q of sliding layers: 96 rows; not the 64 of
    # full layers nor k and v's 32); g_proj stays dense in this checkpoint (testing.FP8_KEEP)
    assert runs(kept.model.layers[0].self_attn.qkvg_proj) == [("fp8", 64), ("fp8", 32), ("fp8", 32), ("dense", 4)]
    assert runs(kept.model.layers[1].self_attn.qkvg_proj) == [("fp8", 96 + 32), ("fp8", 32), ("dense", 6)]
    assert runs(kept.model.layers[0].mlp.gate_up_proj) == [("fp8", 2 * 96)]
    assert isinstance(kept.mtp[0].eh_proj, Fp8Linear)
    assert not isinstance(kept.lm_head, Fp8Linear) and kept.lm_head.weight.dtype == torch.float32
    assert kept.model.layers[3].moe.gate.weight.dtype == torch.float32  # the router stays fp32

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    weights = {k: t for k, t in stored.items() if not k.endswith("_scale_inv")}
    expected = sum(t.numel() * (1 if t.dtype == torch.float8_e4m3fn else 4) for t in weights.values())
    assert nbytes(kept.parameters()) == expected
    assert nbytes(kept.buffers()) == nbytes(t for k, t in stored.items() if k.endswith("_scale_inv"))
    dequantized = load_model(fp8_ckpt)
    assert nbytes(dequantized.parameters()) == 4 * sum(t.numel() for t in weights.values())
    assert nbytes(kept.parameters()) < 0.5 * nbytes(dequantized.parameters())


def runs(packed: torch.nn.Module) -> list[tuple[str, int]]:
    """A PackedLinear's weights: (format, rows) of each run."""
    return [("fp8" if isinstance(r, Fp8Linear) else "dense", r.weight.shape[0]) for r in packed.runs]


def test_kept_fp8_packs_q_k_v_g_when_their_blocks_stack(tmp_path: Path) -> None:
    """With 16-row blocks every part of q/k/v fills whole blocks, and g_proj (stored in FP8 here too)
    comes last, so its partial block ends the weight: one FP8 GEMM for all four, holding the
    checkpoint's bytes and computing what the dequantized model computes."""
    ckpt = write_checkpoint(tmp_path / "src", fp8_block=(16, 32), seed=7)
    tensors = load_file(ckpt / "model.safetensors")
    for name in [k for k in tensors if k.endswith("g_proj.weight")]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name], (16, 32))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    kept = load_model(ckpt, keep_fp8=True)
    assert runs(kept.model.layers[0].self_attn.qkvg_proj) == [("fp8", 64 + 32 + 32 + 4)]
    assert runs(kept.model.layers[1].self_attn.qkvg_proj) == [("fp8", 96 + 32 + 32 + 6)]
    state = hub_state_dict(kept)
    for name in [k for k in tensors if ".self_attn." in k]:
        assert torch.equal(state[name].view(torch.uint8), tensors[name].view(torch.uint8)), name
    torch.testing.assert_close(logits(kept), logits(load_model(ckpt)), atol=1e-5, rtol=1e-5)


def test_kept_model_computes_what_the_dequantized_model_computes(fp8_ckpt: Path) -> None:
    kept, dequantized = load_model(fp8_ckpt, keep_fp8=True), load_model(fp8_ckpt)
    a, b = logits(kept), logits(dequantized)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(20) + 30
    with torch.no_grad():  # an MTP module (its eh_proj is an Fp8Linear)
        kept_mtp = kept.mtp_forward(0, ids, hidden, torch.arange(20))
        dequantized_mtp = dequantized.mtp_forward(0, ids, hidden, torch.arange(20))
    torch.testing.assert_close(kept_mtp, dequantized_mtp, atol=1e-5, rtol=1e-5)


def test_kept_model_in_bf16(fp8_ckpt: Path) -> None:
    """The PyTorch path returns the activations' dtype (bf16 here) from the FP8 weights."""
    kept, dequantized = load_model(fp8_ckpt, dtype=torch.bfloat16, keep_fp8=True), load_model(fp8_ckpt)
    assert kept.lm_head.weight.dtype == torch.bfloat16
    a, b = logits(kept, 8), logits(dequantized, 8)
    assert (a.log_softmax(-1) - b.log_softmax(-1)).abs().max() < 0.15


@needs_triton
def test_kept_model_through_the_kernels(fp8_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With use_kernel on, every Fp8Linear and MoE runs its Triton kernel on the FP8 bytes and the
    logits equal the dequantized model's (PyTorch path)."""
    import stepflash.model.linear as fp8_kernels  # where the model looks the kernels up
    import stepflash.model.moe as moe_kernels

    calls = {"fp8_linear": 0, "fused_moe": 0}

    def counted(module, name: str):
        original = getattr(module, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, run)

    counted(fp8_kernels, "fp8_linear")
    counted(moe_kernels, "fused_moe")
    # the kernels on their device (fp32 there too: a GPU's default is the checkpoint's bf16); the twin on the CPU
    kept = load_model(fp8_ckpt, device=KERNEL_DEVICE, dtype="float32", keep_fp8=True)
    dequantized = load_model(fp8_ckpt)
    for module in kept.modules():
        if isinstance(module, (Fp8Linear, MoE)):
            module.use_kernel = True
    a = logits(kept, 12)
    # one call per FP8 run of the 5 layers: q/k/v in 3 or 2 runs (test above) and o; gate/up in 1 run
    # (dense MLPs of layers 0-1, 96 rows) or 2 (shared experts of layers 2-4, 32 rows) and down
    assert calls["fp8_linear"] == (3 + 1) * 2 + (2 + 1) * 3 + 2 * (1 + 1) + 3 * (2 + 1)
    assert calls["fp8_linear"] == sum(isinstance(m, Fp8Linear) for m in kept.model.modules())
    assert calls["fused_moe"] == 3  # MoE layers 2-4
    torch.testing.assert_close(a, logits(dequantized, 12), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- errors name the tensor

def edited_copy(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if edit is None:
        del tensors[name]
    else:
        tensors[name] = edit(tensors[name])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("weight", [K_PROJ, EXPERTS])
def test_kept_fp8_scale_missing_or_mis_shaped(fp8_ckpt: Path, tmp_path: Path, weight: str) -> None:
    scale = weight + "_scale_inv"
    missing = edited_copy(fp8_ckpt, tmp_path / "missing", scale, None)
    with pytest.raises(CheckpointError, match=f"{weight} is float8 but {scale} is missing"):
        load_model(missing, keep_fp8=True)
    cut = edited_copy(fp8_ckpt, tmp_path / "cut", scale, lambda t: t[..., :1].contiguous())
    with pytest.raises(CheckpointError, match=f"{scale}: shape"):
        load_model(cut, keep_fp8=True)


def test_kept_fp8_weight_of_wrong_shape(fp8_ckpt: Path, tmp_path: Path) -> None:
    ckpt = edited_copy(fp8_ckpt, tmp_path / "c", K_PROJ, lambda t: t[:-1].contiguous())
    with pytest.raises(CheckpointError, match=rf"{K_PROJ}: checkpoint shape \(31, 64\), model expects \(32, 64\)"):
        load_model(ckpt, keep_fp8=True)


def test_engine_serves_fp8_kept_through_kernels_and_graphs(fp8_ckpt: Path) -> None:
    """The engine with kernels keeps the FP8 weights and, with graphed steps and MTP drafts, gives the
    greedy tokens of the PyTorch path on the dequantized weights."""
    from stepflash.config import EngineConfig
    from stepflash.engine.engine import LLMEngine
    from stepflash.model.linear import Fp8Linear
    from stepflash.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    outs = {}
    # fp32 on a GPU too (its default there is the checkpoint's bf16): the logprobs agree to 1e-4
    for path, cfg in (("torch", EngineConfig(mtp=1, dtype="float32")),
                      ("kernels", EngineConfig(mtp=1, kernels="triton", cuda_graphs="on", dtype="float32"))):
        engine = LLMEngine(fp8_ckpt, cfg)
        kept = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
        assert bool(kept) == (path == "kernels") and all(m.use_kernel for m in kept)
        engine.add_request("a", list(range(30, 41)), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[path] = out.outputs[0]
    assert outs["torch"].token_ids == outs["kernels"].token_ids
    for la, lb, t in zip(outs["torch"].logprobs, outs["kernels"].logprobs, outs["torch"].token_ids):
        assert abs(la[t] - lb[t]) < 1e-4
