"""Sampler: logit filters, penalties, greedy / seeded sampling, logprobs; SamplingParams validation."""

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepflash.engine import draws, sampler as sampling
from stepflash.engine.sampler import (Readback, RowBatch, TokenCounts, draft_tokens, plain_verify, top_logprobs,
                                      verify)
from stepflash.engine.runner import Upload, draw_settings
from stepflash.engine.sequence import Sequence, Status
from stepflash.sampling import SamplingParams

EOS = 1
MakeSeq = Callable[..., Sequence]


@pytest.fixture
def make_seq() -> MakeSeq:
    def make(prompt: Seq[int], output: Seq[int] = (), params: SamplingParams | None = None,
             seed: int = 0) -> Sequence:
        return Sequence(0, "r", 0, [*prompt, *output], len(prompt), params or SamplingParams(), seed)

    return make


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The batched filter on one row."""
    row = lambda x: torch.tensor([x])  # noqa: E731
    return draws.filter_logits(logits[None], row(max(top_k, 0)), row(top_p), row(min_p))[0]


def batch_of(seqs: list[Sequence], vocab_size: int) -> RowBatch:
    return RowBatch(seqs, list(range(len(seqs))), [0] * len(seqs), [EOS], torch.device("cpu"),
                    counts=TokenCounts(vocab_size, torch.device("cpu")))


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    return batch_of(seqs, logits.shape[-1]).process(logits, None)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """One token per row (a verify step without drafts), with the requested logprobs."""
    no_drafts = torch.zeros(len(seqs), dtype=torch.long)
    tokens, _ = verify(batch_of(seqs, logits.shape[-1]), logits[:, None], no_drafts, None, None)
    chosen, ids, values = top_logprobs(logits.log_softmax(-1), tokens[:, 0], 20)
    out = []
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs
        lp = None if k is None else {**dict(zip(ids[i, :k].tolist(), values[i, :k].tolist())),
                                     int(tokens[i, 0]): float(chosen[i])}
        out.append(lp)
    return tokens[:, 0].tolist(), out


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def empirical(counts: list[int]) -> torch.Tensor:
    c = torch.tensor(counts, dtype=torch.float64)
    return c / c.sum()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


HAND = torch.tensor([0.15, 0.5, 0.05, 0.3])  # shuffled so position is not rank


# -- filter_logits --------------------------------------------------------------------------------

distinct_logits = st.lists(st.integers(-400, 400), min_size=2, max_size=24, unique=True).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32) / 40)


@settings(max_examples=60, deadline=None)
@given(logits=distinct_logits, data=st.data())
def test_top_k_keeps_exactly_the_k_largest(logits: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, logits.numel()))
    out = filter_logits(logits, k, 1.0, 0.0)
    assert kept(out) == set(logits.topk(k).indices.tolist())
    mask = torch.isfinite(out)
    assert torch.equal(out[mask], logits[mask])  # survivors untouched


def test_top_k_ties_and_off() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert kept(filter_logits(logits, 2, 1.0, 0.0)) == {1, 2, 4}  # all tied at the k-th value
    assert kept(filter_logits(logits, 1, 1.0, 0.0)) == {1, 2, 4}
    assert kept(filter_logits(logits, 4, 1.0, 0.0)) == {0, 1, 2, 4}
    for k in (-1, 5, 9):
        assert torch.equal(filter_logits(logits, k, 1.0, 0.0), logits)
    wide = torch.tensor([float("-inf"), -1e30, 5.0, 1e30, 3.0, -2.0, -0.0])  # the whole range of fp32 values
    for k, expected in ((1, {3}), (2, {2, 3}), (3, {2, 3, 4}), (4, {2, 3, 4, 6}), (5, {2, 3, 4, 5, 6}),
                        (6, {1, 2, 3, 4, 5, 6})):
        assert kept(filter_logits(wide, k, 1.0, 0.0)) == expected, k


@pytest.mark.parametrize("top_p, expected", [
    (0.3, {1}), (0.5, {1}), (0.51, {1, 3}), (0.8, {1, 3}), (0.81, {1, 3, 0}), (0.95, {1, 3, 0}),
    (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, expected: set[int]) -> None:
    out = filter_logits(HAND.log(), -1, top_p, 0.0)
    assert kept(out) == expected
    assert torch.equal(out[list(expected)], HAND.log()[list(expected)])


@settings(max_examples=60, deadline=None)
@given(logits=distinct_logits, top_p=st.floats(0.01, 0.99))
def test_top_p_nucleus_is_minimal(logits: torch.Tensor, top_p: float) -> None:
    probs = logits.double().softmax(-1)
    keep = kept(filter_logits(logits, -1, top_p, 0.0))
    order = probs.argsort(descending=True).tolist()
    assert keep == set(order[:len(keep)]), "the nucleus is a prefix of the sorted distribution"
    mass = float(probs[list(keep)].sum())
    smallest = float(probs[order[len(keep) - 1]])
    assert mass >= top_p - 1e-5, "the nucleus reaches top_p"
    assert mass - smallest < top_p + 1e-5, "without its smallest member it would not"


def test_the_sort_and_the_radix_select_find_the_same_edges() -> None:
    """filter_logits' two ways to the top-k and top-p edges (a sort, on a GPU; a radix select over
    the values' bits, elsewhere) keep the same tokens, ties at the edges included (logits rounded to
    quarters: many ties), per row settings mixed, with -inf already in some rows."""
    g = torch.Generator().manual_seed(5)
    R, V = 300, 48
    logits = (torch.randn(R, V, generator=g) * 3).mul(4).round().div(4)
    logits[::7, :5] = float("-inf")
    top_k = torch.randint(0, V + 3, (R,), generator=g) * (torch.rand(R, generator=g) < 0.6)
    top_p = torch.where(torch.rand(R, generator=g) < 0.7, torch.rand(R, generator=g), torch.ones(R))
    min_p = torch.where(torch.rand(R, generator=g) < 0.3, torch.rand(R, generator=g) * 0.5, torch.zeros(R))
    by_sort = draws.filter_logits(logits, top_k, top_p, min_p, sort=True)
    by_radix = draws.filter_logits(logits, top_k, top_p, min_p, sort=False)
    assert torch.equal(by_sort, by_radix)
    assert (by_sort.isinf() & logits.isfinite()).any(dim=1).float().mean() > 0.5  # most rows lose tokens


@pytest.mark.parametrize("min_p, expected", [
    (0.0, {0, 1, 2, 3}), (0.05, {0, 1, 2, 3}), (0.2, {0, 1, 3}), (0.59, {1, 3}), (0.61, {1}), (1.0, {1}),
])
def test_min_p_masks_below_fraction_of_max(min_p: float, expected: set[int]) -> None:
    assert kept(filter_logits(HAND.log(), -1, 1.0, min_p)) == expected


@settings(max_examples=60, deadline=None)
@given(logits=distinct_logits, min_p=st.floats(0.0, 1.0))
def test_min_p_property(logits: torch.Tensor, min_p: float) -> None:
    probs = logits.double().softmax(-1)
    threshold = min_p * float(probs.max())
    keep = kept(filter_logits(logits, -1, 1.0, min_p))
    for i, p in enumerate(probs.tolist()):
        if abs(p - threshold) > 1e-6 * max(1.0, threshold):
            assert (i in keep) == (p > threshold)
    assert int(probs.argmax()) in keep


def test_filter_does_not_modify_its_input() -> None:
    logits = HAND.log()
    before = logits.clone()
    filter_logits(logits, 2, 0.5, 0.5)
    assert torch.equal(logits, before)


# -- apply_penalties ----------------------------------------------------------------------------

def test_repetition_penalty_on_seen_tokens_only(make_seq: MakeSeq) -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 0.0, 3.0, -3.0, 1.0]])
    seq = make_seq([0, 1, 0], [4, 6, 6], SamplingParams(repetition_penalty=2.0))  # seen: 0, 1, 4, 6
    out = apply_penalties(logits.clone(), [seq])
    expected = torch.tensor([[1.0, -4.0, 4.0, -1.0, 0.0, 3.0, -6.0, 1.0]])  # once per token, however often
    assert torch.equal(out, expected)


def test_repetition_penalty_below_one_boosts(make_seq: MakeSeq) -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(logits.clone(), [make_seq([0, 1], [], SamplingParams(repetition_penalty=0.5))])
    assert torch.equal(out, torch.tensor([[4.0, -1.0, 1.0]]))


def test_presence_and_frequency_count_output_tokens(make_seq: MakeSeq) -> None:
    logits = torch.zeros(1, 8)
    params = SamplingParams(presence_penalty=0.25, frequency_penalty=0.5)
    seq = make_seq([3, 7, 7], [3, 3, 3, 5], params)  # prompt tokens are not counted
    out = apply_penalties(logits.clone(), [seq])
    expected = torch.zeros(1, 8)
    expected[0, 3] = -(0.5 * 3 + 0.25)
    expected[0, 5] = -(0.5 * 1 + 0.25)
    assert torch.allclose(out, expected)


def test_negative_presence_and_frequency_reward(make_seq: MakeSeq) -> None:
    seq = make_seq([0], [2, 2], SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5))
    out = apply_penalties(torch.zeros(1, 4), [seq])
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))


def test_penalties_per_row_and_default_noop(make_seq: MakeSeq) -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    seqs = [make_seq([1, 2], [3], SamplingParams()),
            make_seq([1, 2], [3], SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0)),
            make_seq([4], [5, 5], SamplingParams(presence_penalty=2.0))]
    out = apply_penalties(logits.clone(), seqs)
    assert torch.equal(out[0], logits[0])
    changed = lambda row: set((out[row] != logits[row]).nonzero().flatten().tolist())  # noqa: E731
    assert changed(1) == {1, 2, 3}
    assert changed(2) == {5}
    assert torch.allclose(out[2, 5], logits[2, 5] - 2.0)


# -- Sampler --------------------------------------------------------------------------------------

def test_token_counts_take_each_new_token_once_and_reuse_finished_rows(make_seq: MakeSeq) -> None:
    """Penalties' counts live on the device across steps: a batch sends a sequence's tokens appended
    since the last batch only, the counts equal those of its whole history, and a finished
    sequence's row serves the next sequence from empty."""
    vocab, cpu = 12, torch.device("cpu")
    counts = TokenCounts(vocab, cpu)
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)
    first = make_seq([1, 2, 3], [4, 4], params)

    def batch(seq: Sequence) -> RowBatch:
        return RowBatch([seq], [0], [0], [EOS], cpu, counts=counts)

    assert batch(first).new_ids.tolist() == [1, 2, 3, 4, 4]
    first.token_ids += [5, 4]
    step = batch(first)
    assert step.new_ids.tolist() == [5, 4]
    assert not hasattr(batch(first), "new_ids")  # nothing new: nothing sent or counted again
    row = counts.rows[first][0]
    assert counts.output[row].tolist() == torch.bincount(torch.tensor([4, 4, 5, 4]), minlength=vocab).float().tolist()
    assert counts.seen[row].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    logits = torch.randn(1, vocab)
    assert torch.equal(step.process(logits, None), apply_penalties(logits, [first]))  # a fresh count agrees
    first.status = Status.FINISHED
    second = make_seq([7], [], params)
    assert batch(second).new_ids.tolist() == [7] and counts.rows[second][0] == row
    assert counts.output[row].sum() == 0 and counts.seen[row].nonzero().flatten().tolist() == [7]


