"""Compiled steps: with compile on, decode, verify and MTP drafting steps run through torch.compile
(engine/runner.py CompiledStep), compiled at start (LLMEngine._compile_steps). The compiled engine's
tokens and log-probabilities equal the transformers reference and the eager engine's, over ragged
batches whose steps change shape (rows, sequences, table widths) as requests arrive and finish.
(conftest.py turns torch.compile off for the suite: on again here.)"""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.cpp_builder import get_cpp_compiler
from torch._inductor.exc import InvalidCxxCompiler

from stepflash import LLM, SamplingParams
from stepflash.cli import build_parser
from stepflash.config import EngineConfig
from stepflash.engine import sampler as sampling
from stepflash.engine.engine import LLMEngine, _use_compile
from stepflash.engine.runner import Compiled
from stepflash.engine.sampler import _plain_counts, plain_verify
from stepflash.kernels.paged_attention import paged_attention_ref
from checkpoints import write_checkpoint
from scripted import write_scripted_checkpoint
from stepflash.train.configs import tiny_config
from test_engine import MAX_TOKENS, assert_matches_reference, greedy, mixed_prompts
from test_sampler import plain_inputs, plain_rows


try:
    get_cpp_compiler()
except InvalidCxxCompiler:
    pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _compile_enabled(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "disable", False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two layers (full dense, sliding MoE) and two MTP modules: what the engine compiles, in less
    time than the five-layer model takes."""
    return write_checkpoint(tmp_path_factory.mktemp("compiled"), tiny_config(n=2, n_mtp=2), seed=21)


def test_compiled_steps_match_the_reference_and_the_eager_engine(ckpt, mtp=2):
    prompts = mixed_prompts()
    compiled = LLM(str(ckpt), mtp=mtp, compile="on")
    with torch.compiler.set_stance("fail_on_recompile"):  # ragged batches: nothing compiled after the start
        outputs = compiled.generate(prompts, greedy())
    steps = compiled.engine.runner.compiled  # the target, every MTP module and plain drafting
    assert len(steps) == 2 + mtp and all(step.compiled is not None for step in steps)  # none fell back
    assert_matches_reference(ckpt, prompts, outputs)
    eager = LLM(str(ckpt), mtp=mtp, compile="off")
    assert eager.engine.runner.compiled == ()
    for a, b in zip(eager.generate(prompts, greedy()), outputs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[t] - lb[t]) < 1e-4
    assert compiled.get_stats().spec == eager.get_stats().spec  # each MTP module drafted what it does eagerly


def test_drafting_in_one_call_drafts_what_a_call_per_module_does(ckpt, monkeypatch):
    """Plain drafting (greedy, or sampled at a temperature) runs every MTP module in one compiled call,
    each module's drafts fed to the next inside it (runner.plain_drafts): step by step, the same
    drafts (and distributions) as a compiled call per module, and the same tokens."""
    settings = [dict(temperature=0.0), dict(temperature=1.0)]
    runs = {}
    for one_call in (True, False):
        llm = LLM(str(ckpt), mtp=2, compile="on")
        drafter, runner = llm.engine.drafter, llm.engine.runner
        propose, plain_drafts = drafter.propose, runner.plain_drafts
        drafted, fused = [], []

        def recorded(plan, propose=propose, drafted=drafted):
            drafts = propose(plan)
            drafted.append((drafts.tokens.tolist(), drafts.probs))
            return drafts

        def counted(rows, sampled, plain_drafts=plain_drafts, fused=fused, one_call=one_call):
            out = plain_drafts(rows, sampled) if one_call else None
            fused.append(out is not None)
            return out

        monkeypatch.setattr(drafter, "propose", recorded)
        monkeypatch.setattr(runner, "plain_drafts", counted)
        for i, setting in enumerate(settings):
            drafted.clear()
            fused.clear()
            params = SamplingParams(**setting, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True)
            outputs = llm.generate(mixed_prompts(), params)
            runs[one_call, i] = (list(drafted), [o.outputs[0].token_ids for o in outputs], sum(fused))
    for i, setting in enumerate(settings):
        (drafted, tokens, fused), (per_module, per_module_tokens, _) = runs[True, i], runs[False, i]
        assert fused >= len(drafted) // 2  # most steps drafted in one call (not those catching up a prefill)
        assert [d for d, _ in drafted] == [d for d, _ in per_module] and tokens == per_module_tokens
        dists = [(q, q_per_module) for (_, q), (_, q_per_module) in zip(drafted, per_module)]
        assert all((q is None) == (other is None) for q, other in dists)  # none where no sequence drafts
        assert any(q is not None for q, _ in dists) == (setting["temperature"] > 0)
        for q, other in dists:
            if q is not None:
                torch.testing.assert_close(q, other)


def test_every_step_kind_is_compiled_at_start(tmp_path):
    """Greedy and sampled requests, alone and together, compile nothing more after the engine's start
    (torch.compile's fail_on_recompile stance raises where a step would compile). A scripted
    checkpoint, whose MTP heads are its target's, so that every draft is accepted and a request is
    done in few steps: the start's requests must still reach each step kind (drafting that samples,
    in one call, through top-k / top-p / min-p too, or, with a penalty, a call per MTP module, after
    the long catch-up of a prompt)."""
    write_scripted_checkpoint(tmp_path, ["x", "y"], config=tiny_config(n=2, n_mtp=2))
    llm = LLM(str(tmp_path), mtp=2, compile="on")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    with torch.compiler.set_stance("fail_on_recompile"):
        for settings in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_p=0.9),
                         dict(temperature=1.0, min_p=0.1), dict(temperature=1.0, presence_penalty=0.5)):
            for batch in (prompts[:1], prompts):
                llm.generate(batch, SamplingParams(**settings, seed=0, max_tokens=12, ignore_eos=True))
    assert llm.get_stats().spec.mean_accepted_length > 2.5  # the drafts were accepted, as the test needs


def test_compiled_plain_verify_is_the_eager_one_in_four_graphs():
    """The sampler's compiled plain_verify gives the tokens and accepted counts of the eager function
    for one sequence or several, one draft or three, and none, with top-k / top-p / min-p or without,
    from four graphs (drafts or none, filters or none: no variant per count of sequences or drafts,
    which the engine's start cannot all reach)."""
    compiled = Compiled(plain_verify, _plain_counts)
    cases = [[3, 1, 2, 0], [0, 0], [1], [2, 2], [3], [0], [1, 1, 0]]
    for i, (filtered, num_drafts) in enumerate([(f, n) for f in (False, True) for n in cases]):
        first = i % len(cases) < 2  # a graph of each kind, then no more
        with torch.compiler.set_stance("default" if first else "fail_on_recompile"):
            for seed in range(3):
                seqs, logits, counts, drafts, q = plain_rows(seed, num_drafts, vocab=4096, filtered=filtered)
                if logits.shape[1] == 1:
                    counts = drafts = q = None
                args = (logits, *plain_inputs(seqs), counts, drafts, q)
                got, want = compiled(*args), plain_verify(*args)
                assert torch.equal(got[0], want[0]) and (got[1] is want[1] is None or torch.equal(got[1], want[1]))
    assert compiled.compiled is not None  # it did not fall back to eager


def test_compiled_argmax_takes_the_first_of_tied_maxima():
    """Compiled steps give the greedy token as their graph's argmax: on ties the first index, as the
    eager sampler's (and transformers') argmax."""
    wide = torch.randint(0, 3, (64, 4096), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(torch.compile(lambda x: x.argmax(-1), dynamic=True)(wide), sampling.argmax(wide))


def test_a_failed_compile_warns_and_runs_the_step_eagerly(ckpt):
    llm = LLM(str(ckpt), mtp=1, compile="on")
    steps = [*llm.engine.runner.compiled, llm.engine.sampler.plain_verify]  # the target's, the MTP module's,
    # plain drafting's and the plain sampled verify's

    def no_toolchain(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    for step in steps:
        step.compiled = torch.compile(step.fn, backend=no_toolchain, dynamic=True)
    prompts = mixed_prompts()[:4]
    with pytest.warns(UserWarning, match="(?s)torch.compile failed.*no C\\+\\+ compiler here"):
        outputs = llm.generate(prompts, greedy())
        penalised = SamplingParams(temperature=1.0, repetition_penalty=1.1, seed=0, max_tokens=8, ignore_eos=True)
        llm.generate(prompts[:1], penalised)  # a drafting call per MTP module
        llm.generate(prompts[:1], SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True))
    assert [step.compiled for step in steps] == [None] * 4
    assert_matches_reference(ckpt, prompts, outputs)


def test_compile_settings_are_checked(ckpt, monkeypatch):
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        EngineConfig(compile="always")
    with pytest.raises(ValueError, match="not with the Triton kernels"):
        LLMEngine(ckpt, EngineConfig(compile="on", kernels="triton"))
    assert EngineConfig().compile == "auto"
    parser = build_parser()  # the CLI's one-off jobs would spend longer compiling than generating
    assert parser.parse_args(["generate", "x"]).compile == parser.parse_args(["chat"]).compile == "off"
    assert parser.parse_args(["serve"]).compile == "auto"
    cpu = torch.device("cpu")
    assert not _use_compile("auto", kernels=False, device=cpu, ranks=1)  # TORCH_COMPILE_DISABLE=1 (conftest.py)
    assert not LLMEngine(ckpt, EngineConfig()).runner.compiled
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    assert _use_compile("auto", kernels=False, device=cpu, ranks=1)  # the CPU's PyTorch path, a C++ compiler here
    assert not _use_compile("auto", kernels=False, device=cpu, ranks=2)
    assert not _use_compile("auto", kernels=True, device=cpu, ranks=1)


def test_two_engines_of_different_models_in_one_process(ckpt, tmp_path):
    """Compiled code is found by the step function's code, which every runner shares: an engine of
    another shape in the same process must compile its own, not run the first engine's. Also: no
    compiling after start, with MTP (verify and drafting steps) and without, and the compiled
    single-row decode step against the reference, and those of 5 to 8 rows. (The first engine is
    the first test's: inductor's cache still holds its compiled code, so it builds in seconds, not
    a minute.)"""
    other = write_checkpoint(tmp_path, tiny_config(n=2, n_mtp=0, hidden_size=48), seed=5)
    prompts = mixed_prompts()[1:3]
    first = LLM(str(ckpt), mtp=2, compile="on")
    graphs = counters["stats"]["unique_graphs"]
    first.generate(prompts, greedy())
    first.generate(mixed_prompts() * 2, greedy())  # 18 sequences at once: the MoE's grouped GEMM
    assert counters["stats"]["unique_graphs"] == graphs  # every variant was compiled at start
    second = LLM(str(other), mtp=0, compile="on")
    graphs = counters["stats"]["unique_graphs"]
    assert_matches_reference(other, prompts, second.generate(prompts, greedy()))
    assert_matches_reference(other, prompts[:1], second.generate(prompts[:1], greedy()))  # decode steps of one row
    eight = mixed_prompts()[:8]  # steps of 5 to 8 rows: the MoE twin runs every token through every expert
    outputs = second.generate(eight, greedy())
    assert_matches_reference(other, eight, outputs)
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)  # tokens: the steps' argmax
    assert [o.outputs[0].token_ids for o in second.generate(eight, plain)] == [o.outputs[0].token_ids for o in outputs]
    assert counters["stats"]["unique_graphs"] == graphs
    assert_matches_reference(ckpt, prompts, first.generate(prompts, greedy()))


def test_compiled_moe_twin_gathers_bf16_experts():
    """Compiled, the MoE twin gathers the bf16 experts of up to EVERY_EXPERT_MAX_ROWS / E tokens
    (12 tokens pick more pairs than there are experts: with fp32 weights, every expert) and upcasts
    them: equal to the loop over the upcast weights, 3 tokens and 12 in one graph (a step of either
    size must not compile the whole model again)."""
    from stepflash.kernels.moe import fused_moe_ref
    from test_kernels import moe_loop

    gen = torch.Generator().manual_seed(3)
    experts, hidden, inter, top_k = 8, 64, 32, 2
    stored = [torch.randn(experts, *shape, generator=gen).div(8).bfloat16().mT.contiguous().mT
              for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
    compiled = torch.compile(fused_moe_ref, dynamic=True)
    for tokens in (3, 12):
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        # not from the caches on disk: a graph found there brings back the guards of the code that
        # compiled it (an older fused_moe_ref's among them)
        with torch.compiler.set_stance("fail_on_recompile" if tokens == 12 else "default"), \
                torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            out = compiled(x, *stored, ids, weights, 0.0)
        torch.testing.assert_close(out, moe_loop(x, *(w.float() for w in stored), ids, weights, 0.0),
                                   atol=1e-5, rtol=1e-5)


def test_compiled_paged_attention_twin_with_an_unbacked_tile_count():
    """Compiled steps leave the count of attention tiles unbacked (one graph for one tile and for
    many, no padding tile): the compiled twin equals the eager one for one tile and for several,
    ragged ones included (inductor once got a reshape over that count wrong)."""
    gen = torch.Generator().manual_seed(3)
    blocks, block_size, kv_heads, heads, dim, rows = 12, 4, 2, 6, 16, 4
    k_cache, v_cache = (torch.randn(blocks, block_size, kv_heads, dim, generator=gen) for _ in range(2))
    tables = torch.randperm(blocks, generator=gen)[:8].view(2, 4).int()

    def attention(q, seq_of, q_pos, tiles, gate):
        return paged_attention_ref(q, k_cache, v_cache, tables, seq_of, q_pos, 6, gate, tiles=tiles, tile_rows=rows,
                                   first_block=torch.zeros(2, dtype=torch.int32))

    compiled = torch.compile(attention, dynamic=True)
    for tiles in ([[0, 4]], [[0, 4], [4, 4]], [[0, 4], [4, 1]], [[0, 3]]):
        n = sum(count for _, count in tiles)
        seq_of = torch.tensor([i // rows for i in range(n)], dtype=torch.int32)
        q_pos = torch.tensor([9 + i % rows for i in range(n)], dtype=torch.int32)
        q, gate = torch.randn(n, heads, dim, generator=gen), torch.randn(n, heads, generator=gen)
        tiles = torch.tensor(tiles, dtype=torch.int32)
        torch._dynamo.decorators.mark_unbacked(tiles, 0)
        torch.testing.assert_close(compiled(q, seq_of, q_pos, tiles, gate), attention(q, seq_of, q_pos, tiles, gate))
