"""The oracle for tests: Hugging Face transformers' step3p5 text decoder (models/step3p7), fed the
same checkpoint, read here without stepflash's loader: tensors with safetensors, FP8 blocks
dequantized here, names converted to transformers' layout here."""

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import torchvision_stub  # noqa: F401  (before transformers)

transformers = __import__("pytest").importorskip("transformers")
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig  # noqa: E402
from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel  # noqa: E402



@functools.lru_cache(maxsize=4)
def _cached_model(ckpt: str, overrides: str) -> tuple[Step3p7TextModel, torch.Tensor]:
    return transformers_text_model(Path(ckpt), json.loads(overrides))


@torch.no_grad()
def reference_logits(ckpt: Path, token_ids: list[int], config_overrides: dict | None = None) -> torch.Tensor:
    """[len(token_ids), vocab] fp32 logits of one sequence (models are cached per checkpoint)."""
    model, lm_head = _cached_model(str(ckpt), json.dumps(config_overrides or {}, sort_keys=True))
    hidden = model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
    return hidden @ lm_head.T



def read_fp32_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """All checkpoint tensors in fp32, FP8 weights multiplied by their per-block scale_inv."""
    raw = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    config = json.loads((ckpt / "config.json").read_text())
    br, bc = (config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        t = t.float()
        if name + "_scale_inv" in raw:
            s = raw[name + "_scale_inv"]
            rows, cols = t.shape[-2:]
            for i in range(math.ceil(rows / br)):
                for j in range(math.ceil(cols / bc)):
                    t[..., i * br:(i + 1) * br, j * bc:(j + 1) * bc] *= s[..., i, j, None, None]
        out[name] = t
    return out


def to_transformers_names(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hub names -> Step3p7TextModel state dict (MTP layers and lm_head dropped)."""
    sd = {}
    for name, t in tensors.items():
        if not name.startswith("model."):
            continue
        parts = name.split(".")
        if parts[1] == "layers" and int(parts[2]) >= num_layers:
            continue
        name = name.removeprefix("model.")
        if ".moe.up_proj." in name:
            continue
        if ".moe.gate_proj." in name:
            up = tensors["model." + name.replace(".moe.gate_proj.", ".moe.up_proj.")]
            sd[name.replace(".moe.gate_proj.weight", ".mlp.experts.gate_up_proj")] = torch.cat([t, up], dim=1)
            continue
        name = (name.replace(".moe.gate.weight", ".mlp.gate.weight")
                .replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
                .replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
                .replace(".share_expert.", ".mlp.shared_experts."))
        sd[name] = t
    return sd


def transformers_text_model(ckpt: Path, config_overrides: dict | None = None) -> tuple[Any, torch.Tensor]:
    """(transformers' step3p5 text decoder in fp32, lm_head weight) for the checkpoint in `ckpt`:
    the oracle; reads the files without stepflash's loader."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(config_overrides or {})
    config.pop("model_type", None)
    tf_cfg = Step3p7TextConfig(**config)
    tf_cfg._attn_implementation = "eager"
    model = Step3p7TextModel(tf_cfg).float().eval()
    tensors = read_fp32_tensors(ckpt)
    model.load_state_dict(to_transformers_names(tensors, tf_cfg.num_hidden_layers), strict=True)
    return model, tensors["lm_head.weight"]


def transformers_causal_lm(ckpt: Path) -> Any:
    """transformers' Step3p7ForConditionalGeneration (a minimal vision tower that text never uses)
    holding the checkpoint's text decoder and lm_head, in fp32: the peer for `generate` benchmarks."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    text = json.loads((ckpt / "config.json").read_text())
    text.pop("model_type", None)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    model = Step3p7ForConditionalGeneration(Step3p7Config(text_config=text, vision_config=vision)).float().eval()
    tensors = read_fp32_tensors(ckpt)
    state = {"model.language_model." + k: v
             for k, v in to_transformers_names(tensors, model.config.text_config.num_hidden_layers).items()}
    state["lm_head.weight"] = tensors["lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("language_model" in k or k == "lm_head.weight" for k in missing):
        raise RuntimeError(f"transformers model does not fit the checkpoint: {missing} {unexpected}")
    return model


@functools.lru_cache(maxsize=2)
def transformers_vision_lm(ckpt: Path) -> Any:
    """transformers' Step3p7ForConditionalGeneration for a Step 3.7 checkpoint, in fp32, through its
    own `from_pretrained` (its hub-name conversion: fused in_proj split, RoPE rows permuted), refusing
    any tensor it left unloaded."""
    from transformers import Step3p7ForConditionalGeneration

    model, info = Step3p7ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                                  output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"transformers model does not fit the checkpoint: {info}")
    return model.eval()


def reference_processor(ckpt: Path) -> Any:
    """transformers' Step3p7Processor (its image processor sized from config.json as the checkpoint's
    own remote code would be, and the checkpoint's tokenizer). Its image processor needs torchvision
    (see conftest.py for PyPI's CUDA wheels next to a CPU torch); skips the test without it."""
    import pytest

    pytest.importorskip("torchvision")
    from transformers import AutoTokenizer
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor
    from transformers.models.step3p7.processing_step3p7 import Step3p7Processor

    config = json.loads((ckpt / "config.json").read_text())
    vision = config["vision_config"]
    crop = math.isqrt(config["patch_token_len"]) * vision["patch_size"] * 4
    images = Step3p7ImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]},
                                   patch_size=crop, vision_patch_size=vision["patch_size"])
    return Step3p7Processor(images, AutoTokenizer.from_pretrained(ckpt))
