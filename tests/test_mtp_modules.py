"""MTP modules against the spec's formulas (section 4), computed independently here.

transformers' own MTP path (`generate(use_mtp=True)`) uses the main lm_head and chains post-norm
states, which differs from the StepFun reference (vLLM/SGLang) that the spec follows: each module has
its own shared_head, module 1 takes the target's hidden state *before* the final norm, and module
k+1 takes module k's output before its head norm. So only the decoder block of each module is taken
from transformers here; enorm/hnorm/eh_proj/head and the chaining are written out from the spec.
"""

import json

import pytest
import torch

from reference import Step3p7TextConfig, Step3p7TextModel, read_fp32_tensors, transformers_text_model
from stepflash.model.attention import BatchLayout
from stepflash.model.loader import load_model
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config

LENGTHS = [40, 23]  # longer than the sliding window (16) of the MTP blocks


def zero_centred_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def mtp_block(config: dict, tensors: dict, layer: int) -> Step3p7TextModel:
    """transformers' decoder with one sliding, dense layer holding MTP layer `layer`'s block weights."""
    other = config["attention_other_setting"]
    cfg = Step3p7TextConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=1, head_dim=config["head_dim"],
        num_attention_heads=config["num_attention_heads"], num_attention_groups=config["num_attention_groups"],
        attention_other_setting=other, layer_types=["sliding_attention"], sliding_window=config["sliding_window"],
        rope_theta=[config["rope_theta"][layer]], partial_rotary_factors=[1.0], moe_layers_enum="",
        swiglu_limits_shared=[0.0], rms_norm_eps=config["rms_norm_eps"],
    )
    cfg._attn_implementation = "eager"
    model = Step3p7TextModel(cfg).float().eval()
    prefix = f"model.layers.{layer}."
    state = {"layers.0." + k[len(prefix):]: v for k, v in tensors.items()
             if k.startswith(prefix) and not k[len(prefix):].startswith(("enorm", "hnorm", "eh_proj", "transformer"))}
    state["embed_tokens.weight"] = model.embed_tokens.weight
    state["norm.weight"] = model.norm.weight
    model.load_state_dict(state, strict=True)
    return model


def block_output(model: Step3p7TextModel, x: torch.Tensor) -> torch.Tensor:
    """The layer's output (the model's final norm is not part of the MTP block)."""
    captured = []
    handle = model.layers[0].register_forward_hook(lambda mod, args, out: captured.append(out))
    model(inputs_embeds=x[None])
    handle.remove()
    return captured[0][0]


@torch.no_grad()
def spec_mtp_chain(ckpt, ids: list[int]) -> list[torch.Tensor]:
    """Logits of each MTP depth k (1-based) at positions t = 0..L-1-k, teacher-forced:
    module k at t sees (state_{k-1,t}, embed(x_{t+k})) and predicts x_{t+k+1}."""
    config = json.loads((ckpt / "config.json").read_text())
    tensors = read_fp32_tensors(ckpt)
    target, _ = transformers_text_model(ckpt)
    n = config["num_hidden_layers"]
    pre_norm = []
    handle = target.layers[n - 1].register_forward_hook(lambda mod, args, out: pre_norm.append(out))
    target(input_ids=torch.tensor([ids]))
    handle.remove()
    state, x = pre_norm[0][0], torch.tensor(ids)
    out = []
    for k in range(1, config["num_nextn_predict_layers"] + 1):
        w = lambda name: tensors[f"model.layers.{n + k - 1}.{name}"]  # noqa: E731
        e = zero_centred_norm(tensors["model.embed_tokens.weight"][x[k:]], w("enorm.weight"))
        h = zero_centred_norm(state[: len(ids) - k], w("hnorm.weight"))
        z = block_output(mtp_block(config, tensors, n + k - 1), torch.cat([e, h], -1) @ w("eh_proj.weight").T)
        out.append(zero_centred_norm(z, w("transformer.shared_head.norm.weight"))
                   @ w("transformer.shared_head.output.weight").T)
        state = z
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mtp"), tiny_config(), seed=5)


@torch.no_grad()
def test_mtp_chain_matches_spec_formulas(checkpoint):
    model = load_model(checkpoint)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in LENGTHS]
    expected = [spec_mtp_chain(checkpoint, p.tolist()) for p in prompts]

    hidden = model(torch.cat(prompts), torch.cat([torch.arange(n) for n in LENGTHS]), BatchLayout(LENGTHS))
    states = list(hidden.split(LENGTHS))
    for k in range(1, len(model.mtp) + 1):
        lens = [n - k for n in LENGTHS]
        ids = torch.cat([p[k:] for p in prompts])
        prev = torch.cat([s[: n - k] for s, n in zip(states, LENGTHS)])
        z, logits = model.mtp_forward(k - 1, ids, prev, torch.cat([torch.arange(n) for n in lens]), BatchLayout(lens))
        states = list(z.split(lens))
        for ours, ref in zip(logits.split(lens), (e[k - 1] for e in expected)):
            assert (ours.log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 1e-3
            assert torch.equal(ours.argmax(-1), ref.argmax(-1))  # the greedy drafts agree


def test_mtp_depths_have_distinct_heads(checkpoint):
    """Each module keeps its own shared head; loading must not alias them to lm_head."""
    model = load_model(checkpoint)
    heads = [m.shared_head.output.weight for m in model.mtp] + [model.lm_head.weight]
    assert len(model.mtp) == 3
    for i in range(len(heads)):
        for j in range(i + 1, len(heads)):
            assert not torch.equal(heads[i], heads[j])
