"""INT4 expert quantization: the packing, the error bound, and a quantized checkpoint that loads and
stays close to the original."""

import json

import torch
from safetensors import safe_open

from stepflash.cli import main
from stepflash.model.loader import load_model
from stepflash.kernels.moe import dequantize_int4
from stepflash.model.quant import INT4_SCALE_SUFFIX, quantize_int4
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config


def test_packing_by_hand():
    packed, scales = quantize_int4(torch.tensor([[7.0, -7.0, 0.0, 3.6]]), group_size=4)
    # scale 1: q = 7, -7, 0, 4 -> nibbles 15, 1, 8, 12; low nibble holds the even column
    assert scales.tolist() == [[1.0]]
    assert packed.tolist() == [[15 | 1 << 4, 8 | 12 << 4]]
    assert dequantize_int4(packed, scales, 4).tolist() == [[7.0, -7.0, 0.0, 4.0]]


def test_round_trip_error_is_half_a_step():
    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    packed, scales = quantize_int4(w, group_size=32)
    assert packed.shape == (3, 16, 32) and packed.dtype == torch.uint8 and scales.shape == (3, 16, 2)
    err = (dequantize_int4(packed, scales, 32) - w).abs()
    assert (err <= scales.repeat_interleave(32, -1) / 2 + 1e-6).all()
    assert err.max() > 0  # it is lossy


@torch.no_grad()
def test_quantized_checkpoint_loads_and_stays_close(tmp_path):
    src = write_checkpoint(tmp_path / "src", tiny_config(), seed=3)
    dst = tmp_path / "int4"
    assert main(["quantize", "--model", str(src), "--out", str(dst), "--group-size", "16"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "stepflash-int4"
    with safe_open(dst / "model.safetensors", "pt") as f, safe_open(src / "model.safetensors", "pt") as g:
        names = set(f.keys())
        experts = [n for n in names if n.endswith(".moe.gate_proj.weight")]
        assert experts and all(f.get_tensor(n).dtype == torch.uint8 for n in experts)
        assert all(n + INT4_SCALE_SUFFIX in names for n in experts)
        for n in g.keys():  # everything else unchanged
            if ".moe." not in n or n.endswith(("gate.weight", "router_bias")):
                assert torch.equal(f.get_tensor(n), g.get_tensor(n))
    a, b = load_model(src), load_model(dst)
    ids = torch.randint(10, 300, (40,), generator=torch.Generator().manual_seed(1))
    pa = a.compute_logits(a(ids, torch.arange(40))).log_softmax(-1)
    pb = b.compute_logits(b(ids, torch.arange(40))).log_softmax(-1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean()
    assert 0 < kl < 0.05
    assert (tmp_path / "int4" / "tokenizer.json").is_file()


@torch.no_grad()
def test_int4_kept_packed_gives_the_same_logits(tmp_path):
    src = write_checkpoint(tmp_path / "src", tiny_config(), seed=4)
    main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--group-size", "16"])
    packed, dense = load_model(tmp_path / "q", keep_int4=True), load_model(tmp_path / "q")
    moe = packed.model.layers[2].moe
    assert moe.gate_proj.weight.dtype == torch.uint8 and moe.gate_proj.int4_scale is not None
    assert dense.model.layers[2].moe.gate_proj.weight.dtype == torch.float32
    ids = torch.randint(10, 300, (30,), generator=torch.Generator().manual_seed(2))
    a = packed.compute_logits(packed(ids, torch.arange(30)))
    b = dense.compute_logits(dense(ids, torch.arange(30)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
