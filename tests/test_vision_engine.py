"""The engine with images on a random tiny Step 3.7 checkpoint, against transformers'
Step3p7ForConditionalGeneration (fp32): prompt logprobs through chunked prefill cutting images,
greedy generation with MTP 0 and 3, and the prefix cache keyed by image content."""

from pathlib import Path

import pytest
import torch

from checkpoints import write_vision_checkpoint
from stepflash import LLM, SamplingParams
from stepflash.multimodal import IMAGE_TOKEN

TOL = 1e-3


def _image(width: int, height: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


WIDE, SQUARE, SMALL = _image(200, 100, 1), _image(112, 112, 2), _image(60, 150, 3)  # 8 crops; none; 2 crops
PROMPTS = [  # (text, images): 0, 1 and 2 images
    ("Plain text, no image at all here.", []),
    (f"Describe {IMAGE_TOKEN} in a short sentence.", [WIDE]),
    (f"Compare {IMAGE_TOKEN} with {IMAGE_TOKEN}, please.", [SQUARE, SMALL]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_vision_checkpoint(tmp_path_factory.mktemp("vlm"), seed=2)


def _reference_inputs(llm: LLM, text: str, images: list[torch.Tensor]) -> dict:
    """transformers' inputs for a prompt: our ids and pixels, which test_multimodal.py checks are
    its processor's."""
    request = llm.engine.make_request("ref", text, SamplingParams(), images)
    inputs = {"input_ids": torch.tensor([request.prompt_token_ids])}
    if request.images:
        views = [im.image for im in request.images]
        inputs["pixel_values"] = torch.stack([v.pixels for v in views])
        inputs["num_local_patches"] = [v.num_crops for v in views]
        if any(v.num_crops for v in views):
            inputs["pixel_values_local"] = torch.cat([v.crops for v in views])
    return inputs


@torch.no_grad()
def test_prompt_logprobs_match_transformers_through_chunks(checkpoint) -> None:
    from reference import transformers_vision_lm

    ref = transformers_vision_lm(checkpoint)
    # chunks of 16 tokens cut through every image
    llm = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=0, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in PROMPTS],
                        SamplingParams(prompt_logprobs=20, max_tokens=1))
    for (text, images), out in zip(PROMPTS, outs):
        inputs = _reference_inputs(llm, text, images)
        ids = inputs["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        expected = ref(**inputs).logits[0].log_softmax(-1)  # row j scores the token at j + 1
        diffs = [abs(lp - expected[j - 1, token].item())  # the prompt token and the top 20 at every position
                 for j in range(1, len(ids)) for token, lp in out.prompt_logprobs[j].items()]
        assert len(diffs) >= 20 * (len(ids) - 1) and max(diffs) < TOL


@torch.no_grad()
def _reference_greedy(ref, inputs: dict, n: int) -> list[int]:
    """transformers' greedy tokens, each from a full forward over the sequence so far (its cached
    `generate` disagrees with its own full forward on these tiny checkpoints, text prompts included)."""
    ids, rest = inputs["input_ids"], {k: v for k, v in inputs.items() if k != "input_ids"}
    for _ in range(n):
        ids = torch.cat([ids, ref(input_ids=ids, **rest).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def reference_greedy(checkpoint) -> list[list[int]]:
    from reference import transformers_vision_lm

    llm = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=0)
    return [_reference_greedy(transformers_vision_lm(checkpoint), _reference_inputs(llm, t, ims), 10)
            for t, ims in PROMPTS]


@pytest.mark.parametrize("mtp", [0, 3])
def test_greedy_matches_transformers(checkpoint, reference_greedy, mtp) -> None:
    """All three prompts batched, chunked prefill through the images; MTP-3 drafts over image prompts."""
    llm = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=mtp, max_num_batched_tokens=32)
    model, fed = llm.engine.model, []  # the image rows each MTP module got as features
    mtp_hidden = model.mtp_hidden

    def recording(depth, ids, prev, positions, ctx=None, embeds=None):
        fed.append((depth, 0 if embeds is None else len(embeds[0])))
        return mtp_hidden(depth, ids, prev, positions, ctx, embeds)

    model.mtp_hidden = recording
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in PROMPTS], params)
    assert [out.outputs[0].token_ids for out in outs] == reference_greedy
    if mtp:
        assert llm.get_stats().spec.num_draft_tokens > 0
        image_rows = sum(len(im.rows) for t, ims in PROMPTS for im in llm.engine.make_request("x", t, None, ims).images)
        for depth in range(mtp):  # every MTP module saw every image row as its feature, once
            assert sum(n for d, n in fed if d == depth) == image_rows


@pytest.mark.parametrize("mtp", [0, 3])
def test_preempted_image_prompts_recompute(checkpoint, reference_greedy, mtp) -> None:
    """A KV pool too small for the three prompts at once: sequences are preempted and recomputed
    (images included), and the output stays the reference's."""
    from test_engine import small_budget

    llm = LLM(str(checkpoint), mtp=mtp, max_model_len=64, max_num_seqs=3, max_num_batched_tokens=16,
              kv_cache_bytes=small_budget(checkpoint, 6, 3, 16, mtp))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in PROMPTS], params)
    assert [out.outputs[0].token_ids for out in outs] == reference_greedy
    stats = llm.get_stats()
    assert stats.num_preemptions > 0
    assert all(kind["used"] == 0 for kind in stats.kv_blocks.values())


def test_prefix_cache_keyed_by_image_content(checkpoint) -> None:
    """The same image again hits the cache past its placeholders; another image of the same size at
    the same place misses from its first block on, and is still answered right."""
    llm = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=1, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    text = f"Hi {IMAGE_TOKEN} what is it?"
    fresh = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=0, block_size=4, enable_prefix_caching=False)
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": WIDE}}, params)[0]
    same = llm.generate({"prompt": text, "multi_modal_data": {"image": WIDE.clone()}}, params)[0]
    other_image = _image(200, 100, 9)
    other = llm.generate({"prompt": text, "multi_modal_data": {"image": other_image}}, params)[0]
    image_start = llm.engine.make_request("x", text, params, [WIDE]).images[0].start
    assert first.metrics.num_cached_tokens == 0
    assert same.metrics.num_cached_tokens == (len(same.prompt_token_ids) - 1) // 4 * 4
    assert other.metrics.num_cached_tokens == image_start // 4 * 4  # the text before the image only
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    expected = fresh.generate({"prompt": text, "multi_modal_data": {"image": other_image}}, params)[0]
    assert other.outputs[0].token_ids == expected.outputs[0].token_ids
    assert other.outputs[0].token_ids != first.outputs[0].token_ids


def test_image_errors_leave_the_engine_working(checkpoint) -> None:
    llm = LLM(str(checkpoint), max_model_len=256, max_num_seqs=4, mtp=0, limit_images_per_prompt=2)
    with pytest.raises(ValueError, match="1 image placeholders"):
        llm.generate({"prompt": f"{IMAGE_TOKEN}", "multi_modal_data": {"image": [WIDE, WIDE]}})
    with pytest.raises(ValueError, match="limit_images_per_prompt"):
        llm.generate({"prompt": IMAGE_TOKEN * 3, "multi_modal_data": {"image": [WIDE] * 3}})
    with pytest.raises(ValueError, match="uint8"):
        llm.generate({"prompt": IMAGE_TOKEN, "multi_modal_data": {"image": WIDE.float()}})
    out = llm.generate({"prompt": IMAGE_TOKEN, "multi_modal_data": {"image": WIDE}}, SamplingParams(max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2
