"""Continuous batching: `schedule()` makes each step's plan, `update(plan, result)` applies what the
step produced. The scheduler is the only writer of sequence and KV state.

Each step fills a token budget: running decodes first (the newest token plus up to k MTP drafts to
verify), then running prefills continue (chunked: a long prompt takes what the budget leaves, over
as many steps as it needs), then waiting sequences are admitted in FIFO order while blocks and
sequence slots allow. Every KV reservation is made here, the MTP drafting rows included: a decoding
sequence reserves its verify rows, which also hold the drafting rows of the same step. When the
pool cannot hold a running sequence's next tokens, the newest running sequence is preempted: its
blocks are freed and it returns to the front of the queue to be recomputed later (its cached prefix
usually survives, so the recompute is mostly prefix-cache hits).

With MTP, each step first catches up the MTP caches of every scheduled sequence (positions
mtp_computed..start, computed by the target in earlier steps), then drafts; a finished sequence
whose MTP caches lag drains for one step (catch-up only) before its blocks are freed, so its whole
prefix can be named for the prefix cache.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stepflash.engine.kv_cache import BlockCopy, KVCacheManager
from stepflash.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: the target computes positions start .. start + num_new +
    num_drafts - 1 (known tokens, then drafts); MTP first catches up mtp_start .. start - 1."""

    seq: Sequence
    start: int
    num_new: int
    num_drafts: int = 0
    mtp_start: int = 0
    forks: list[Sequence] = field(default_factory=list)  # n > 1 siblings sampling from this row

    @property
    def end(self) -> int:
        """End of the known tokens computed this step."""
        return self.start + self.num_new

    @property
    def samples(self) -> bool:
        """The step computes the newest token, so it samples the next one (after verifying drafts)."""
        return self.num_new > 0 and self.end == self.seq.num_tokens


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq]
    copies: list[BlockCopy]  # copy-on-write, done before anything runs


