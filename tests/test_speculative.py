"""MTP speculative decoding is lossless: greedy output equals mtp=0 token for token (under chunked
prefill, prefix hits and preemption too), sampled output has the target's distribution, and a step
whose drafts are rejected leaves the caches as if the drafts had never been seen."""

import math
import random
from pathlib import Path

import pytest
import torch
from test_trainer import SNIPPETS

from stepflash import LLM, SamplingParams
from stepflash.engine.kv_cache import FULL, SLIDING
from stepflash.engine.sampler import RowBatch, verify
from stepflash.engine.sequence import Sequence
from stepflash.engine.scheduler import ScheduledSeq, StepPlan
from checkpoints import write_checkpoint
from reference import reference_logits
from stepflash.train.configs import tiny_config
from stepflash.tokenizer import Tokenizer
from checkpoints import write_byte_level_tokenizer
from stepflash.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained briefly on code snippets: its MTP drafts are often right, not always."""
    tok_dir = tmp_path_factory.mktemp("tok")
    write_byte_level_tokenizer(tok_dir, tiny_config()["vocab_size"])
    tok, rng = Tokenizer.from_pretrained(tok_dir), random.Random(0)
    files = [tok.encode("".join(rng.choice(SNIPPETS) for _ in range(20))) for _ in range(8)]
    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(steps=150, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=10, eval_every=1000,
                      checkpoint_every=1000, log_every=1000)
    train(tiny_config(), tok_dir, files[:6], files[6:], out, cfg)
    return out


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("random"), tiny_config(), seed=5)


def code_prompts(ckpt: Path, count: int = 36) -> list[list[int]]:
    """Prompts of 1 to ~6 windows (window 16), several sharing a long prefix."""
    tok, rng = Tokenizer.from_pretrained(ckpt), random.Random(1)
    text = "".join(rng.choice(SNIPPETS) for _ in range(40))
    ids = tok.encode(text)
    prompts = []
    for i in range(count - 4):
        start, length = rng.randrange(0, len(ids) - 100), rng.choice([1, 2, 5, 15, 16, 17, 33, 60, 95])
        prompts.append(ids[start:start + length])
    shared = ids[:70]
    return prompts + [shared, shared + ids[70:73], shared[:64] + [40, 41], list(shared)]


def greedy(max_tokens: int = 14) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)


_reference: dict[Path, list] = {}


def reference_outputs(ckpt: Path) -> list:
    if ckpt not in _reference:
        _reference[ckpt] = LLM(str(ckpt), mtp=0).generate(code_prompts(ckpt), greedy())
    return _reference[ckpt]


def assert_same_outputs(reference: list, outputs: list) -> None:
    for ref, out in zip(reference, outputs, strict=True):
        a, b = ref.outputs[0], out.outputs[0]
        assert b.token_ids == a.token_ids
        for lp_a, lp_b, token in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(lp_a[token] - lp_b[token]) < 1e-4


@pytest.mark.parametrize("mtp", [1, 2, 3])
@pytest.mark.parametrize("which", ["random", "trained"])
def test_greedy_with_mtp_equals_mtp0(request, which, mtp):
    ckpt = request.getfixturevalue("random_ckpt" if which == "random" else "trained")
    llm = LLM(str(ckpt), mtp=mtp)
    outputs = llm.generate(code_prompts(ckpt), greedy())
    assert_same_outputs(reference_outputs(ckpt), outputs)
    stats = llm.get_stats()
    assert stats.num_mtp == mtp and stats.spec.num_verify_steps > 0
    assert len(stats.spec.drafted_per_position) == mtp
    assert all(kind["used"] == 0 for kind in stats.kv_blocks.values())
    if which == "trained":  # both paths of verification are taken
        assert 0.2 < stats.spec.acceptance_rate < 1.0
        assert stats.spec.mean_accepted_length > 1.3
        per_request = sum(o.metrics.spec.num_accepted_tokens for o in outputs)
        assert per_request == stats.spec.num_accepted_tokens


def test_plain_greedy_with_mtp_equals_mtp0(trained):
    """Greedy rows with nothing to process (no logprobs either) draft by their argmax and verify their
    drafts against the target's argmax alone (the sampler's plain greedy branch, greedy_accepted): the
    same tokens as without MTP, drafts accepted and rejected."""
    llm = LLM(str(trained), mtp=3)
    outputs = llm.generate(code_prompts(trained), SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    for ref, out in zip(reference_outputs(trained), outputs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert 0.2 < llm.get_stats().spec.acceptance_rate < 1.0


@pytest.mark.parametrize("setting", ["chunked-prefill", "preemption", "no-prefix-cache"])
def test_greedy_with_mtp_is_exact_under_engine_pressure(trained, setting):
    from test_engine import small_budget

    kwargs = {
        "chunked-prefill": {"max_num_batched_tokens": 8},
        "preemption": {"kv_cache_bytes": small_budget(trained, 10, 8, 16, mtp=3), "max_num_seqs": 8,
                       "max_num_batched_tokens": 16, "max_model_len": 120},
        "no-prefix-cache": {"enable_prefix_caching": False},
    }[setting]
    llm = LLM(str(trained), mtp=3, **kwargs)
    outputs = llm.generate(code_prompts(trained), greedy())
    assert_same_outputs(reference_outputs(trained), outputs)
    stats = llm.get_stats()
    assert stats.spec.num_accepted_tokens > 0
    if setting == "preemption":
        assert stats.num_preemptions > 0
    if setting == "chunked-prefill":
        assert stats.prefix_cache_hit_rate > 0


def test_prefix_hit_serves_mtp_caches_too(trained):
    """A prompt that hits the prefix cache drafts as well as one computed from scratch: the MTP
    caches of the shared blocks are reused, not left empty."""
    prompt = code_prompts(trained)[-1]
    cold = LLM(str(trained), mtp=3, enable_prefix_caching=False)
    cold_out = cold.generate([prompt], greedy(24))[0]
    warm = LLM(str(trained), mtp=3)
    warm.generate([prompt[:66]], greedy(1))
    warm_out = warm.generate([prompt], greedy(24))[0]
    assert warm_out.metrics.num_cached_tokens == 64
    assert warm_out.outputs[0].token_ids == cold_out.outputs[0].token_ids
    assert warm_out.metrics.spec.accepted_per_position == cold_out.metrics.spec.accepted_per_position


def _cache_view(llm: LLM, seq, mtp_end: int | None = None) -> dict:
    """Everything the caches hold for `seq` at positions still in use: the target's (its layers'
    KV, hidden level 0) up to num_computed, the MTP modules' (their KV, hidden levels 1..) up to
    mtp_end (default: the sequence's mtp_computed)."""
    engine, bs = llm.engine, llm.engine.config.block_size
    runner, tables = engine.runner, seq.blocks
    mtp_end = tables.mtp_computed if mtp_end is None else mtp_end
    first_sliding = max(0, tables.num_computed - engine.model_config.sliding_window + 1)
    mtp_layers = {s.index for s in engine.model_config.mtp_layers}
    view = {}
    for kind, lo in ((FULL, 0), (SLIDING, first_sliding)):
        table = tables.table(kind)
        slots = {end: torch.tensor([table[p // bs] * bs + p % bs for p in range(lo, end)])
                 for end in (tables.num_computed, mtp_end)}
        for layer, (k, v) in runner.caches.items():
            if runner.kind_of[layer] == kind:
                at = slots[mtp_end if layer in mtp_layers else tables.num_computed]
                view[(layer, "k")] = k.flatten(0, 1)[at]
                view[(layer, "v")] = v.flatten(0, 1)[at]
        if kind == SLIDING:
            for level, hidden in enumerate(runner.hidden):
                view[("hidden", level)] = hidden[slots[mtp_end if level else tables.num_computed]]
    return view


def test_rejected_drafts_leave_no_trace(trained):
    """Step until a verify step rejects a draft; the caches then equal those of an engine that
    computed the same accepted tokens as a prompt and never saw a draft (to float rounding): the
    target's at every computed position, the MTP modules' up to where they have caught up."""
    llm = LLM(str(trained), mtp=3, enable_prefix_caching=False)
    engine = llm.engine
    for i, prompt in enumerate(code_prompts(trained)):
        engine.add_request(str(i), prompt, greedy(40))
        (seq,) = engine.scheduler.sequences_of(str(i))
        rejected = False
        while not seq.finished and not rejected:
            drafted, accepted = engine.output.spec.num_draft_tokens, engine.output.spec.num_accepted_tokens
            engine.step()
            spec = engine.output.spec
            rejected = spec.num_draft_tokens - drafted > spec.num_accepted_tokens - accepted
        if rejected and not seq.finished:
            break
    else:
        pytest.fail("no draft was rejected")
    assert seq.num_computed == seq.num_tokens - 1 > seq.blocks.mtp_computed
    fresh = LLM(str(trained), mtp=3, enable_prefix_caching=False)
    fresh.engine.add_request("b", seq.token_ids[:-1], greedy(40))
    (other,) = fresh.engine.scheduler.sequences_of("b")
    fresh.engine.step()  # the prompt in one chunk, then the first token: the same as seq's newest
    assert other.token_ids == seq.token_ids and other.num_computed == seq.num_computed
    catch_up = ScheduledSeq(other, other.num_computed, 0, mtp_start=0)  # its MTP caches, as far as seq's
    fresh.engine.drafter.propose(StepPlan([catch_up], []))
    for kind in (FULL, SLIDING):  # no block kept for rejected positions
        assert len(seq.blocks.table(kind)) == len(other.blocks.table(kind))
    assert seq.blocks.hashes == other.blocks.hashes
    ours, theirs = _cache_view(llm, seq), _cache_view(fresh, other, mtp_end=seq.blocks.mtp_computed)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def _chi_square_bound(df: int, z: float = 3.29) -> float:
    """Upper 0.05% point of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def penalised_reference_logits(ckpt: Path, history: list[int], prompt_len: int, params: SamplingParams) -> torch.Tensor:
    """The reference model's logits after the last token of `history`, penalised as vLLM defines it,
    from the whole history: repetition over every token seen, frequency and presence over the output."""
    logits = reference_logits(ckpt, history)[-1]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[history] = True
    rep = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    counts = torch.bincount(torch.tensor(history[prompt_len:], dtype=torch.long), minlength=len(logits)).float()
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def test_penalties_count_every_step_as_the_reference_does(trained):
    """Penalties read token counts the engine keeps on the device across steps, adding each step's
    new tokens only (engine/sampler.py TokenCounts): over 40 greedy tokens, with MTP-3 (accepted
    drafts counted too) and without, every token is the reference model's argmax after penalties
    computed here from the whole history; a sequence without penalties in the same batch is
    untouched. The penalties do change the output here (else the test would show nothing)."""
    prompts = code_prompts(trained)[-2:]
    penalised = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.4, presence_penalty=0.3)
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = {mtp: [o.outputs[0].token_ids for o in LLM(str(trained), mtp=mtp).generate(prompts, [penalised, plain])]
            for mtp in (0, 3)}
    assert outs[3] == outs[0]
    unpenalised = [o.outputs[0].token_ids for o in LLM(str(trained), mtp=0).generate(prompts, plain)]
    assert outs[0][0] != unpenalised[0] and outs[0][1] == unpenalised[1]
    history = list(prompts[0])
    for token in outs[0][0]:
        logits = penalised_reference_logits(trained, history, len(prompts[0]), penalised)
        assert logits[token] >= logits.max() - 1e-4
        history.append(token)


@pytest.mark.parametrize("top_k", [-1, 3])
def test_rejection_sampling_emits_the_target_distribution(top_k):
    """Per emitted position, tokens follow the target p exactly, whatever the drafts' q (here far
    from p): accepted drafts and residual draws together reproduce p."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],
                             [0.0, 0.0, 2.5, 1.0, 0.5, 0.0],
                             [1.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    q = torch.tensor([[0.05, 0.1, 0.2, 0.3, 0.3, 0.05], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    params = SamplingParams(temperature=1.0, top_k=top_k)
    kept = p_logits if top_k < 0 else p_logits.masked_fill(p_logits < p_logits.topk(top_k).values[:, -1:], -math.inf)
    expected = kept.softmax(-1)
    trials = 12000  # one sequence per trial, all verified in one batch
    gen = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q[r], trials, replacement=True, generator=gen) for r in range(2)], 1)
    seqs = [Sequence(seed, "r", 0, [0], 1, params, seed) for seed in range(trials)]
    batch = RowBatch(seqs, [i for i in range(trials) for _ in range(3)], [0, 1, 2] * trials, [], torch.device("cpu"))
    tokens, accepted = verify(batch, p_logits.expand(trials, 3, 6), torch.full((trials,), 2), drafts,
                              q.expand(trials, 2, 6))
    counts = torch.zeros(3, 6)
    for row, n in zip(tokens.tolist(), accepted.tolist()):
        for position, token in enumerate(row[:n + 1]):
            counts[position, token] += 1
    assert (tokens[:, :2] == drafts).long().cumprod(1).sum(1).ge(accepted).all()  # what it kept are the drafts
    assert counts[1].sum() > 0.2 * trials and counts[2].sum() > 0.05 * trials  # every path is taken
    for position in range(3):
        stat, df = _goodness_of_fit(counts[position], expected[position])
        assert stat < _chi_square_bound(df), (position, counts[position], expected[position])


def test_sampled_tokens_have_the_same_distribution_with_and_without_mtp(trained):
    """Two-sample chi-square at each of the first 4 output positions: 400 seeded samples with mtp=3
    against 400 with mtp=0."""
    prompt = code_prompts(trained)[5]
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=4, ignore_eos=True, seed=s) for s in range(400)]
    runs = {}
    for mtp in (0, 3):
        llm = LLM(str(trained), mtp=mtp)
        runs[mtp] = [o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params)]
        if mtp:
            assert llm.get_stats().spec.acceptance_rate > 0.2
    for position in range(4):
        a = [t[position] for t in runs[0]]
        b = [t[position] for t in runs[3]]
        tokens = sorted(set(a) | set(b))
        table = torch.tensor([[a.count(t), b.count(t)] for t in tokens], dtype=torch.float64)
        small = table.sum(1) < 10  # pool rare tokens into one cell
        if small.any():
            table = torch.cat([table[~small], table[small].sum(0, keepdim=True)])
        if len(table) < 2:
            continue
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
        stat = float(((table - expected) ** 2 / expected).sum())
        assert stat < _chi_square_bound(len(table) - 1), (position, table)


