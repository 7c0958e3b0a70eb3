"""Scheduler on its own (no model): what each plan holds, and what `update` does with a step's result."""

import itertools

import pytest

from stepflash.engine.kv_cache import FULL, SLIDING, KVCacheManager
from stepflash.engine.scheduler import Sampled, Scheduler, StepPlan, StepResult
from stepflash.engine.sequence import Sequence, Status
from stepflash.sampling import SamplingParams

EOS = 2
BS = 4  # block size
ids = itertools.count()


def seq(prompt_len: int, max_tokens: int = 8, n: int = 1, **kw) -> Sequence:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n, **kw)
    return Sequence(next(ids), f"r{next(ids)}", 0, list(range(10, 10 + prompt_len)), prompt_len, params, 0,
                    num_forks=n - 1)


def scheduler(full_blocks: int = 64, sliding_blocks: int = 0, window: int = 8, max_seqs: int = 8,
              budget: int = 32, mtp: int = 0, max_len: int = 64) -> Scheduler:
    kv = KVCacheManager(BS, full_blocks, sliding_blocks, window, enable_prefix_caching=True, track_mtp=mtp > 0)
    fork = lambda s, index: Sequence(next(ids), s.request_id, index, list(s.token_ids),  # noqa: E731
                                     s.num_prompt_tokens, s.params, s.seed + index)
    return Scheduler(kv, max_seqs, budget, max_len, mtp, [EOS], fork)


def run(sched: Scheduler, plan: StepPlan, token: int = 5, accept: int | None = None) -> StepResult:
    """A result for `plan`: each sampling sequence gets its drafts (all, or `accept` of them) then `token`."""
    sampled = {}
    for s in plan.seqs:
        if s.samples:
            kept = s.num_drafts if accept is None else min(accept, s.num_drafts)
            for member in [s.seq, *s.forks]:
                sampled[member] = Sampled([7] * kept + [token], None, s.num_drafts)
    result = StepResult(sampled, {})
    sched.update(plan, result)
    return result


def layout(plan: StepPlan) -> list[tuple[int, int, int, int]]:
    return [(s.seq.seq_id, s.start, s.num_new, s.num_drafts) for s in plan.seqs]


def test_decodes_first_then_prefills_chunked_under_the_budget() -> None:
    sched = scheduler(budget=10)
    a, b = seq(6), seq(9)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()  # a whole (6), b's first 4 tokens
    assert layout(plan) == [(a.seq_id, 0, 6, 0), (b.seq_id, 0, 4, 0)]
    assert plan.seqs[0].samples and not plan.seqs[1].samples
    run(sched, plan)
    assert a.token_ids[-1] == 5 and a.num_computed == 6 and b.num_computed == 4 and b.num_tokens == 9
    plan = sched.schedule()  # a decodes first, b continues with the rest
    assert layout(plan) == [(a.seq_id, 6, 1, 0), (b.seq_id, 4, 5, 0)]
    assert sum(s.num_new + s.num_drafts for s in plan.seqs) == 6


