"""load_model: safetensors (single / sharded), dtypes, FP8 dequantization, MTP modules, clear errors."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepflash.model.loader import CheckpointError, hub_state_dict, load_model
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config

N = 5  # decoder layers of tiny_config
ROUTER = "model.layers.2.moe.gate.weight"
ROUTER_BIAS = "model.layers.2.moe.router_bias"
K_PROJ = "model.layers.1.self_attn.k_proj.weight"
EXPERTS = "model.layers.3.moe.gate_proj.weight"
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fp32"), seed=1)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fp8"), fp8_block=(16, 16), seed=2)


def params(model: torch.nn.Module) -> Tensors:
    """The model's tensors by hub name (packed q/k/v/g and gate/up cut into their parts)."""
    return hub_state_dict(model)


def edited_copy(src: Path, dst: Path, edit: Callable[[Tensors], None]) -> Path:
    """Copy a single-file checkpoint and rewrite its safetensors after `edit` changed the tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load_error(model_dir: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(model_dir, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- layouts and dtypes

def test_single_file_and_sharded_load_identically(fp32_ckpt: Path, tmp_path: Path) -> None:
    sharded = write_checkpoint(tmp_path / "sharded", num_shards=3, seed=1)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) == 3
    single, split = params(load_model(fp32_ckpt)), params(load_model(sharded))
    assert single.keys() == split.keys()
    assert all(torch.equal(single[k], split[k]) for k in single)
    stored = load_file(fp32_ckpt / "model.safetensors")
    assert len(stored) == len(single)
    for name, tensor in stored.items():
        assert torch.equal(single[name], tensor), name


def test_bf16_storage(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path, dtype=torch.bfloat16, seed=4)
    stored = load_file(ckpt / "model.safetensors")
    assert stored[K_PROJ].dtype == torch.bfloat16
    bf16 = params(load_model(ckpt, dtype=torch.bfloat16))
    assert bf16[K_PROJ].dtype == torch.bfloat16 and torch.equal(bf16[K_PROJ], stored[K_PROJ])
    assert bf16["model.layers.5.eh_proj.weight"].dtype == torch.bfloat16
    assert bf16[ROUTER].dtype == bf16[ROUTER_BIAS].dtype == torch.float32
    auto = params(load_model(ckpt, dtype="auto"))  # 'auto' on CPU computes in fp32
    assert auto[K_PROJ].dtype == torch.float32 and torch.equal(auto[K_PROJ], stored[K_PROJ].float())
    # routed experts stay in bf16 (the MoE twin upcasts the ones it gathers), with their values
    assert auto[EXPERTS].dtype == torch.bfloat16 and torch.equal(auto[EXPERTS], stored[EXPERTS])


def test_router_stays_fp32_under_bf16(fp32_ckpt: Path) -> None:
    stored = load_file(fp32_ckpt / "model.safetensors")
    loaded = params(load_model(fp32_ckpt, dtype=torch.bfloat16))
    for name in (ROUTER, ROUTER_BIAS):  # exact fp32 values, not rounded through bf16
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], stored[name])
    assert not torch.equal(stored[ROUTER].bfloat16().float(), stored[ROUTER])
    assert loaded[EXPERTS].dtype == torch.bfloat16


def test_params_frozen_on_requested_device(fp32_ckpt: Path) -> None:
    model = load_model(fp32_ckpt, device="cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device == torch.device("cpu") for t in tensors)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


# ---------------------------------------------------------------- FP8

def blockwise_dequant(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = fp8.shape[-2:]
    out = torch.empty(fp8.shape, dtype=torch.float32)
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[..., r, c] = fp8[..., r, c].float() * scale_inv[..., i, j, None, None]
    return out


@pytest.mark.parametrize("block", [(16, 16), (24, 40)])  # (24, 40) divides none of 64, 96, 32
def test_fp8_dequantized_blockwise(block: tuple[int, int], fp8_ckpt: Path, tmp_path: Path) -> None:
    ckpt = fp8_ckpt if block == (16, 16) else write_checkpoint(tmp_path, fp8_block=block, seed=2)
    stored = load_file(ckpt / "model.safetensors")
    loaded = params(load_model(ckpt, dtype=torch.float32))
    quantized = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert EXPERTS in quantized and K_PROJ in quantized and "mtp.0.eh_proj.weight" not in quantized
    for name in quantized:
        scale = stored[name + "_scale_inv"]
        assert scale.shape[-2:] == tuple(math.ceil(s / b) for s, b in zip(stored[name].shape[-2:], block))
        expected = blockwise_dequant(stored[name], scale, block)
        assert torch.equal(loaded[name], expected), name
    assert torch.equal(loaded["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])


# ---------------------------------------------------------------- MTP modules

def test_mtp_modules_loaded_when_present(fp32_ckpt: Path) -> None:
    model = load_model(fp32_ckpt)
    assert len(model.mtp) == 3
    stored = load_file(fp32_ckpt / "model.safetensors")
    assert torch.equal(model.mtp[2].eh_proj.weight, stored["model.layers.7.eh_proj.weight"])
    assert torch.equal(model.mtp[1].shared_head.output.weight,
                       stored["model.layers.6.transformer.shared_head.output.weight"])


def test_mtp_modules_absent(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path, with_mtp=False)
    assert len(load_model(ckpt).mtp) == 0
    assert "1 MTP modules requested" in load_error(ckpt, num_mtp=1)


def test_num_mtp_limits_modules(fp32_ckpt: Path) -> None:
    model = load_model(fp32_ckpt, num_mtp=1)
    assert len(model.mtp) == 1
    assert not any(name.startswith("model.layers.6.") for name in params(model))
    assert len(load_model(fp32_ckpt, num_mtp=0).mtp) == 0


def test_more_mtp_than_present(fp32_ckpt: Path) -> None:
    assert "holds 3" in load_error(fp32_ckpt, num_mtp=4)


# ---------------------------------------------------------------- errors name the tensor

def test_missing_tensor(fp32_ckpt: Path, tmp_path: Path) -> None:
    ckpt = edited_copy(fp32_ckpt, tmp_path / "c", lambda t: t.pop(K_PROJ))
    assert K_PROJ in load_error(ckpt)


def test_missing_mtp_tensor_uses_checkpoint_name(fp32_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.6.transformer.shared_head.norm.weight"
    ckpt = edited_copy(fp32_ckpt, tmp_path / "c", lambda t: t.pop(name))
    assert name in load_error(ckpt)


def test_unexpected_tensor(fp32_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.extra_bias"
    ckpt = edited_copy(fp32_ckpt, tmp_path / "c", lambda t: t.update({name: torch.zeros(4)}))
    message = load_error(ckpt)
    assert "unexpected" in message and name in message


def test_mis_shaped_tensor(fp32_ckpt: Path, tmp_path: Path) -> None:
    def shrink(t: Tensors) -> None:
        t[K_PROJ] = t[K_PROJ][:, :-1].contiguous()

    ckpt = edited_copy(fp32_ckpt, tmp_path / "c", shrink)
    message = load_error(ckpt)
    assert K_PROJ in message and "(32, 63)" in message and "(32, 64)" in message


def test_fp8_without_scale(fp8_ckpt: Path, tmp_path: Path) -> None:
    ckpt = edited_copy(fp8_ckpt, tmp_path / "c", lambda t: t.pop(EXPERTS + "_scale_inv"))
    message = load_error(ckpt)
    assert EXPERTS in message and EXPERTS + "_scale_inv" in message


def test_fp8_scale_of_wrong_shape(fp8_ckpt: Path, tmp_path: Path) -> None:
    def cut(t: Tensors) -> None:
        t[EXPERTS + "_scale_inv"] = t[EXPERTS + "_scale_inv"][:, :1].contiguous()

    ckpt = edited_copy(fp8_ckpt, tmp_path / "c", cut)
    message = load_error(ckpt)  # weight [8, 32, 64] in 16x16 blocks -> scale [8, 2, 4]
    assert EXPERTS + "_scale_inv" in message and "(8, 1, 4)" in message and "(8, 2, 4)" in message


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    message = load_error(tmp_path)
    assert "pytorch_model.bin" in message and "never loaded" in message


def test_unsupported_storage_dtype(fp32_ckpt: Path, tmp_path: Path) -> None:
    name = "model.norm.weight"
    ckpt = edited_copy(fp32_ckpt, tmp_path / "c", lambda t: t.update({name: t[name].to(torch.int32)}))
    message = load_error(ckpt)
    assert name in message and "int32" in message