def test_a_sampled_row_without_drafts_beside_greedy_drafts(trained, monkeypatch):
    """A step where greedy sequences verify drafts while a sampled one verifies none (its prefill ends
    in that step, or one token is left to it), so no draft distribution exists: the step runs (it
    failed, and with it every running request, under load), and the sampled request emits what it
    emits alone (its draws depend on its seed and positions only)."""
    prompts = code_prompts(trained)
    sampled = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, seed=7) for n in (12, 1)]
    llm = LLM(str(trained), mtp=3)
    alone = [llm.generate([prompts[6]], p)[0].outputs[0].token_ids for p in sampled]
    engine, outputs, mixed = llm.engine, {}, []

    def noting(batch, logits, num_drafts, drafts, q, top=None):  # drafts to verify, a sampled row, no draft distribution
        mixed.append(num_drafts is not None and batch.any_sampled and (q is None or not q.any()))
        return verify(batch, logits, num_drafts, drafts, q, top)

    monkeypatch.setattr("stepflash.engine.sampler.verify", noting)
    for i in range(3):
        engine.add_request(f"greedy-{i}", prompts[i], greedy(max_tokens=30))
    for _ in range(3):
        engine.step()
    for j, p in enumerate(sampled):  # the greedy ones decode with drafts by now
        engine.add_request(f"sampled-{j}", prompts[6], p)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    assert any(mixed)
    assert [outputs["sampled-0"], outputs["sampled-1"]] == alone


def test_mtp_above_the_checkpoint_is_refused(trained):
    with pytest.raises(ValueError, match="MTP modules"):
        LLM(str(trained), mtp=4)


def test_default_mtp_is_what_the_checkpoint_holds(tmp_path):
    """A config naming 3 MTP modules whose weights were left out (as some releases do) serves with
    mtp=0 by default; asking for MTP there is a clear error."""
    ckpt = write_checkpoint(tmp_path, tiny_config(), with_mtp=False)
    llm = LLM(str(ckpt))
    assert llm.get_stats().num_mtp == 0
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="has 0 MTP modules"):
        LLM(str(ckpt), mtp=1)