def test_greedy_is_argmax_after_penalties(make_seq: MakeSeq) -> None:
    logits = torch.tensor([[3.0, 0.0, 2.9, 1.0, -1.0]])
    plain = make_seq([4], [], SamplingParams(temperature=0.0))
    penalized = make_seq([0], [], SamplingParams(temperature=0.0, repetition_penalty=1.2))
    tokens, logprobs = sample(logits.repeat(2, 1), [plain, penalized])
    assert tokens == [0, 2] and logprobs == [None, None]


def test_argmax_takes_the_first_of_tied_maxima_as_tensor_argmax_does() -> None:
    """Greedy tokens must be the reference's (transformers takes Tensor.argmax) on ties too."""
    inf = float("inf")
    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-inf, -inf, 2.0, 2.0], [-inf] * 4, [5.0, 5.0, 5.0, 5.0]])
    wide = torch.randint(0, 3, (64, 4096), generator=torch.Generator().manual_seed(0)).float()  # many ties
    for x in (rows, wide, wide.double(), wide.view(64, 64, 64)):
        assert torch.equal(sampling.argmax(x), x.argmax(-1))
    assert sampling.argmax(rows).tolist() == [1, 2, 0, 0]


def test_the_steps_argmax_is_taken_only_where_nothing_changes_the_logits(make_seq: MakeSeq) -> None:
    """Compiled steps hand their logits' argmax beside them (`top`); it stands for the greedy token
    only where no penalty, bias or stop-token ban applies. A stand-in `top` (token 4, not the
    argmax) shows which was taken."""
    logits = torch.tensor([[3.0, 0.0, 2.9, 1.0, -1.0]])
    top = torch.tensor([4])
    plain = SamplingParams(temperature=0.0)
    changed = [SamplingParams(temperature=0.0, repetition_penalty=1.2), SamplingParams(temperature=0.0, logit_bias={3: 5.0}),
               SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])]
    for params, expected in [(plain, 4), *zip(changed, (2, 3, 2))]:
        batch = batch_of([make_seq([0], [], params)], 5)
        assert verify(batch, logits[:, None], None, None, None, top[:, None])[0].tolist() == [[expected]]
        assert draft_tokens(batch, logits, None, top)[0].tolist() == [expected]
        assert verify(batch, logits[:, None], None, None, None)[0].tolist() == [[0 if params is plain else expected]]