def test_admission_stops_at_max_num_seqs_and_is_fifo() -> None:
    sched = scheduler(max_seqs=2)
    seqs = [seq(3) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [s.seq for s in plan.seqs] == seqs[:2] and list(sched.waiting) == seqs[2:]
    run(sched, plan, token=EOS)  # both finish (EOS): the third gets in
    assert all(s.status == Status.FINISHED for s in seqs[:2])
    assert [s.seq for s in sched.schedule().seqs] == seqs[2:]


def test_finish_frees_blocks_and_stops_at_the_first_stop_token() -> None:
    sched = scheduler(mtp=3)
    s = seq(5, max_tokens=20)
    sched.add(s)
    run(sched, sched.schedule())  # prefill and the first token
    plan = sched.schedule()
    assert layout(plan) == [(s.seq_id, 5, 1, 3)]  # the newest token and 3 drafts
    sched.update(plan, StepResult({s: Sampled([7, EOS, 9, 11], None, 3)}, {}))
    assert s.output_token_ids == [5, 7, EOS] and (s.finish_reason, s.stop_reason) == ("stop", None)
    assert s.status == Status.DRAINING  # its MTP caches catch up first (for the prefix cache)
    run(sched, sched.schedule())
    assert s.status == Status.FINISHED and s.blocks.full == [] and sched.kv.pools[FULL].num_free == 64


def test_a_finished_sequence_drains_its_mtp_caches_before_its_blocks_go() -> None:
    sched = scheduler(mtp=2)
    s = seq(9, max_tokens=1)
    sched.add(s)
    run(sched, sched.schedule())  # 9 prompt tokens + 1 = max_tokens: finished, MTP caches empty
    assert s.status == Status.DRAINING and s.finish_reason == "length" and s.blocks.mtp_computed == 0
    plan = sched.schedule()
    assert layout(plan) == [(s.seq_id, 9, 0, 0)] and plan.seqs[0].mtp_start == 0  # catch-up only
    run(sched, plan)
    assert s.status == Status.FINISHED and not sched.has_work()
    assert len(sched.kv.pools[FULL].block_of) == 2  # both full blocks named for the prefix cache
    assert sched.kv.pools[FULL].num_free == 64


def test_drafts_need_room_and_stop_where_the_output_must() -> None:
    sched = scheduler(mtp=3, max_len=64)
    near_end, plenty = seq(5, max_tokens=3), seq(5, max_tokens=30)
    sched.add(near_end)
    sched.add(plenty)
    run(sched, sched.schedule())
    plan = sched.schedule()
    # near_end may emit 2 more tokens: one draft (+ the target's token); plenty drafts 3
    assert layout(plan) == [(near_end.seq_id, 5, 1, 1), (plenty.seq_id, 5, 1, 3)]
    assert len(plenty.blocks.full) == 3  # positions 5..8 reserved: the verify rows (and drafting rows)
    run(sched, plan, accept=0)  # every draft rejected: the blocks past the accepted token go
    assert plenty.num_computed == 6 and len(plenty.blocks.full) == 2


def test_accepted_drafts_advance_the_sequence_and_mtp_lags_one_step() -> None:
    sched = scheduler(mtp=3)
    s = seq(5, max_tokens=30)
    sched.add(s)
    run(sched, sched.schedule())
    plan = sched.schedule()
    run(sched, plan, token=8)  # 3 drafts accepted + the target's token
    assert s.output_token_ids == [5, 7, 7, 7, 8] and s.num_computed == 9 and s.blocks.mtp_computed == 5
    assert layout(sched.schedule()) == [(s.seq_id, 9, 1, 3)]


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    sched = scheduler(full_blocks=6, budget=64)
    old, new = seq(8, max_tokens=30), seq(8, max_tokens=30)
    sched.add(old)
    sched.add(new)
    run(sched, sched.schedule())  # 2 + 2 blocks (+ the tokens sampled)
    for _ in range(3):
        run(sched, sched.schedule())
    plan = sched.schedule()  # both need a third block; only 2 are free... then 1
    while sched.num_preemptions == 0:
        run(sched, plan)
        plan = sched.schedule()
    assert new.status == Status.WAITING and sched.waiting[0] is new and new.blocks.full == []
    assert [s.seq for s in plan.seqs] == [old]
    assert new.num_tokens > 9  # its output is kept: the recompute covers it


def test_preempted_sequence_recomputes_prompt_and_output_then_samples() -> None:
    sched = scheduler(full_blocks=6, budget=64)
    old, new = seq(8, max_tokens=30), seq(8, max_tokens=30)
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()
    while sched.num_preemptions == 0:
        run(sched, plan)
        plan = sched.schedule()
    length = new.num_tokens
    sched.abort(old)  # frees its blocks: new is admitted again
    plan = sched.schedule()
    hit = (length - 1) // BS * BS  # its own blocks, cached when they were freed, prompt and output
    assert new.num_cached_tokens == 0 and hit > 8
    assert layout(plan) == [(new.seq_id, hit, length - hit, 0)]
    assert plan.seqs[0].samples


def test_abort_frees_everything_wherever_the_sequence_is() -> None:
    sched = scheduler(max_seqs=1)
    running, waiting = seq(6), seq(6)
    sched.add(running)
    sched.add(waiting)
    run(sched, sched.schedule())
    sched.abort(waiting)
    sched.abort(running)
    assert not sched.has_work() and sched.kv.pools[FULL].num_free == 64
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert sched.sequences_of(running.request_id) == []


def test_abort_all_ends_draining_sequences_too() -> None:
    """After a failed step nothing may be left to step: a sequence draining its MTP caches included."""
    sched = scheduler(mtp=2, max_seqs=2)
    draining, running, waiting = seq(9, max_tokens=1), seq(6), seq(6)
    sched.add(draining)
    sched.add(running)
    run(sched, sched.schedule())
    sched.add(waiting)
    assert (draining.status, running.status, waiting.status) == (Status.DRAINING, Status.RUNNING, Status.WAITING)
    sched.abort_all()
    assert not sched.has_work() and sched.kv.pools[FULL].num_free == 64
    assert {s.status for s in (draining, running, waiting)} == {Status.FINISHED}


def test_n_siblings_fork_off_the_prompt_and_sample_from_its_row() -> None:
    sched = scheduler()
    s = seq(6, n=3)
    sched.add(s)
    plan = sched.schedule()
    (scheduled,) = plan.seqs
    assert [f.index for f in scheduled.forks] == [1, 2] and s.num_forks == 0
    assert all(f.blocks.full == s.blocks.full for f in scheduled.forks)  # shared, copy-on-write
    result = run(sched, plan)
    assert set(result.sampled) == {s, *scheduled.forks}
    assert all(f.num_computed == 6 and f.output_token_ids == [5] for f in scheduled.forks)
    plan = sched.schedule()
    assert len(plan.seqs) == 3 and len(plan.copies) == 2  # the shared partial tail block is copied twice


def test_sliding_blocks_leave_the_window() -> None:
    sched = scheduler(sliding_blocks=16, window=8)
    s = seq(20, max_tokens=30)
    sched.add(s)
    run(sched, sched.schedule())
    from stepflash.engine.kv_cache import NO_BLOCK

    # position 20 reads positions 13..20: blocks 3.. (of 4 tokens); 0..2 are released
    assert s.blocks.sliding[:3] == [NO_BLOCK] * 3 and NO_BLOCK not in s.blocks.sliding[3:]
    assert sched.kv.pools[SLIDING].num_free == 16 - len(s.blocks.sliding[3:])


@pytest.mark.parametrize("mtp", [0, 2])
def test_everything_is_freed_after_many_requests(mtp: int) -> None:
    sched = scheduler(full_blocks=12, sliding_blocks=12, window=8, budget=8, mtp=mtp)
    seqs = [seq(3 + 5 * i % 11, max_tokens=4 + i % 5) for i in range(10)]
    for s in seqs:
        sched.add(s)
    for _ in range(400):
        if not sched.has_work():
            break
        run(sched, sched.schedule(), accept=1)
    assert not sched.has_work() and all(s.status == Status.FINISHED for s in seqs)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.kv.pools[FULL].num_free == 12 and sched.kv.pools[SLIDING].num_free == 12
