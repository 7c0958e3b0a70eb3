"""LLM.generate equals the transformers reference, token for token, under every engine mechanism:
paged KV, chunked prefill, prefix-cache hits, preemption by recompute, forked n > 1 samples."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import reference_logits
from stepflash import LLM, SamplingParams
from stepflash.engine.kv_cache import KVLayout, kv_bytes_per_block
from checkpoints import write_checkpoint
from stepflash.train.configs import tiny_config

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("engine"), tiny_config(), seed=21)


def mixed_prompts() -> list[list[int]]:
    """Lengths from 1 to several windows (16), shared prefixes and an exact duplicate."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randint(10, 320, (n,), generator=gen).tolist() for n in (1, 3, 16, 17, 40, 70)]
    return base + [base[4][:32] + [11, 12, 13], base[5][:48] + [14], list(base[5])]


def assert_matches_reference(ckpt, prompts: list[list[int]], outputs, greedy: bool = True) -> None:
    """Each generated token's log-probability equals the reference's given the same prefix; for
    greedy runs every token is also the reference's argmax."""
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            tokens = completion.token_ids
            ref = reference_logits(ckpt, prompt + tokens).log_softmax(-1)[len(prompt) - 1:-1]
            for j, token in enumerate(tokens):
                assert abs(completion.logprobs[j][token] - ref[j, token].item()) < 1e-3
            if greedy:
                assert tokens == ref.argmax(-1).tolist()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True, **kw)


def small_budget(ckpt, full_blocks: int, max_num_seqs: int, batched: int, mtp: int = 0) -> int:
    """Bytes for `full_blocks` full-attention blocks plus what the sliding layers reserve (with
    `mtp` MTP modules: their sliding KV, their hidden caches and room for speculative positions)."""
    from stepflash.config import ModelConfig

    cfg = ModelConfig.from_pretrained(ckpt)
    full = [s.index for s in cfg.decoder_layers if not s.sliding_window]
    sliding = [s.index for s in cfg.decoder_layers + cfg.mtp_layers[:mtp] if s.sliding_window]
    sliding_blocks = KVLayout.sliding_blocks(cfg.sliding_window, mtp, 16, max_num_seqs, batched)
    return (full_blocks * kv_bytes_per_block(cfg, full, 16, torch.float32)
            + sliding_blocks * kv_bytes_per_block(cfg, sliding, 16, torch.float32, hidden_levels=mtp))


@pytest.mark.parametrize("mtp", [0, 3])
@pytest.mark.parametrize("setting", ["default", "no-prefix-cache", "chunked-prefill", "preemption"])
def test_greedy_batch_matches_reference(ckpt, setting, mtp):
    kwargs = {
        "default": {},
        "no-prefix-cache": {"enable_prefix_caching": False},
        "chunked-prefill": {"max_num_batched_tokens": 8},
        "preemption": {"kv_cache_bytes": small_budget(ckpt, 8, 8, 16, mtp), "max_num_seqs": 8,
                       "max_num_batched_tokens": 16, "max_model_len": 96},
    }[setting]
    llm = LLM(str(ckpt), mtp=mtp, **kwargs)
    prompts = mixed_prompts()
    outputs = llm.generate(prompts, greedy())
    assert_matches_reference(ckpt, prompts, outputs)
    stats = llm.get_stats()
    assert all(kind["used"] == 0 for kind in stats.kv_blocks.values())  # everything freed
    if setting == "preemption":
        assert stats.num_preemptions > 0
    if setting == "chunked-prefill":  # prompts admitted over several steps find earlier prefixes
        assert stats.prefix_cache_hit_rate > 0
    if setting == "no-prefix-cache":
        assert stats.prefix_cache_hit_rate == 0