def test_plain_draws_and_plain_greedy() -> None:
    """Which requests draft in one compiled call and verify in the sampler's compiled graph
    (plain_draws: argmax, or a draw at the temperature after top-k / top-p / min-p; `filtered`: one
    of those three applies), and which rows the sampler takes as the step's argmax (plain_greedy: no
    logprobs either)."""
    assert SamplingParams(temperature=0.7).plain_draws and SamplingParams(temperature=0.0).plain_draws
    for filters in (dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1)):
        assert SamplingParams(temperature=0.7, **filters).plain_draws
        assert SamplingParams(temperature=0.7, **filters).filtered, filters
        assert not SamplingParams(temperature=0.0, **filters).filtered  # greedy: the filters change no argmax
    assert not SamplingParams(temperature=0.7).filtered
    for changed in (dict(repetition_penalty=1.1), dict(presence_penalty=0.5), dict(frequency_penalty=0.5),
                    dict(logit_bias={3: 1.0}), dict(min_tokens=2)):
        assert not SamplingParams(temperature=0.7, **changed).plain_draws, changed
    assert SamplingParams(temperature=0.0).plain_greedy and not SamplingParams(temperature=0.7).plain_greedy
    assert SamplingParams(temperature=0.0, logprobs=1).plain_draws
    assert not SamplingParams(temperature=0.0, logprobs=1).plain_greedy


