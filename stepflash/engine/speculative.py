"""MTP speculative decoding: chained drafts from the MTP modules, and lossless verification.

Positions. MTP module d (0-based) at position p reads the hidden state of level d at p - 1 (level 0:
the target's last hidden state before the final norm; level d: module d-1's output) and the token at
p, and predicts the token at p + 1 (spec section 4; the pair (h_t, x_{t+1}) sits at t + 1, as in
transformers). Its KV and output at p then depend on tokens up to p only, so they can live in the
sequence's sliding blocks and are shared by prefix hits like any KV.

One pass per step, after the target step: with c = num_computed (every token but the newest has
target KV), module d computes the rows [mtp_computed, c) whose inputs are all real (filling its
caches), then, for a decoding sequence, the speculative rows c .. c + d: the newest token, then the
drafts of modules 0..d-1. Its last row gives draft d + 1. Speculative rows are scratch: the next
pass starts at c again and overwrites them before anything reads them.

Verification (`verify`): the target scores [newest token, d1, ..., dk] in one forward. Greedy: the
longest prefix of drafts equal to the target's argmax, then the target's token. Sampling: draft d_i
is kept with probability min(1, p(d_i) / q(d_i)); the first rejected position draws from
norm(max(0, p - q)); if all are kept, a bonus token is drawn from p. p and q are both the processed
distributions (penalties, bias, temperature, top-k/p, min-p) given the tokens before the row, so the
output has exactly the target's distribution.
"""

import torch

from stepflash.engine.kv_cache import KVCacheManager
from stepflash.engine.runner import Chunk, ModelRunner
from stepflash.engine.sampler import RowContext, Sampler, sample
from stepflash.engine.sequence import Sequence


class MTPDrafter:
    def __init__(self, runner: ModelRunner, kv: KVCacheManager, sampler: Sampler, num_drafts: int) -> None:
        if not 0 < num_drafts <= runner.num_mtp:
            raise ValueError(f"num_drafts={num_drafts} needs that many MTP modules (runner has {runner.num_mtp})")
        self.runner, self.kv, self.sampler, self.num_drafts = runner, kv, sampler, num_drafts

    def propose(self, seqs: list[Sequence]) -> None:
        """Fill every MTP cache of `seqs` up to num_computed and set fresh drafts on each unfinished
        sequence that is decoding (none where the KV pool has no room for their scratch rows)."""
        k = self.num_drafts
        drafting = []
        copies = []
        for seq in seqs:
            seq.draft_ids, seq.draft_probs = [], None
            if not seq.finished and seq.num_tokens - seq.num_computed == 1 and self.kv.can_append(seq.blocks, k):
                copies += self.kv.append(seq.blocks, k)
                drafting.append(seq)
        self.runner.copy_blocks(copies)
        wants = set(drafting)
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in drafting}
        for depth in range(self.runner.num_mtp):
            chunks, logit_rows, row = [], [], 0
            for seq in seqs:
                start = seq.blocks.mtp_computed
                end = seq.num_computed + (depth + 1 if seq in wants and depth < k else 0)
                if end > start:
                    chunks.append(Chunk(seq, start, seq.tokens(start, end)))
                    row += end - start
                    if seq in wants and depth < k:
                        logit_rows.append(row - 1)
            if not chunks:
                break
            logits = self.runner.execute_mtp(depth, chunks, logit_rows)
            if depth < k:
                self._draft(drafting, logits, probs)
        for seq in drafting:
            if probs[seq]:
                seq.draft_probs = torch.stack(probs[seq])
        for seq in seqs:
            seq.blocks.mtp_computed = seq.num_computed

    def _draft(self, seqs: list[Sequence], logits: torch.Tensor, probs: dict[Sequence, list[torch.Tensor]]) -> None:
        """Append each sequence's next draft: the processed argmax (one op for the batch) or, when
        sampling, a draw from q, which is kept for verification."""
        processed = self.sampler.processed(logits, [RowContext.of(seq, seq.draft_ids) for seq in seqs])
        greedy = processed.argmax(-1).tolist()
        for row, seq in enumerate(seqs):
            token = greedy[row]
            if not seq.params.greedy:
                q = self.sampler.probs(processed[row], seq.params)
                token = sample(q, seq.generator)
                probs[seq].append(q)
            seq.draft_ids.append(token)


def verify(sampler: Sampler, logits: torch.Tensor, seq: Sequence, drafts: list[int],
           draft_probs: torch.Tensor | None) -> list[int]:
    """The tokens a verify step emits: accepted drafts, then one token of the target's own.
    logits [len(drafts) + 1, V]: row r follows the sequence's tokens and drafts[:r]."""
    rows = [RowContext.of(seq, drafts[:r]) for r in range(len(drafts) + 1)]
    processed = sampler.processed(logits, rows)
    params, gen = seq.params, seq.generator
    if params.greedy:
        target = processed.argmax(-1).tolist()
        out = []
        for r, d in enumerate(drafts):
            out.append(target[r])
            if target[r] != d:
                return out
        return out + [target[len(drafts)]]
    out = []
    for r, d in enumerate(drafts):
        p, q = sampler.probs(processed[r], params), draft_probs[r]
        if float(torch.rand((), generator=gen, device=p.device)) * float(q[d]) <= float(p[d]):
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)
        out.append(sample(residual if float(residual.sum()) > 0 else p, gen))
        return out
    return out + [sample(sampler.probs(processed[len(drafts)], params), gen)]
