"""Continuous batching: which sequences compute how many tokens this step.

Each step fills a token budget: running decodes first (one token each, plus its MTP drafts to
verify), then running prefills
continue (chunked: a long prompt takes what the budget leaves, over as many steps as it needs), then
waiting sequences are admitted in FIFO order while blocks and sequence slots allow. When the KV pool
cannot hold a running sequence's next tokens, the newest running sequence is preempted: its blocks
are freed and it returns to the front of the queue to be recomputed later (its cached prefix blocks
usually survive, so the recompute is mostly prefix-cache hits).
"""

from collections import deque
from dataclasses import dataclass, field

from stepflash.engine.kv_cache import BlockCopy, KVCacheManager
from stepflash.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # positions to compute this step, starting at seq.num_computed


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark_blocks: int = 0) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks  # kept free at admission to avoid admit-then-preempt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.is_prefilling):  # stable: decodes first, FIFO
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens + len(seq.draft_ids) - seq.num_computed, budget)  # + drafts to verify
            while not self.kv.can_append(seq.blocks, num_new):
                victim = next(s for s in reversed(self.running) if not _is_scheduled(s, out))
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.copies += self.kv.append(seq.blocks, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.blocks.full and seq.params.prompt_logprobs is None:
                hit = self.kv.match_prefix(seq.blocks, seq.token_ids)
                if seq.num_output_tokens == 0:
                    seq.num_cached_tokens = hit
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.can_append(seq.blocks, num_new, reserve=self.watermark_blocks):
                self.kv.free(seq.blocks)  # give back the prefix hit; retried next step
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.copies += self.kv.append(seq.blocks, num_new)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None, free: bool = True) -> None:
        """End a sequence (stop, length or abort) and free everything it holds, wherever it is
        (free=False: the caller frees its blocks later, after filling its MTP caches)."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if free:
            self.kv.free(seq.blocks)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the running set directly (its blocks are shared with its parent)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.draft_ids, seq.draft_probs = [], None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _is_scheduled(seq: Sequence, out: SchedulerOutput) -> bool:
    return any(s.seq is seq for s in out.scheduled)