def plain_rows(seed: int, num_drafts: list[int], vocab: int = 32, filtered: bool = False):
    """Sequences of greedy and sampled plain rows (lengths, seeds and temperatures differing; `filtered`:
    the sampled through top-p, top-k, min-p), random
    logits [S, K + 1, V], drafts [S, K] (num_drafts real each) and draft distributions [S, K, V]."""
    g = torch.Generator().manual_seed(seed)
    settings = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3), dict(temperature=1.0)]
    if filtered:
        settings[1:] = [dict(temperature=0.7, top_p=0.8), dict(temperature=1.3, top_k=5),
                        dict(temperature=1.0, min_p=0.2)]
    seqs = [Sequence(0, "r", 0, [2] * (3 + 2 * i), 3 + i, SamplingParams(**kw), 100 + 7 * i)
            for i, kw in enumerate(settings[:len(num_drafts)])]
    S, K = len(seqs), max(num_drafts)
    logits = torch.randn(S, K + 1, vocab, generator=g) * 2
    q = torch.randn(S, K, vocab, generator=g).mul(2).softmax(-1)
    drawn = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(S, K)
    likely = torch.rand(S, K, generator=g) < 0.7  # some the target's argmax: more of them kept
    drafts = torch.where(likely, logits[:, :K].argmax(-1), drawn)
    return seqs, logits, torch.tensor(num_drafts), drafts, q


