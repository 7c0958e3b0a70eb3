"""MTP speculative decoding: chained drafts from the MTP modules, kept on the device.

Positions. MTP module d (0-based) at position p reads the hidden state of level d at p - 1 (level 0:
the target's last hidden state before the final norm; level d: module d-1's output) and the token at
p, and predicts the token at p + 1 (spec section 4; the pair (h_t, x_{t+1}) sits at t + 1, as in
transformers). Its KV and output at p then depend on tokens up to p only, so they can live in the
sequence's sliding blocks and are shared by prefix hits like any KV.

A step starts with one pass per module, before the target's forward, all over the same rows (one
packing and copy for the step, runner.DraftRows): per sequence, the rows [mtp_start, start) that the
target computed in earlier steps (each module catches up its caches), then, for a sequence that
drafts n tokens, the speculative rows start .. start + n - 1: the newest token, then the drafts of
modules 0 .. n - 2, written into the ids on the device before the module that reads them. Module d
drafts token d + 1 from row start + d; its rows past that are scratch, as all speculative rows are:
the next step's catch-up starts at `start` again and overwrites them before anything reads them
(a row reads no later position, and module d + 1 reads module d's output at p - 1 only for rows
up to start + d + 1).
Where every drafting sequence drafts plainly (the argmax, or a draw at the temperature:
SamplingParams.plain_draws, and no grammar) and steps are compiled (the CPU), the passes are one
compiled call, each module's drafts written into the next one's rows on the way (runner.plain_drafts);
top-k / top-p / min-p apply to the target's distribution only there (the verify is lossless for any
draft distribution).
The target then verifies the drafts in the same step (engine/sampler.py `verify`); the drafts never
leave the device, except those of constrained sequences, read back at each depth so that the next
draft is drawn under the grammar's mask after them.
"""

from dataclasses import dataclass

import torch

from stepflash.engine.runner import Chunk, DraftRows, Inject, ModelRunner
from stepflash.engine.sampler import RowBatch, TokenCounts, argmax_of, draft_tokens
from stepflash.engine.scheduler import ScheduledSeq, StepPlan
from stepflash.structured import UTF8_GRACE, StructuredOutputs


@dataclass
class Drafts:
    """The drafts of a step's drafting sequences (most drafts first): tokens [S, K] and, when any samples,
    the distributions they were drawn from [S, K, V]."""

    seqs: list[ScheduledSeq]
    tokens: torch.Tensor
    probs: torch.Tensor | None

    def row(self, s: ScheduledSeq) -> int:
        return self.index[s.seq.seq_id]

    def __post_init__(self) -> None:
        self.index = {s.seq.seq_id: i for i, s in enumerate(self.seqs)}


