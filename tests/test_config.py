"""Parsing of the published Step-3.5-Flash config.json format into ModelConfig / LayerSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stepflash.config import FULL, SLIDING, ConfigError, ModelConfig, RopeScaling
from stepflash.train.configs import tiny_config

N = 5  # decoder layers in tiny_config (full, sliding x3, full) + 3 MTP layers


def parse(**overrides: Any) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config(**overrides))


def config_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(**overrides)
    return str(info.value)


def flash_config() -> dict[str, Any]:
    """The real Step-3.5-Flash config.json (spec section 1): 45 layers + 3 MTP, 48-entry lists."""
    n, n_mtp = 45, 3
    types = [FULL if i % 4 == 0 else SLIDING for i in range(n)] + [SLIDING] * n_mtp
    return {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5",
        "vocab_size": 128896, "hidden_size": 4096, "intermediate_size": 11264, "num_hidden_layers": n,
        "num_attention_heads": 64, "num_attention_groups": 8, "head_dim": 128,
        "attention_other_setting": {"attention_type": SLIDING, "num_attention_heads": 96,
                                    "num_attention_groups": 8, "head_dim": 128},
        "layer_types": types, "sliding_window": 512,
        "rope_theta": [5e6 if t == FULL else 1e4 for t in types],
        "partial_rotary_factors": [0.5 if t == FULL else 1.0 for t in types],
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                         "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        "yarn_only_types": [FULL], "max_position_embeddings": 262144, "max_seq_len": 262144,
        "rms_norm_eps": 1e-5, "moe_num_experts": 288, "moe_top_k": 8, "moe_intermediate_size": 1280,
        "share_expert_dim": 1280, "moe_layers_enum": ",".join(str(i) for i in range(3, n)),
        "moe_router_activation": "sigmoid", "use_moe_router_bias": True, "norm_expert_weight": True,
        "moe_router_scaling_factor": 3.0, "need_fp32_gate": True,
        "swiglu_limits": [0.0] * 43 + [7.0, 7.0], "swiglu_limits_shared": [0.0] * 43 + [16.0, 16.0],
        "num_nextn_predict_layers": n_mtp, "use_qk_norm": True, "use_head_wise_attn_gate": True,
        "att_impl_type": "GQA", "zero_centered": True, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": [1, 2, 128007], "torch_dtype": "bfloat16",
    }


# ---------------------------------------------------------------- published format

def test_real_flash_shape() -> None:
    cfg = ModelConfig.from_dict(flash_config())
    assert (cfg.num_hidden_layers, cfg.num_mtp_layers, len(cfg.layers)) == (45, 3, 48)
    full = [s for s in cfg.decoder_layers if s.attention_type == FULL]
    sliding = [s for s in cfg.decoder_layers if s.attention_type == SLIDING]
    assert [s.index for s in full] == list(range(0, 45, 4))
    assert len(sliding) == 33
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.rotary_dim, s.rope_theta) for s in full} == {
        (64, 8, 128, 64, 5e6)}
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.rotary_dim, s.rope_theta) for s in sliding} == {
        (96, 8, 128, 128, 1e4)}
    assert [s.index for s in cfg.layers if s.is_moe] == list(range(3, 45))
    assert {s.index: s.swiglu_limit for s in cfg.layers if s.swiglu_limit} == {43: 7.0, 44: 7.0}
    assert {s.index: s.swiglu_limit_shared for s in cfg.layers if s.swiglu_limit_shared} == {43: 16.0, 44: 16.0}
    assert all(s.is_mtp and s.attention_type == SLIDING and not s.is_moe for s in cfg.mtp_layers)
    assert (cfg.moe_num_experts, cfg.moe_top_k, cfg.moe_intermediate_size, cfg.share_expert_dim) == (288, 8, 1280, 1280)
    assert (cfg.sliding_window, cfg.max_position_embeddings, cfg.eos_token_ids) == (512, 262144, [1, 2, 128007])
    assert cfg.moe_router_scaling_factor == 3.0
    assert full[0].rope_scaling == RopeScaling(2.0, 1.0, 32.0, 131072)


def test_moe_layers_enum_string_and_list_agree() -> None:
    as_string = parse(moe_layers_enum=" 1, 3,4 ")
    as_list = parse(moe_layers_enum=[1, 3, 4])
    assert [s.is_moe for s in as_string.layers] == [s.is_moe for s in as_list.layers]
    assert [s.index for s in as_list.layers if s.is_moe] == [1, 3, 4]


def test_per_layer_lists_without_mtp_entries() -> None:
    full = tiny_config()
    short = parse(layer_types=full["layer_types"][:N], rope_theta=full["rope_theta"][:N],
                  partial_rotary_factors=full["partial_rotary_factors"][:N])
    assert short.layers == ModelConfig.from_dict(full).layers
    for spec in short.mtp_layers:  # MTP layers: sliding, 6 heads, theta 1e4, full rotary
        assert (spec.attention_type, spec.num_heads, spec.rope_theta, spec.rotary_dim) == (SLIDING, 6, 1e4, 16)
        assert spec.rope_scaling is None and spec.is_mtp


def test_per_layer_lists_with_mtp_entries_are_read() -> None:
    cfg = tiny_config()
    cfg["rope_theta"][-1] = 3e4
    cfg["partial_rotary_factors"][-1] = 0.5
    last = ModelConfig.from_dict(cfg).layers[-1]
    assert (last.index, last.rope_theta, last.rotary_dim) == (7, 3e4, 8)


def test_swiglu_limits_null_zero_and_missing_mtp_entries() -> None:
    cfg = parse(swiglu_limits=[None, 0, 2.5, 0.0, 7], swiglu_limits_shared=[1.5, None])
    assert [s.swiglu_limit for s in cfg.layers] == [0, 0, 2.5, 0, 7, 0, 0, 0]
    assert [s.swiglu_limit_shared for s in cfg.layers] == [1.5] + [0.0] * 7
    assert all(s.swiglu_limit == 0 for s in parse(swiglu_limits=None).layers)


def test_llama3_rope_scaling_on_full_layers_only() -> None:
    cfg = parse()
    scaled = {s.index for s in cfg.layers if s.rope_scaling is not None}
    assert scaled == {s.index for s in cfg.layers if s.attention_type == FULL} == {0, 4}
    assert cfg.layers[0].rope_scaling == RopeScaling(4.0, 1.0, 8.0, 64)
    assert all(s.rope_scaling is None for s in parse(rope_scaling=None).layers)


def test_head_counts_per_layer_and_kv_groups() -> None:
    cfg = parse(attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 4, "head_dim": 32})
    heads = [(s.num_heads, s.num_kv_heads, s.head_dim) for s in cfg.layers]
    assert heads == [(4, 2, 16), (8, 4, 32), (8, 4, 32), (8, 4, 32), (4, 2, 16)] + [(8, 4, 32)] * 3
    assert [s.rotary_dim for s in cfg.layers[:2]] == [8, 32]


def test_num_attention_groups_are_kv_heads() -> None:
    cfg = parse(num_attention_groups=1, attention_other_setting=None)
    assert {(s.num_heads, s.num_kv_heads) for s in cfg.layers} == {(4, 1)}


@pytest.mark.parametrize("eos, expected", [(7, [7]), ([1, 3], [1, 3]), (None, [])])
def test_eos_int_or_list(eos: Any, expected: list[int]) -> None:
    assert parse(eos_token_id=eos).eos_token_ids == expected


def test_step3p7_uses_text_config() -> None:
    text = tiny_config(model_type="step3p7_text", num_hidden_layers=6, layer_types=None, rope_theta=1e4,
                       partial_rotary_factors=None, moe_layers_enum="2,5", swiglu_limits=None,
                       swiglu_limits_shared=None)
    cfg = ModelConfig.from_dict({"model_type": "step3p7", "architectures": ["Step3p7ForConditionalGeneration"],
                                 "text_config": text, "vision_config": {"hidden_size": 1024}})
    assert cfg.model_type == "step3p7"
    assert (cfg.num_hidden_layers, cfg.hidden_size, len(cfg.layers)) == (6, 64, 9)
    assert [s.index for s in cfg.layers if s.is_moe] == [2, 5]


def test_from_pretrained_reads_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(flash_config()))
    assert ModelConfig.from_pretrained(tmp_path).num_hidden_layers == 45


# ---------------------------------------------------------------- errors name the field

@pytest.mark.parametrize("overrides, fields", [
    (dict(model_type="llama"), ["model_type", "llama"]),
    (dict(hidden_size=None), ["hidden_size"]),
    (dict(num_attention_groups=3), ["num_attention_heads", "num_attention_groups"]),
    (dict(attention_other_setting={"num_attention_heads": 6, "num_attention_groups": 4}), ["attention_other_setting"]),
    (dict(rope_theta=[1e4] * 7), ["rope_theta", "7"]),
    (dict(layer_types=[SLIDING] * 6), ["layer_types", "6"]),
    (dict(swiglu_limits=[0.0] * 9), ["swiglu_limits"]),
    (dict(moe_layers_enum="2,3,5"), ["moe_layers_enum", "5"]),
    (dict(moe_top_k=9), ["moe_top_k"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_scaling", "yarn"]),
    (dict(partial_rotary_factors=[0.3125] + [1.0] * 7), ["partial_rotary_factors"]),
    (dict(sliding_window=None), ["sliding_window"]),
])
def test_config_errors_name_the_field(overrides: dict[str, Any], fields: list[str]) -> None:
    message = config_error(**overrides)
    for field in fields:
        assert field in message


def test_missing_field_is_an_error() -> None:
    data = tiny_config()
    del data["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(data)


def test_step3p7_without_text_config() -> None:
    with pytest.raises(ConfigError, match="text_config"):
        ModelConfig.from_dict({"model_type": "step3p7"})


def test_invalid_json_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "step3p5",')
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
