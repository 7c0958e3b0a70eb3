"""Full-sequence logits of stepflash's model equal transformers' step3p5 decoder (fp32, |dlogp| < 1e-3)."""

import pytest
import torch

from reference import reference_logits
from stepflash.model.attention import BatchLayout
from stepflash.model.loader import load_model
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config

TOL = 1e-3
SEQ_LENS = [70, 37, 5]  # the longest spans 4+ sliding windows of 16 and passes the llama3 original length 64


def _variant_config() -> dict:
    """Other spellings of the same fields: per-layer lists without MTP entries, list-form
    moe_layers_enum, scalar partial factor lists, no rope scaling, a different layer pattern."""
    n = 6
    types = ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(n)]
    return tiny_config(
        num_hidden_layers=n, layer_types=types, rope_theta=[1e4 if t == "sliding_attention" else 2e5 for t in types],
        partial_rotary_factors=[0.25 if t == "full_attention" else 1.0 for t in types], rope_scaling=None,
        moe_layers_enum=[1, 2, 4, 5], swiglu_limits=[0, 0.6, 0, 0, None, 0.4], swiglu_limits_shared=[0.9] + [0] * 5,
        num_attention_heads=2, num_nextn_predict_layers=1, moe_num_experts=6, moe_top_k=3, sliding_window=8,
    )


CASES = {
    "fp32": dict(),
    "bf16-sharded": dict(dtype=torch.bfloat16, num_shards=3),
    "fp8-blocks": dict(fp8_block=(16, 24)),
    "variant": dict(config=_variant_config(), seed=3),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in SEQ_LENS]


def _max_logprob_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


@torch.no_grad()
def test_flat_batch_matches_transformers(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    prompts = _prompts(model.config.vocab_size)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    logits = model.compute_logits(model(ids, positions, BatchLayout([len(p) for p in prompts])))
    for prompt, ours in zip(prompts, logits.split(SEQ_LENS)):
        ref = reference_logits(checkpoint, prompt)
        assert _max_logprob_diff(ours, ref) < TOL


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("features"))


def test_config_exercises_rope_scaling_and_clamps(fp32_checkpoint):
    """The oracle comparison above only proves these features if turning them off changes the logits."""
    prompt = _prompts(320)[0]
    base = reference_logits(fp32_checkpoint, prompt)
    no_scaling = reference_logits(fp32_checkpoint, prompt, {"rope_scaling": None})
    no_clamps = reference_logits(fp32_checkpoint, prompt, {"swiglu_limits": None, "swiglu_limits_shared": None})
    assert _max_logprob_diff(base, no_scaling) > 1e-2
    assert _max_logprob_diff(base, no_clamps) > 1e-2


@torch.no_grad()
def test_router_bias_changes_selection_not_weights(fp32_checkpoint):
    model = load_model(fp32_checkpoint)
    inputs = []
    hooks = [layer.moe.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
             for layer in model.model.layers if layer.spec.is_moe]
    prompt = torch.tensor(_prompts(320)[0])
    model(prompt, torch.arange(len(prompt)))
    for h in hooks:
        h.remove()
    changed = 0
    for moe, h in inputs:
        ids, weights = moe.route(h)
        bias = moe.router_bias
        moe.router_bias = None
        ids_nobias, _ = moe.route(h)
        moe.router_bias = bias
        changed += (ids.sort(-1).values != ids_nobias.sort(-1).values).any(-1).sum().item()
        # weights come from the unbiased sigmoid scores, renormalised, times the scaling factor
        scores = torch.sigmoid(h.float() @ moe.gate.weight.float().T).gather(1, ids)
        torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * 3.0)
    assert changed > 0