def plain_inputs(seqs: list[Sequence]) -> list[torch.Tensor]:
    """plain_verify's per-sequence settings, as the Sampler sends them (runner.draw_settings)."""
    up = Upload()
    handles = draw_settings(up, [s.params for s in seqs], [s.seed for s in seqs], [s.num_tokens for s in seqs])
    return list(map(up.send(torch.device("cpu")), handles))


@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("num_drafts", [[3, 1, 2, 0], [2, 2], [1], [0, 0, 0]])
def test_plain_verify_is_verify_of_the_rows(num_drafts: list[int], filtered: bool) -> None:
    """plain_verify (settings per sequence, expanded over its rows on the device, as the compiled
    sampler runs it) accepts, rejects and draws what verify does over the same rows' RowBatch: each
    row's position and seed, the temperature, top-k / top-p / min-p, greedy rows among sampled ones."""
    for seed in range(10):
        seqs, logits, counts, drafts, q = plain_rows(seed, num_drafts, filtered=filtered)
        S, width = len(seqs), logits.shape[1]
        batch = RowBatch(seqs, [i for i in range(S) for _ in range(width)], list(range(width)) * S, [EOS],
                         torch.device("cpu"), counts=TokenCounts(logits.shape[-1], torch.device("cpu")))
        if width == 1:
            counts = drafts = q = None
        want = verify(batch, logits, counts, drafts, q)
        got = plain_verify(logits, *plain_inputs(seqs), counts, drafts, q)
        assert torch.equal(got[0], want[0]) and (got[1] is want[1] is None or torch.equal(got[1], want[1]))


def test_the_draws_hash_is_lowbias32() -> None:
    """The draws' 32-bit hash (engine/draws.py), computed in int64 tensors without overflowing, equals
    lowbias32 in Python's exact integers, over the 32-bit range's ends and random values."""
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    spread = torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, *spread]
    assert draws._mix32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


def test_readback_gives_what_tolist_gives() -> None:
    g = torch.Generator().manual_seed(0)
    for shapes in ([(3,)], [(2, 4)], [(2, 4), (2,)], [(2, 3, 5), (2, 3), (2, 3, 0)], [(0, 4)], [(2, 0, 3), (1,)]):
        tensors = [torch.randn(s, generator=g) if i % 2 else torch.randint(0, 9, s, generator=g)
                   for i, s in enumerate(shapes)]
        back = Readback()
        for t in tensors:
            back.add(t)
        mixed = len({t.dtype for t in tensors}) > 1  # fetched as float64 then
        assert back.fetch() == [(t.double() if mixed else t).tolist() for t in tensors]


def test_sampler_does_not_modify_logits(make_seq: MakeSeq) -> None:
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=4, repetition_penalty=1.3, presence_penalty=1.0, min_tokens=2)
    sample(logits, [make_seq([2, 3], [4], params, seed=1), make_seq([5], [], params, seed=2)])
    assert torch.equal(logits, before)


