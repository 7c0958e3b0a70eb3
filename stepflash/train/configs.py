"""Model presets for `stepflash train --config`: the Step-3.5-Flash layout in miniature (`tiny`
is also what the tests build their random checkpoints from)."""

from typing import Any



def tiny_config(n: int = 5, n_mtp: int = 3, **overrides: Any) -> dict[str, Any]:
    """A small config.json in the Step-3.5-Flash layout and legacy field names.

    5 decoder layers (full, 3 sliding, full), dense layers 0-1 then MoE (8 experts, top 2, shared
    expert), 4 query heads on full layers and 6 on sliding ones, partial RoPE on full layers with a
    llama3 remap that matters at short positions, clamps on the last layer, 3 MTP modules; or `n`
    layers (MoE from layer min(2, n - 1) on) and `n_mtp` modules.
    """
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
        "moe_layers_enum": ",".join(str(i) for i in range(min(2, n - 1), n)),
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


def small_config(vocab_size: int = 8192) -> dict[str, Any]:
    """~27M parameters (8.8M active per token): 8 layers (full attention at 0 and 4, sliding
    window 128 elsewhere), dense layers 0-1, then 16 experts top-2 with a shared expert, 4 query
    heads on full layers and 6 on sliding ones, partial RoPE on full layers, 3 MTP modules."""
    n, n_mtp = 8, 3
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    return tiny_config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=n, head_dim=64,
        num_attention_heads=4, num_attention_groups=2,
        attention_other_setting={"attention_type": "sliding_attention", "num_attention_heads": 6,
                                 "num_attention_groups": 2, "head_dim": 64},
        layer_types=types + ["sliding_attention"] * n_mtp, sliding_window=128,
        rope_theta=[5e6 if t == "full_attention" else 1e4 for t in types] + [1e4] * n_mtp,
        partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in types] + [1.0] * n_mtp,
        rope_scaling=None, moe_num_experts=16, moe_top_k=2, moe_intermediate_size=256, share_expert_dim=256,
        moe_layers_enum=",".join(str(i) for i in range(2, n)), swiglu_limits=[0.0] * n, swiglu_limits_shared=[0.0] * n,
    )


def bundled_config(vocab_size: int = 4096) -> dict[str, Any]:
    """The bundled default model (stepflash/models/tiny): the `small` layout with 8 narrower experts
    (intermediate 128, top-2) and a dense FFN of 512, ~16M parameters = ~33 MB in bf16 at vocab 4096,
    sized to train on this 2-core CPU in about 80 minutes."""
    config = small_config(vocab_size)
    config.update(moe_num_experts=8, moe_intermediate_size=128, intermediate_size=512)
    return config


PRESETS = {"tiny": lambda vocab_size: tiny_config(vocab_size=vocab_size), "small": small_config,
           "bundled": bundled_config}