def test_decode_steps_moved_on_in_place_equal_packed_ones(ckpt, monkeypatch):
    """A decode step that continues the last one moves that step's inputs on in place
    (runner.DecodeStep) instead of packing them: they must equal what packing the step's chunks gives,
    across block and window boundaries, sequences joining and finishing, and forks (copy-on-write)."""
    llm = LLM(str(ckpt), mtp=0, max_num_seqs=4, block_size=8)
    runner = llm.engine.runner
    decode, moved, packed = runner._decode, [], []

    def checked(chunks, logit_rows):
        last = runner.last_decode
        logits = decode(chunks, logit_rows)
        if runner.last_decode is not last or last is None:
            packed.append(len(chunks))
            return logits
        with torch.inference_mode():
            fresh = runner._unpack(runner._pack("target", 0, chunks, runner.kinds, [logit_rows], [None])).part(0, None)
        x = last.inputs
        for kind in runner.kinds:
            for name in ("slots", "tables", "first_blocks"):
                assert torch.equal(getattr(x.ctx, name)[kind], getattr(fresh.ctx, name)[kind]), (name, kind)
        for name in ("seq_of", "q_pos", "tiles"):
            assert torch.equal(getattr(x.ctx.decode, name), getattr(fresh.ctx.decode, name)), name
        assert torch.equal(x.ids, fresh.ids) and torch.equal(x.positions, fresh.positions)
        assert torch.equal(x.logit_rows, fresh.logit_rows)
        moved.append(len(chunks))
        return logits

    monkeypatch.setattr(runner, "_decode", checked)
    prompts = mixed_prompts()[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, ignore_eos=True) for n in (30, 12, 21)]
    params.append(SamplingParams(n=2, seed=5, max_tokens=25, ignore_eos=True))
    outputs = llm.generate(prompts, params)
    assert_matches_reference(ckpt, prompts[:3], outputs[:3])
    assert len(moved) > len(packed) > 4 and {1, 3, 4} <= set(moved)  # batches of 4, 3 and 1 moved on


def test_plain_greedy_rows_take_each_rows_argmax(ckpt):
    """Greedy rows with nothing to apply first (no bias, penalty, min_tokens, logprobs) take their
    row's argmax without the sampler's processing: the reference's tokens still."""
    prompts = mixed_prompts()[:6]
    outputs = LLM(str(ckpt), mtp=0).generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                      ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        assert tokens == reference_logits(ckpt, prompt + tokens)[len(prompt) - 1:-1].argmax(-1).tolist()


def test_prefix_cache_hit_is_reported_and_exact(ckpt):
    llm = LLM(str(ckpt))
    prompt = mixed_prompts()[5]
    first = llm.generate([prompt], greedy())[0]
    second = llm.generate([prompt[:64] + [99, 98]], greedy())[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == 64  # the 4 full blocks shared with the first prompt
    assert_matches_reference(ckpt, [prompt, prompt[:64] + [99, 98]], [first, second])


def test_prefix_cache_key_collisions_serve_no_wrong_kv(ckpt, monkeypatch):
    """Every block key forced equal (as a crafted collision of a weaker hash would): a prompt whose
    second block repeats a cached first block must not get that block's KV (computed at other
    positions); it hits its real shared prefix only, and its output is the reference's."""
    import stepflash.engine.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "block_key", lambda parent, tokens: b"collide")
    llm = LLM(str(ckpt))
    cached = mixed_prompts()[5]
    repeat = cached[:16] + cached[:16] + [7, 8]
    outputs = [llm.generate([prompt], greedy())[0] for prompt in (cached, repeat)]
    assert outputs[1].metrics.num_cached_tokens == 16
    assert_matches_reference(ckpt, [cached, repeat], outputs)


