"""Logits -> tokens: penalties, greedy or temperature with top-k / top-p / min-p, per-request seeds, logprobs.

Sampling draws one exponential variate per vocabulary entry from the sequence's own generator and
takes argmax(p / E) (equivalent to sampling from p). A sequence's draws therefore depend only on its
seed and its own step count, never on what else is in the batch.
"""

from dataclasses import dataclass

import torch

from stepflash.engine.sequence import Sequence
from stepflash.sampling import SamplingParams


@dataclass
class RowContext:
    """What the logit processors need to know about the sequence a row of logits continues: its
    tokens (`prefix` then `extra`, e.g. speculative tokens; joined only when a processor reads them)."""

    params: SamplingParams
    prefix: list[int]
    num_prompt_tokens: int
    generator: torch.Generator
    extra: tuple[int, ...] = ()

    @classmethod
    def of(cls, seq: Sequence, extra: list[int] | None = None) -> "RowContext":
        """The row after `seq`'s tokens, followed by `extra` when given."""
        return cls(seq.params, seq.token_ids, seq.num_prompt_tokens, seq.generator, tuple(extra or ()))

    @property
    def token_ids(self) -> list[int]:
        return self.prefix + list(self.extra) if self.extra else self.prefix

    @property
    def num_output_tokens(self) -> int:
        return len(self.prefix) + len(self.extra) - self.num_prompt_tokens


def apply_penalties(logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Repetition (prompt + output tokens), presence and frequency (output tokens) penalties."""
    for row, ctx in enumerate(rows):
        p = ctx.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ctx.token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(ctx.token_ids[ctx.num_prompt_tokens:], dtype=torch.long, device=logits.device)
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


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from unnormalised probabilities: argmax(p / E) with E ~ Exp(1) from `generator`."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, rows: list[RowContext]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] fp32, one row per sequence -> (tokens, logprobs dict or None per row)."""
        raw_logprobs = logits.log_softmax(-1) if any(r.params.logprobs is not None for r in rows) else None
        logits = self.processed(logits, rows)
        greedy = logits.argmax(-1).tolist()  # one op for all rows; sampled rows are redone below
        tokens, logprobs = [], []
        for row, ctx in enumerate(rows):
            p = ctx.params
            token = greedy[row] if p.greedy else sample(self.probs(logits[row], p), ctx.generator)
            tokens.append(token)
            logprobs.append(None if p.logprobs is None else top_logprobs(raw_logprobs[row], p.logprobs, token))
        return tokens, logprobs

    @staticmethod
    def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The distribution a sampled (temperature > 0) row draws from, after top-k / top-p / min-p."""
        return filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)

    def processed(self, logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
        """Penalties, logit bias, and stop tokens banned until min_tokens; a copy only when something applies."""
        banned = {row: r.params.stop_token_ids + ([] if r.params.ignore_eos else self.eos_token_ids)
                  for row, r in enumerate(rows) if r.num_output_tokens < r.params.min_tokens}
        penalised = any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
                        for r in rows)
        biased = {row: r.params.logit_bias for row, r in enumerate(rows) if r.params.logit_bias}
        if not banned and not penalised and not biased:
            return logits
        logits = apply_penalties(logits.clone(), rows) if penalised else logits.clone()
        for row, bias in biased.items():
            logits[row, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        for row, ids in banned.items():
            logits[row, ids] = float("-inf")
        return logits