class MTPDrafter:
    def __init__(self, runner: ModelRunner, eos_token_ids: list[int], counts: TokenCounts,
                 structured: StructuredOutputs) -> None:
        self.runner, self.eos_token_ids, self.counts, self.structured = runner, eos_token_ids, counts, structured

    def propose(self, plan: StepPlan) -> Drafts:
        """Catch up every scheduled sequence's MTP caches and draft for those that verify this step.
        Drafting sequences are ordered by their draft count, so those that draft at a depth are a
        prefix of the rows (no index lists on the device)."""
        drafting = sorted((s for s in plan.seqs if s.num_drafts), key=lambda s: -s.num_drafts)
        width = drafting[0].num_drafts if drafting else 0
        tokens = torch.zeros(len(drafting), width, dtype=torch.long, device=self.runner.device)
        drafts = Drafts(drafting, tokens, None)
        rows = self._rows(plan, drafts)
        if not rows.chunks:
            return drafts
        plain = all(s.seq.params.plain_draws and not (s.seq.constraint and s.seq.constraint.active) for s in drafting)
        sampled = [s.seq for s in drafting] if any(not s.seq.params.greedy for s in drafting) else None
        drafted = self.runner.plain_drafts(rows, sampled) if plain else None
        if drafted is not None:
            drafts.tokens = self._gathered(drafted[0][:width], tokens)  # deeper modules only caught up
            if sampled:
                drafts.probs = self._gathered(drafted[1][:width], None)
            return drafts
        for depth in range(self.runner.num_mtp):
            logits = self.runner.execute_mtp(depth, rows)
            members = drafting[:len(rows.logit_rows[depth])]  # those drafting at this depth
            if not members:
                continue
            mask = self._mask(members, tokens, depth)
            if mask is None and all(s.seq.params.plain_greedy for s in members):  # nothing to process
                new, q = argmax_of(logits), None
            else:
                batch = RowBatch([s.seq for s in members], list(range(len(members))), [depth] * len(members),
                                 self.eos_token_ids, self.runner.device, mask, self.counts)
                new, q = draft_tokens(batch, logits.values, tokens[:len(members)], logits.argmax)
            tokens[:len(members), depth] = new
            if q is not None:
                if drafts.probs is None:
                    drafts.probs = q.new_zeros(len(drafting), width, q.shape[-1])
                drafts.probs[:len(members), depth] = q
        return drafts

    @staticmethod
    def _gathered(per_depth: tuple[torch.Tensor, ...], out: torch.Tensor | None) -> torch.Tensor:
        """Each depth's drafts (or their distributions) as column `depth` of [S, K] (or [S, K, V]): stacked
        where every sequence drafts K, else written into `out` (zeros where none) from the top."""
        if per_depth and all(len(new) == len(per_depth[0]) for new in per_depth):  # one op
            return torch.stack(per_depth, 1)
        if out is None:
            out = per_depth[0].new_zeros(len(per_depth[0]), len(per_depth), *per_depth[0].shape[1:])
        for depth, new in enumerate(per_depth):
            out[:len(new), depth] = new
        return out

    def _rows(self, plan: StepPlan, drafts: Drafts) -> DraftRows:
        """The step's drafting rows (runner.DraftRows): a sequence's rows start with its catch-up at
        mtp_start; its newest token sits at `start`, draft j at start + j."""
        num_mtp, width = self.runner.num_mtp, drafts.tokens.shape[1]
        rows = DraftRows([], [[] for _ in range(num_mtp)], [Inject() for _ in range(num_mtp)])
        newest, row = {}, 0
        for s in plan.seqs:
            end = s.start + s.num_drafts  # module num_drafts - 1 reads up to draft num_drafts - 1
            if end <= s.mtp_start:
                continue
            ids = s.seq.token_ids[s.mtp_start:min(end, s.start + 1)]
            rows.chunks.append(Chunk(s.seq, s.mtp_start, ids + [0] * (end - s.mtp_start - len(ids))))
            newest[s.seq.seq_id] = row + s.start - s.mtp_start
            row += end - s.mtp_start
        for depth in range(num_mtp):
            for s in drafts.seqs:
                if s.num_drafts <= depth:
                    break  # drafting order: the rest draft less
                at = newest[s.seq.seq_id] + depth
                rows.logit_rows[depth].append(at)
                if depth:  # module depth reads draft depth, module depth - 1's
                    rows.injects[depth].add(range(at, at + 1), drafts.row(s) * width + depth - 1, drafts.tokens)
        return rows

    def _mask(self, members: list[ScheduledSeq], tokens: torch.Tensor, depth: int) -> torch.Tensor | None:
        """The grammar bitmask of the constrained members' drafting rows (None when none is), so that
        their drafts follow the grammar (and a spent thinking budget) as the target's verify rows
        will: drafts the target's mask would reject are not proposed. Reads the drafts so far to
        the host (constrained steps only)."""
        constrained = [i for i, s in enumerate(members) if s.seq.constraint and s.seq.constraint.active]
        if not constrained:
            return None
        drafted = tokens[:len(members), :depth].tolist() if depth else [[]] * len(members)  # no read at depth 0
        rows = [(members[i].seq.constraint, members[i].seq.token_ids[-UTF8_GRACE:], drafted[i], i) for i in constrained]
        return self.structured.draft_bitmask(rows, len(members)).to(self.runner.device, non_blocking=True)