def test_long_prompt_fits_a_budget_no_full_cache_could(tmp_path):
    """1 full layer in 4, a prompt of 16 windows: served within a budget below what keeping every
    layer's whole history would take."""
    n = 4
    types = ["full_attention"] + ["sliding_attention"] * 3
    config = tiny_config(num_hidden_layers=n, layer_types=types + ["sliding_attention"] * 3,
                         rope_theta=[5e6, 1e4, 1e4, 1e4] + [1e4] * 3, partial_rotary_factors=[0.5, 1, 1, 1] + [1] * 3,
                         moe_layers_enum="2,3", swiglu_limits=[0, 0, 0, 0.5], swiglu_limits_shared=[0, 0, 0, 0.8])
    ckpt = write_checkpoint(tmp_path, config, seed=4)
    prompt = torch.randint(10, 320, (16 * 16,), generator=torch.Generator().manual_seed(0)).tolist()
    per_token_all_layers = 4 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x fp32
    naive = (len(prompt) + MAX_TOKENS) * per_token_all_layers
    budget = small_budget(ckpt, full_blocks=18, max_num_seqs=1, batched=32)
    assert budget < 0.6 * naive
    llm = LLM(str(ckpt), kv_cache_bytes=budget, max_num_seqs=1, max_num_batched_tokens=32, mtp=0)
    out = llm.generate([prompt], greedy())
    assert_matches_reference(ckpt, [prompt], out)


def test_seeded_sampling_is_independent_of_the_batch(ckpt):
    prompts = mixed_prompts()
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = LLM(str(ckpt)).generate([prompts[4]], target)[0].outputs[0].token_ids
    others = [greedy(), SamplingParams(temperature=1.2, max_tokens=7), SamplingParams(temperature=0.5, top_k=5)]
    batch = prompts[:4] + [prompts[4]] + prompts[5:8]
    params = [others[i % 3] for i in range(4)] + [target] + [others[i % 3] for i in range(3)]
    busy = LLM(str(ckpt), max_num_batched_tokens=24).generate(batch, params)[4].outputs[0].token_ids
    assert busy == alone
    unseeded = LLM(str(ckpt)).generate([prompts[4]], SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True))
    assert len(unseeded[0].outputs[0].token_ids) == 12


def test_n_samples_fork_the_prompt_and_stay_exact(ckpt):
    prompt = mixed_prompts()[4]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    llm = LLM(str(ckpt))
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    assert_matches_reference(ckpt, [prompt], [out], greedy=False)  # children write into copied (CoW) blocks
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert all(kind["used"] == 0 for kind in llm.get_stats().kv_blocks.values())


def test_prompt_logprobs_match_reference_across_chunks(ckpt):
    prompt = mixed_prompts()[5]
    out = LLM(str(ckpt), max_num_batched_tokens=8).generate([prompt], SamplingParams(prompt_logprobs=2, max_tokens=1))[0]
    ref = reference_logits(ckpt, prompt).log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j]
        assert abs(entry[prompt[j]] - ref[j - 1, prompt[j]].item()) < 1e-3
        top2 = ref[j - 1].topk(2).indices.tolist()
        assert set(top2) <= set(entry)


MMAPPED_AFTER_ALLOCATING = """
import ctypes, sys, torch
from stepflash.config import EngineConfig
from stepflash.engine.engine import LLMEngine

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2

def mmapped_while_allocated(size):
    x = torch.empty(size, dtype=torch.uint8)
    return mallinfo2().hblkhd

before = mmapped_while_allocated(64 << 20)
LLMEngine(sys.argv[1], EngineConfig(device="cpu", compile="off"))
print(before, mmapped_while_allocated(64 << 20))
"""


def test_a_cpu_engine_keeps_freed_memory_for_its_next_tensors(ckpt):
    """Built on the CPU, the engine has glibc's malloc keep freed memory (runner.keep_freed_memory): a
    64 MB tensor then comes from the heap, not from an mmap of its own whose every page faults when
    first written (2.3x the step time at 16 sequences of 4K tokens). Checked in a fresh process,
    with malloc's own count of mmapped bytes, before and after the engine is built."""
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("the C library is not glibc (>= 2.33)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", MMAPPED_AFTER_ALLOCATING, str(ckpt)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before >= 64 << 20  # glibc's default: a block this large is an mmap of its own
    assert after < 64 << 20