def _run(target: Sequence, others: list[Sequence], steps: int, position: int, vocab: int) -> list[int]:
    """`steps` decode steps of `target` at `position` in a batch with `others`; tokens appended."""
    logit_rng = torch.Generator().manual_seed(99)  # the target's logits are the same in every run
    other_rng = torch.Generator().manual_seed(position + len(others))  # the others' differ per run
    out = []
    for _ in range(steps):
        target_logits = torch.randn(vocab, generator=logit_rng) * 2
        rows = [torch.randn(vocab, generator=other_rng) * 3 for _ in others]
        rows.insert(position, target_logits)
        batch = [*others]
        batch.insert(position, target)
        tokens, _ = sample(torch.stack(rows), batch)
        for seq, token in zip(batch, tokens):
            seq.token_ids.append(token)
        out.append(tokens[position])
    return out


def test_seeded_sampling_is_reproducible_and_batch_independent(make_seq: MakeSeq) -> None:
    vocab = 64
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = _run(make_seq([2], [], params, seed=1234), [], 20, 0, vocab)
    again = _run(make_seq([2], [], params, seed=1234), [], 20, 0, vocab)
    assert alone == again
    others = [make_seq([2], [], SamplingParams(temperature=t, top_k=k, repetition_penalty=r), seed=s)
              for t, k, r, s in [(1.0, -1, 1.0, 1), (0.0, -1, 1.0, 2), (0.5, 5, 1.3, 3), (1.5, -1, 1.0, 1234),
                                 (0.8, 10, 1.0, 5)]]
    in_batch = _run(make_seq([2], [], params, seed=1234), others, 20, 3, vocab)
    assert in_batch == alone
    other_seed = _run(make_seq([2], [], params, seed=4321), [], 20, 0, vocab)
    assert other_seed != alone


def _sample_counts(make_seq: MakeSeq, logits: torch.Tensor, params: SamplingParams, n: int, seed: int) -> list[int]:
    """n draws from one row: n sequences with consecutive seeds, sampled as one batch."""
    tokens, _ = sample(logits[None].repeat(n, 1), [make_seq([0], [], params, seed=seed * n + i) for i in range(n)])
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).tolist()


LOGITS = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 1.5, -0.5, 0.2])


def test_sampling_matches_softmax(make_seq: MakeSeq) -> None:
    counts = _sample_counts(make_seq, LOGITS, SamplingParams(temperature=1.0), 4000, seed=7)
    assert tv(empirical(counts), LOGITS.softmax(-1)) < 0.05
    assert tv(empirical(counts), (LOGITS / 0.5).softmax(-1)) > 0.1  # the check can tell them apart


def test_lower_temperature_sharpens(make_seq: MakeSeq) -> None:
    cold = empirical(_sample_counts(make_seq, LOGITS, SamplingParams(temperature=0.5), 4000, seed=8))
    warm = empirical(_sample_counts(make_seq, LOGITS, SamplingParams(temperature=1.0), 4000, seed=8))
    assert tv(cold, (LOGITS / 0.5).softmax(-1)) < 0.05
    top = int(LOGITS.argmax())
    assert cold[top] > warm[top] + 0.1
    entropy = lambda p: -float((p[p > 0] * p[p > 0].log()).sum())  # noqa: E731
    assert entropy(cold) < entropy(warm)


