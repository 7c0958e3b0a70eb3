"""Logits -> tokens: penalties, greedy or temperature with top-k / top-p / min-p, per-request seeds, logprobs.

Sampling draws one exponential variate per vocabulary entry from the sequence's own generator and
takes argmax(p / E) (equivalent to sampling from p). A sequence's draws therefore depend only on its
seed and its own step count, never on what else is in the batch.
"""

import torch

from stepflash.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output tokens), presence and frequency (output tokens) penalties."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p * max prob."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def top_logprobs(logprobs: torch.Tensor, k: int, chosen: int) -> dict[int, float]:
    """The k most likely tokens and the chosen one, id -> log-probability."""
    result = {}
    if k > 0:
        vals, ids = logprobs.topk(k)
        result = dict(zip(ids.tolist(), vals.tolist()))
    result[chosen] = float(logprobs[chosen])
    return result


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] fp32, one row per sequence -> (tokens, logprobs dict or None per row)."""
        raw_logprobs = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = self._processed(logits, seqs)
        greedy = logits.argmax(-1).tolist()  # one op for all rows; sampled rows are redone below
        tokens, logprobs = [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            token = greedy[row]
            if not p.greedy:
                row_logits = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p, p.min_p)
                noise = torch.empty_like(row_logits).exponential_(generator=seq.generator)
                token = int((row_logits.softmax(-1) / noise).argmax())
            tokens.append(token)
            logprobs.append(None if p.logprobs is None else top_logprobs(raw_logprobs[row], p.logprobs, token))
        return tokens, logprobs

    def _processed(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties, logit bias, and stop tokens banned until min_tokens; a copy only when something applies."""
        banned = {row: s.params.stop_token_ids + ([] if s.params.ignore_eos else self.eos_token_ids)
                  for row, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens}
        penalised = any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
                        for s in seqs)
        biased = {row: s.params.logit_bias for row, s in enumerate(seqs) if s.params.logit_bias}
        if not banned and not penalised and not biased:
            return logits
        logits = apply_penalties(logits.clone(), seqs) if penalised else logits.clone()
        for row, bias in biased.items():
            logits[row, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        for row, ids in banned.items():
            logits[row, ids] = float("-inf")
        return logits
