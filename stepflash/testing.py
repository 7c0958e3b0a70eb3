"""Random hub-format checkpoints for tests and benchmarks, and the bridge to the transformers oracle.

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
from safetensors import safe_open
from safetensors.torch import save_file

from stepflash.config import ModelConfig
from stepflash.model.loader import hub_state_dict, mtp_depth
from stepflash.model.step3p5 import Step3p5ForCausalLM
from stepflash.tokenizer import EOS_TOKEN, write_byte_level_tokenizer

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Small modules that stay in high precision in FP8 checkpoints.
FP8_KEEP = ("embed_tokens", "lm_head", "shared_head.output", ".moe.gate.", "g_proj", "norm")


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small config.json in the Step-3.5-Flash layout and legacy field names.

    5 decoder layers (full, 3 sliding, full), dense layers 0-1 then MoE (8 experts, top 2, shared
    expert), 4 query heads on full layers and 6 on sliding ones, partial RoPE on full layers with a
    llama3 remap that matters at short positions, clamps on the last layer, 3 MTP modules.
    """
    n, n_mtp = 5, 3
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    cfg: dict[str, Any] = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": n,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "head_dim": 16,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 6,
                                    "num_attention_groups": 2, "head_dim": 16},
        "layer_types": types + ["sliding_attention"] * n_mtp,
        "sliding_window": 16,
        "rope_theta": [5e6 if t == "full_attention" else 1e4 for t in types] + [1e4] * n_mtp,
        "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in types] + [1.0] * n_mtp,
        "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 64,
                         "low_freq_factor": 1.0, "high_freq_factor": 8.0},
        "yarn_only_types": ["full_attention"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "moe_num_experts": 8,
        "moe_top_k": 2,
        "moe_intermediate_size": 32,
        "share_expert_dim": 32,
        "moe_layers_enum": ",".join(str(i) for i in range(2, n)),
        "moe_router_activation": "sigmoid",
        "use_moe_router_bias": True,
        "norm_expert_weight": True,
        "moe_router_scaling_factor": 3.0,
        "need_fp32_gate": True,
        "swiglu_limits": [0.0] * (n - 1) + [0.5],
        "swiglu_limits_shared": [0.0] * (n - 1) + [0.8],
        "num_nextn_predict_layers": n_mtp,
        "use_qk_norm": True,
        "use_head_wise_attn_gate": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": [1, 3],
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hub-named fp32 tensors with scales that keep activations O(1) through the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in hub_state_dict(Step3p5ForCausalLM(cfg)).items()}
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            std = 0.2  # zero-centred norms: the scale is 1 + w
        elif name.endswith("router_bias"):
            std = 0.3  # large enough to change which experts win
        elif name.endswith("embed_tokens.weight"):
            std = 1.0
        else:
            std = 1.0 / math.sqrt(shape[-1])
        weights[name] = torch.randn(shape, generator=gen) * std
    return weights


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
    _save_shards(out, tensors, num_shards)
    write_byte_level_tokenizer(out, cfg.vocab_size)
    return out


def _save_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
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
_BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "moe.down_proj.weight",
                  "share_expert.down_proj.weight")
SCRIPT_LOGIT = 30.0  # logit of the scripted next token; the other scripted rows give 0, random rows O(1)