@dataclass
class Sampled:
    """What a sampling sequence got from the step: accepted drafts, then a token of the target's."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    num_drafts: int = 0


@dataclass
class StepResult:
    sampled: dict[Sequence, Sampled]  # forks included
    prompt_logprobs: dict[Sequence, list[dict[int, float]]]  # for prompt positions computed this step


@dataclass
class SeqUpdate:
    """What changed for one sequence in a step (the output processor's input)."""

    seq: Sequence
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    new_prompt_logprobs: list[dict[int, float]] | None = None
    num_drafts: int = 0  # drafts verified this step
    num_accepted: int = 0  # of which accepted (tokens after a stop included)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_mtp: int, eos_token_ids: list[int], new_fork: Callable[[Sequence, int], Sequence],
                 watermark_blocks: int = 0, think_end: int | None = None) -> None:
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len, self.num_mtp = max_model_len, num_mtp
        self.eos_token_ids = frozenset(eos_token_ids)
        self.new_fork = new_fork  # makes the sibling of a sequence with a given index
        self.watermark_blocks = watermark_blocks  # kept free at admission to avoid admit-then-preempt
        self.think_end = think_end  # the token that ends reasoning (constraints count until it)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.draining: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.draining)

    def sequences_of(self, request_id: str) -> list[Sequence]:
        """The request's sequences still waiting or running."""
        return [s for s in [*self.waiting, *self.running] if s.request_id == request_id]

    # -- planning ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan([ScheduledSeq(s, s.num_computed, 0, mtp_start=s.blocks.mtp_computed) for s in self.draining], [])
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.is_prefilling):  # stable: decodes first, FIFO
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            drafts = self._drafts(seq, budget - num_new) if not seq.is_prefilling else 0
            if drafts and not self.kv.can_append(seq.blocks, num_new + drafts):
                drafts = 0  # no room to speculate: a plain decode step rather than a preemption
            while not self.kv.can_append(seq.blocks, num_new):
                victim = next(s for s in reversed(self.running) if not _is_scheduled(s, plan))
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                budget -= self._reserve(plan, seq, num_new, drafts)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.blocks.full and seq.params.prompt_logprobs is None:
                hit = self.kv.match_prefix(seq.blocks, seq.token_ids, seq.images)
                if seq.num_output_tokens == 0:
                    seq.num_cached_tokens = hit
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.can_append(seq.blocks, num_new, reserve=self.watermark_blocks):
                self.kv.free(seq.blocks)  # give back the prefix hit; retried next step
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= self._reserve(plan, seq, num_new, 0)
        return plan

    def _drafts(self, seq: Sequence, budget: int) -> int:
        """Drafts worth verifying: no more than the tokens it may still emit after the target's own."""
        return max(0, min(self.num_mtp, budget, seq.tokens_left(self.max_model_len) - 1))

    def _reserve(self, plan: StepPlan, seq: Sequence, num_new: int, drafts: int) -> int:
        plan.copies += self.kv.append(seq.blocks, num_new + drafts)
        scheduled = ScheduledSeq(seq, seq.num_computed, num_new, drafts, seq.blocks.mtp_computed)
        if seq.num_forks and scheduled.samples:  # n > 1: siblings share the computed prompt
            scheduled.forks = [self._fork(seq, index) for index in range(1, seq.num_forks + 1)]
            seq.num_forks = 0
        plan.seqs.append(scheduled)
        return num_new + drafts

    def _fork(self, seq: Sequence, index: int) -> Sequence:
        child = self.new_fork(seq, index)
        child.blocks = self.kv.fork(seq.blocks)
        child.status = Status.RUNNING
        self.running.append(child)
        return child

    # -- applying a step's result ----------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[SeqUpdate]:
        """Append accepted tokens, commit computed blocks, drop rejected drafts' blocks, finish
        and free; returns what changed for each sequence."""
        updates = []
        for s in plan.seqs:
            seq = s.seq
            if seq.status == Status.DRAINING:
                seq.blocks.mtp_computed = seq.num_computed
                self.kv.commit(seq.blocks, seq.token_ids, seq.num_computed, seq.images)
                self.abort(seq)  # its finish reason stays
                continue
            prompt_lps = result.prompt_logprobs.get(seq)
            if prompt_lps:
                seq.num_prompt_scored += len(prompt_lps)
            if not s.samples:
                self._commit(seq, s, s.end)
                updates.append(SeqUpdate(seq, [], None, prompt_lps))
                continue
            for member in [seq, *s.forks]:
                sampled = result.sampled[member]
                tokens = self._append(member, sampled.token_ids)
                logprobs = sampled.logprobs[:len(tokens)] if sampled.logprobs is not None else None
                self._commit(member, s, s.end + len(tokens) - 1)
                updates.append(SeqUpdate(member, tokens, logprobs, prompt_lps if member is seq else None,
                                         sampled.num_drafts, len(sampled.token_ids) - 1))
                if member.finish_reason is not None:
                    self.finish(member, member.finish_reason, member.stop_reason)
        return updates

    def _append(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Append tokens up to the first that ends the sequence (what came after is not its output);
        a token its grammar rejects (a matcher error) is not appended and ends the sequence."""
        for i, token in enumerate(tokens):
            if seq.constraint is not None and not seq.constraint.accept(token, self.think_end):
                seq.finish_reason, seq.stop_reason = "error", seq.constraint.error
                return tokens[:i]
            seq.token_ids.append(token)
            stop = seq.stop_reason_for(token, self.eos_token_ids, self.max_model_len)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = stop
                return tokens[:i + 1]
        return tokens

    def _commit(self, seq: Sequence, s: ScheduledSeq, num_computed: int) -> None:
        """Positions before num_computed hold KV (the MTP caches: those before start); blocks past
        the drafts' rows are scratch."""
        seq.blocks.mtp_computed = s.start if self.num_mtp else 0
        self.kv.commit(seq.blocks, seq.token_ids, min(num_computed, seq.num_tokens), seq.images)
        self.kv.trim(seq.blocks, seq.num_computed)

    # -- ending -----------------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop or length). With MTP and prefix caching, it drains first."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        lags = self.num_mtp and self.kv.enable_prefix_caching and seq.blocks.mtp_computed < seq.num_computed
        if seq.status == Status.RUNNING and lags:
            self.running.remove(seq)
            seq.status = Status.DRAINING
            self.draining.append(seq)
        elif seq.status != Status.DRAINING:
            self.abort(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence wherever it is and free everything it holds at once."""
        for queue in (self.running, self.waiting, self.draining):
            if seq in queue:
                queue.remove(seq)
        seq.finish_reason = seq.finish_reason or "abort"
        self.kv.free(seq.blocks)
        seq.status = Status.FINISHED

    def abort_all(self) -> None:
        """Abort every sequence, those draining included (after a failed step)."""
        for seq in [*self.waiting, *self.running, *self.draining]:
            self.abort(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _is_scheduled(seq: Sequence, plan: StepPlan) -> bool:
    return any(s.seq is seq for s in plan.seqs)
