"""Step 3.7's vision config, tower and projector against transformers' (fp32), and the loader's checks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import tiny_vision_config, write_vision_checkpoint
from stepflash.config import ConfigError, ModelConfig
from stepflash.model.loader import CheckpointError, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_vision_checkpoint(tmp_path_factory.mktemp("vision"), seed=5)


def test_config_reads_legacy_and_hf_names() -> None:
    legacy = ModelConfig.from_dict(tiny_vision_config(image_token_id=314)).vision
    data = tiny_vision_config(image_token_id=314)
    data["vision_config"] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 64, "image_size": 112, "patch_size": 14}
    assert ModelConfig.from_dict(data).vision == legacy
    assert (legacy.hidden_size, legacy.num_layers, legacy.head_dim, legacy.intermediate_size) == (32, 2, 16, 64)
    assert (legacy.crop_size, legacy.image_token_id) == (56, 314)


def test_published_sizes() -> None:
    data = tiny_vision_config(vision_config={"width": 1536, "layers": 47, "heads": 16, "mlp_ratio": 8960 / 1536,
                                             "image_size": 728, "patch_size": 14},
                              image_token_len=169, patch_token_len=81, image_token_id=5)
    vision = ModelConfig.from_dict(data).vision
    assert (vision.intermediate_size, vision.head_dim, vision.crop_size) == (8960, 96, 504)


@pytest.mark.parametrize("overrides, words", [
    (dict(image_token_len=5), ["image_token_len", "5"]),
    (dict(patch_token_len=2), ["patch_token_len"]),
    (dict(image_token_id=100000), ["image_token_id", "100000"]),
    (dict(understand_projector_stride=3), ["understand_projector_stride"]),
    (dict(vision_config={"width": 30, "heads": 2, "image_size": 112}), ["head_dim", "30"]),
    (dict(vision_config={"width": 32, "heads": 2, "image_size": 100, "patch_size": 14}), ["image_size", "100"]),
    (dict(vision_config={"width": 32, "heads": 2, "image_size": 112, "hidden_act": "gelu"}), ["hidden_act"]),
    (dict(vision_config={"width": 32, "heads": 2, "image_size": 112, "use_cls_token": True}), ["use_cls_token"]),
    (dict(vision_config={"width": 32, "heads": 2, "image_size": 112, "use_ln_post": True}), ["use_ln_post"]),
    (dict(vision_config=[1, 2]), ["vision_config"]),
])
def test_config_errors_name_the_field(overrides, words) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(tiny_vision_config(**overrides))
    for word in words:
        assert word in str(e.value)


@torch.no_grad()
@pytest.mark.parametrize("side", [112, 56])  # a global view (grid 8, the table as is) and a crop (grid 4, resized)
def test_tower_matches_transformers(checkpoint, side) -> None:
    from reference import transformers_vision_lm

    ref = transformers_vision_lm(checkpoint).model
    ours = load_model(checkpoint, dtype=torch.float32).vision
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
    expected = ref.multi_modal_projector(ref.vision_model(pixels).last_hidden_state)
    got = ours(pixels)
    assert got.shape == expected.shape == (3, (side // 56) ** 2, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("vision_model.transformer.resblocks.1.attn.in_proj_bias"), ["missing", "in_proj_bias"]),
    (lambda t: t.pop("vit_large_projector.weight"), ["missing", "vit_large_projector.weight"]),
    (lambda t: t.update({"vision_model.conv1.weight": torch.zeros(32, 3, 16, 16)}),
     ["vision_model.conv1.weight", "(32, 3, 16, 16)"]),
    (lambda t: t.update({"vision_model.ln_post.weight": torch.ones(32)}), ["unexpected", "ln_post"]),
])
def test_loader_names_bad_vision_tensors(checkpoint, tmp_path, edit, words) -> None:
    bad = _edit_checkpoint(checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    for word in words:
        assert word in str(e.value)


def test_text_only_config_skips_vision_tensors(checkpoint, tmp_path) -> None:
    """A Step 3.7 checkpoint whose config has no vision_config still loads its text decoder."""
    text_only = _edit_checkpoint(checkpoint, tmp_path / "text", lambda t: None)
    config = json.loads((text_only / "config.json").read_text())
    del config["vision_config"]
    (text_only / "config.json").write_text(json.dumps(config))
    assert load_model(text_only).vision is None