def write_scripted_checkpoint(out_dir: str | Path, script: list[str], trigger: str = "\n",
                              config: dict[str, Any] | None = None) -> list[int]:
    """Write a hub-format checkpoint whose greedy decoding, after any prompt that ends with the token
    for `trigger`, emits `script` (one token per string) and then `<|end_of_sentence|>`.

    Script strings that are already single tokens of the byte-level tokenizer (such as `</think>`)
    keep their ids; the others become added, non-special tokens. Every block output (attention
    o_proj, dense, shared and routed down_proj, decoder and MTP layers) is zero, so each hidden state
    is its token's embedding; the final norm is the identity scale and lm_head maps the normalised
    embedding of token t to exactly SCRIPT_LOGIT on next(t) and 0 on the other scripted tokens:
    next(trigger) = script[0], next(script[i]) = script[i + 1], next(script[-1]) = eos. MTP modules
    pass the embedding of their input token through (eh_proj = [I, 0]) to a copy of lm_head, so their
    drafts follow the script too. Returns the script's token ids (eos not included).
    """
    if len(set(script)) != len(script) or trigger in script:
        raise ValueError("script tokens must be distinct from each other and from the trigger")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    config["torch_dtype"] = "float32"
    cfg = ModelConfig.from_dict(config)
    if cfg.tie_word_embeddings:
        raise ValueError("a scripted checkpoint needs an lm_head separate from the embeddings")
    if len(script) + 1 > cfg.hidden_size:
        raise ValueError(f"a script of {len(script)} tokens needs hidden_size > {len(script)}")
    backend, ids = _script_tokenizer(out, cfg.vocab_size, script)
    trigger_ids = backend.encode(trigger, add_special_tokens=False).ids
    if len(trigger_ids) != 1:
        raise ValueError(f"trigger {trigger!r} is not a single token: {trigger_ids}")
    eos = backend.token_to_id(EOS_TOKEN)
    sources, targets = [trigger_ids[0], *ids], [*ids, eos]
    if len(set(sources)) != len(sources) or eos in sources:
        raise ValueError(f"trigger and script token ids must be distinct and not eos: {sources}")

    weights = random_weights(cfg)
    for name in weights:
        if name.endswith(_BLOCK_OUTPUTS):
            weights[name].zero_()
    weights["model.norm.weight"].zero_()  # zero-centred: scale 1
    embeds = weights["model.embed_tokens.weight"][sources]
    hidden = embeds * torch.rsqrt(embeds.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    # Rows whose product with the normalised source embeddings is SCRIPT_LOGIT * identity.
    weights["lm_head.weight"][targets] = SCRIPT_LOGIT * torch.linalg.pinv(hidden).T
    h = cfg.hidden_size
    for depth in range(cfg.num_mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + depth}."
        weights[prefix + "enorm.weight"].zero_()
        weights[prefix + "eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        weights[prefix + "transformer.shared_head.norm.weight"].zero_()
        weights[prefix + "transformer.shared_head.output.weight"] = weights["lm_head.weight"].clone()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_shards(out, weights, 1)
    return ids


def _script_tokenizer(out: Path, vocab_size: int, script: list[str]) -> tuple[tokenizers.Tokenizer, list[int]]:
    """Write the byte-level tokenizer with room for the script, add the script strings that are not
    single tokens yet, and return it with the script's ids (each checked to decode to its string)."""
    write_byte_level_tokenizer(out, vocab_size - len(script))
    path = out / "tokenizer.json"
    backend = tokenizers.Tokenizer.from_file(str(path))
    backend.add_tokens([tokenizers.AddedToken(s, special=False, normalized=False) for s in script
                        if len(backend.encode(s, add_special_tokens=False).ids) != 1])
    backend.save(str(path))
    ids = []
    for s in script:
        encoded = backend.encode(s, add_special_tokens=False).ids
        if len(encoded) != 1 or backend.decode(encoded, skip_special_tokens=True) != s:
            raise ValueError(f"script token {s!r} is not one token that decodes back to itself: {encoded}")
        ids.append(encoded[0])
    if backend.decode(ids, skip_special_tokens=True) != "".join(script):
        raise ValueError("the script's token ids do not decode back to the script")
    return backend, ids


# -- the transformers oracle ------------------------------------------------------------------------
# Independent of stepflash's loader: tensors are read here with safetensors, FP8 blocks dequantized
# here, names converted to transformers' layout here.

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
    the oracle. Needs `transformers` (a test dependency); reads the files without stepflash's loader."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

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
