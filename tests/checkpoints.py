"""Random hub-format checkpoints for tests and benchmarks (which import this file from tests/).

`write_checkpoint(dir, tiny_config(...))` writes what a published Step-3.5-Flash repository holds, at
a small size, so that nothing needs a download. Options cover bf16 storage, shards with an index,
FP8 block-scaled weights and MTP modules.
"""

import json
import math
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file

from stepflash.config import ModelConfig
from stepflash.model.loader import hub_state_dict, mtp_depth
from stepflash.model.step3p5 import Step3p5ForCausalLM
from stepflash.multimodal import IMAGE_TOKEN, IMAGE_TOKENS
from stepflash.tokenizer import write_bpe_tokenizer
from stepflash.train.configs import tiny_config

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Small modules that stay in high precision in FP8 checkpoints.
FP8_KEEP = ("embed_tokens", "lm_head", "shared_head.output", ".moe.gate.", "g_proj", "norm")


# Fixed training text for the test tokenizer's merges (written for this package).
_SAMPLE_TEXT = """\
The engine reads a prompt, runs the model one step at a time and streams the
answer back. Each step picks the next token, checks whether it ends the turn,
and then the detokenizer turns the new tokens into text for the client.
def forward(self, hidden_states, positions):
    residual = hidden_states
    hidden_states = self.norm(hidden_states)
    return self.attention(hidden_states, positions) + residual
for index in range(10):
    print(index, index * index)
The weather in the city is sunny today, with a light wind from the west.
Please tell me the time and the temperature, then check the calendar.
When the user asks a question, think first, then answer in a short sentence.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
Numbers like 12, 345, 6789 and 3.14 appear in text, code and tables.
"""


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled float8_e4m3fn over the last two dims: returns (fp8 weight, fp32 scale_inv)."""
    rows, cols = weight.shape[-2:]
    br, bc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(*weight.shape[:-2], br * block[0], bc * block[1], device=weight.device)
    padded[..., :rows, :cols] = weight
    blocks = padded.unflatten(-2, (br, block[0])).unflatten(-1, (bc, block[1]))
    scale_inv = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX
    expanded = scale_inv.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]
    return (weight / expanded).to(torch.float8_e4m3fn), scale_inv


def write_byte_level_tokenizer(
    out_dir: Path, vocab_size: int, chat_template: str | None = None
) -> None:
    """Write a small deterministic byte-level BPE tokenizer with Step-3.5 special tokens, its
    merges learned from a fixed sample text (for tests and random checkpoints)."""
    write_bpe_tokenizer(_SAMPLE_TEXT.splitlines(keepends=True), out_dir, vocab_size, chat_template)


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hub-named fp32 tensors with scales that keep activations O(1) through the network (the vision
    tower's, when the config has one, by fan-in; its LayerNorm scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in hub_state_dict(Step3p5ForCausalLM(cfg)).items()}
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    weights = {}
    for name, shape in shapes.items():
        if name.startswith(("vision_model.", "vit_large_projector.")):
            weights[name] = _random_vision_tensor(name, shape, gen)
        elif name.endswith("norm.weight"):
            std = 0.2  # zero-centred norms: the scale is 1 + w
        elif name.endswith("router_bias"):
            std = 0.3  # large enough to change which experts win
        elif name.endswith("embed_tokens.weight"):
            std = 1.0
        else:
            std = 1.0 / math.sqrt(shape[-1])
        weights[name] = torch.randn(shape, generator=gen) * std
    return weights


def _random_vision_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if "ln_" in name and name.endswith(".weight"):
        return 1.0 + 0.2 * noise
    if name.endswith(("bias", "gamma")) or name.endswith("positional_embedding"):
        return 0.3 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def tiny_vision_config(text: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A Step 3.7 config.json (legacy names as published) around `text` (tiny_config() by default):
    vision width 32, 2 layers, 2 heads, 112-pixel global views (8x8 patches -> 2x2 = 4 tokens) and
    56-pixel crops (1 token); `image_token_id` is set by write_vision_checkpoint from its tokenizer."""
    cfg = {
        "model_type": "step3p7", "architectures": ["Step3p7ForConditionalGeneration"],
        "text_config": text or tiny_config(),
        "vision_config": {"model_type": "perception_encoder", "width": 32, "layers": 2, "heads": 2,
                          "mlp_ratio": 2.0, "image_size": 112, "patch_size": 14, "ls_init_value": 0.1,
                          "hidden_act": "quick_gelu", "use_cls_token": False, "use_ln_pre": True,
                          "use_ln_post": False, "use_abs_posemb": True, "use_rope2d": True},
        "image_token_len": 4, "patch_token_len": 1, "understand_projector_stride": 2, "projector_bias": False,
    }
    cfg.update(overrides)
    return cfg


def write_vision_checkpoint(out_dir: str | Path, config: dict[str, Any] | None = None, *, seed: int = 0,
                            with_mtp: bool = True) -> Path:
    """A random Step 3.7 checkpoint in the hub format: text decoder (+ MTP), vision tower, projector,
    and a tokenizer with the six image tokens (last ids of the vocabulary) whose chat template renders
    each image part as one <im_patch>."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_vision_config())
    vocab = config["text_config"]["vocab_size"]
    write_byte_level_tokenizer(out, vocab - len(IMAGE_TOKENS))
    backend = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    backend.save(str(out / "tokenizer.json"))
    config["image_token_id"] = backend.token_to_id(IMAGE_TOKEN)
    cfg = ModelConfig.from_dict(config)
    weights = random_weights(cfg, seed)
    if not with_mtp:
        weights = {k: v for k, v in weights.items() if mtp_depth(k, cfg.num_hidden_layers) is None}
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_shards(out, weights, 1)
    return out


def write_checkpoint(out_dir: str | Path, config: dict[str, Any] | None = None, *, dtype: torch.dtype = torch.float32,
                     num_shards: int = 1, fp8_block: tuple[int, int] | None = None, with_mtp: bool = True,
                     seed: int = 0) -> Path:
    """Write a random checkpoint in the hub format and return its directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    cfg = ModelConfig.from_dict(config)
    weights = random_weights(cfg, seed)
    if not with_mtp:
        weights = {k: v for k, v in weights.items() if mtp_depth(k, cfg.num_hidden_layers) is None}
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if fp8_block and w.dim() >= 2 and not any(part in name for part in FP8_KEEP):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(w, fp8_block)
        elif name.endswith(("moe.gate.weight", "router_bias")):
            tensors[name] = w  # the router stays fp32, as in the release
        else:
            tensors[name] = w.to(dtype)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8_block:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(fp8_block)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_shards(out, tensors, num_shards)
    write_byte_level_tokenizer(out, cfg.vocab_size)
    return out


def save_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    if num_shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {name: files[i % num_shards] for i, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == file}, out / file,
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# Block outputs that are zeroed in a scripted checkpoint, so that every hidden state is its token embedding.