def test_sampling_respects_filters(make_seq: MakeSeq) -> None:
    top3 = set(LOGITS.topk(3).indices.tolist())
    counts = _sample_counts(make_seq, LOGITS, SamplingParams(top_k=3), 600, seed=9)
    assert {i for i, c in enumerate(counts) if c} == top3
    probs = LOGITS.softmax(-1)
    counts = _sample_counts(make_seq, LOGITS, SamplingParams(min_p=0.5), 600, seed=10)
    assert {i for i, c in enumerate(counts) if c} == set((probs >= 0.5 * probs.max()).nonzero().flatten().tolist())
    order = probs.argsort(descending=True).tolist()
    assert float(probs[order[0]]) < 0.5 < float(probs[order[:2]].sum())
    counts = _sample_counts(make_seq, LOGITS, SamplingParams(top_p=0.5), 600, seed=11)
    assert {i for i, c in enumerate(counts) if c} == set(order[:2])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_tokens(make_seq: MakeSeq, temperature: float) -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 7], logits[0, 4] = 50.0, 40.0, 5.0
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[7], seed=0)
    seq = make_seq([2, 3], [], params)
    produced = []
    for _ in range(3):
        (token,), _ = sample(logits.clone(), [seq])
        assert token not in (EOS, 7)
        produced.append(token)
        seq.token_ids.append(token)
    if temperature == 0.0:
        assert produced == [4, 4, 4]
    (token,), _ = sample(logits.clone(), [seq])
    assert token == EOS  # min_tokens reached


def test_logprobs_are_raw_log_softmax(make_seq: MakeSeq) -> None:
    logits = torch.tensor([[4.0, 3.5, 1.0, 0.0, -1.0, 2.0]])
    raw = logits.log_softmax(-1)[0]
    # the penalty moves the greedy choice to token 1, outside the raw top-1
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=1)
    (token,), (lp,) = sample(logits.clone(), [make_seq([0], [], params)])
    assert token == 1
    assert lp is not None and set(lp) == {0, 1}
    for i, v in lp.items():
        assert v == pytest.approx(float(raw[i]), abs=1e-6)

    params = SamplingParams(temperature=0.3, presence_penalty=2.0, logprobs=3, seed=5)
    (token,), (lp,) = sample(logits.clone(), [make_seq([0], [0, 5], params, seed=5)])
    assert lp is not None
    assert set(lp) == {0, 1, 5} | {token}
    for i, v in lp.items():
        assert v == pytest.approx(float(raw[i]), abs=1e-6)

    (token,), (lp,) = sample(logits.clone(), [make_seq([0], [], SamplingParams(temperature=0.0, logprobs=0))])
    assert lp == pytest.approx({0: float(raw[0])})


def test_top_logprobs_includes_chosen() -> None:
    lp = torch.tensor([[-0.5, -1.0, -3.0, -2.0], [-3.0, -2.0, -1.0, -0.5]]).log_softmax(-1)
    chosen, ids, values = top_logprobs(lp, torch.tensor([2, 0]), 2)
    assert ids.tolist() == [[0, 1], [3, 2]] and torch.equal(values, lp.gather(1, ids))
    assert chosen.tolist() == [float(lp[0, 2]), float(lp[1, 0])]


# -- SamplingParams -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # 0 in fp32: the penalty divided by zero
    ({"logit_bias": {3: 101}}, "logit_bias"),  # OpenAI's range (1e300, inf in fp32, made a sampled row draw token 0)
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"seed": 2**63}, "seed"),  # the sampler sends seeds as int64: a larger one failed the engine's step
    ({"seed": -2**63 - 1}, "seed"),
])
def test_invalid_sampling_params_raise(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name} must"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_valid_sampling_params() -> None:
    p = SamplingParams(n=2, temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, repetition_penalty=0.5,
                       presence_penalty=-2, frequency_penalty=2, seed=0, max_tokens=None, min_tokens=3,
                       stop="x", logprobs=20, prompt_logprobs=0)
    assert p.greedy and p.stop_strings == ["x"] and p.stop_token_ids == []
    assert not SamplingParams(temperature=0.1).greedy


@pytest.mark.parametrize("kwargs, name", [({"n": True}, "n"), ({"seed": True}, "seed"),
                                          ({"temperature": float("inf")}, "temperature"),
                                          ({"max_tokens": 2.0}, "max_tokens")])
def test_sampling_params_reject_bools_and_infinities(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
