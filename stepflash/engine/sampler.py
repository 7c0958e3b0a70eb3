"""Logits -> tokens for a whole step at once: penalties, bias, min_tokens, temperature with top-k /
top-p / min-p, greedy or seeded draws, MTP drafting and lossless verification, logprobs.

Random draws (engine/draws.py) depend only on a sequence's seed and positions, never on what else
is in the batch.

Verification (speculative decoding): the target scores [newest token, d1, ..., dk] in one forward.
Draft d_i is kept with probability min(1, p(d_i) / q(d_i)); the first rejected position draws from
norm(max(0, p - q)); if all are kept, a bonus token is drawn from p. p and q are both the processed
distributions (penalties, bias, temperature, top-k/p, min-p) given the tokens before the row, so
the output has exactly the target's distribution. Greedy is the same with p and q one-hot: the
longest prefix of drafts equal to the target's argmax, then the target's token.

Where every member draws plainly (SamplingParams.plain_draws, no grammar) and some sample, the verify
takes their settings per sequence (PlainRows) and is one compiled graph where the engine compiles its
steps (plain_verify; eagerly it is ~100 small ops); where all are plain and greedy, the step's argmax is
all there is (Sampler._plain_greedy).
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stepflash.engine.draws import ACCEPT, DRAFT, DRAW, argmax, draw, tempered, uniforms
from stepflash.engine.runner import Compiled, Logits, StepRows, Upload, draw_settings
from stepflash.engine.scheduler import Sampled, ScheduledSeq, StepResult
from stepflash.engine.sequence import Sequence
from stepflash.sampling import SamplingParams
from stepflash.structured import UTF8_GRACE, StructuredOutputs, apply_bitmask

if TYPE_CHECKING:
    from stepflash.engine.speculative import Drafts


def argmax_of(step: Logits) -> torch.Tensor:
    """Each row's argmax: the one the step computed beside its logits, else computed here."""
    return step.argmax if step.argmax is not None else argmax(step.values)


# -- logit processing -----------------------------------------------------------------------------
class RowBatch:
    """R rows of logits to process: row i continues sequence seqs[seq_of[i]] (its token ids, then
    `extra[i]` of its drafts). Everything the rows' settings ask for (sampling parameters, seeds and
    positions, logit bias, bans, the tokens penalties have yet to count) is gathered on the host here
    and sent in one non-blocking copy (none for plain greedy rows); `process` and `probs` then run on
    the device without reading anything back. `mask`: the rows' grammar bitmask on the device (see
    structured.py); `counts`: the penalties' token counts (TokenCounts; needed where a row has any)."""

    def __init__(self, seqs: list[Sequence], seq_of: list[int], extra: list[int], eos_token_ids: list[int],
                 device: torch.device, mask: torch.Tensor | None = None,
                 counts: "TokenCounts | None" = None) -> None:
        self.seq_of, self.extra, self.mask, self.counts = seq_of, extra, mask, counts
        params = [seqs[s].params for s in seq_of]
        sampled = [p for p in params if not p.greedy]
        self.any_sampled = bool(sampled)
        self.ranked = any(p.top_k > 0 or p.top_p < 1 for p in sampled)
        self.floor = any(p.min_p > 0 for p in sampled)
        up, f32 = Upload(), torch.float32
        settings = draw_settings(up, params, [seqs[s].seed for s in seq_of],
                                 [seqs[s].num_tokens + e for s, e in zip(seq_of, extra)]) if self.any_sampled else ()
        sent = dict(zip(("greedy", "temperature", "seeds", "positions"), settings))
        added = self._added(seqs, params, eos_token_ids)
        self.penalised = [i for i, p in enumerate(params) if p.penalised]
        if added[0]:
            sent.update(add_rows=up.add(added[0]), add_ids=up.add(added[1]), add_values=up.add(added[2], f32))
        if self.penalised:
            if counts is None:
                raise ValueError("rows with penalties need the engine's TokenCounts")
            sent.update(self._penalty_inputs(seqs, params, up))
        self.add_rows = None
        got = up.send(device) if sent else None
        for name, handle in sent.items():
            setattr(self, name, got(handle))
        self.filters = tuple(map(got, settings[4:]))  # top_k, top_p, min_p where a sampled row filters
        if "new_ids" in sent:
            counts.add(self.new_rows, self.new_ids, self.new_output)

    def _added(self, seqs: list[Sequence], params: list[SamplingParams], eos_token_ids: list[int]
               ) -> tuple[list[int], list[int], list[float]]:
        """(row, token, value) added to logits: each row's logit bias, and -inf on stop tokens while
        the row is below min_tokens."""
        rows, ids, values = [], [], []
        for i, (s, e, p) in enumerate(zip(self.seq_of, self.extra, params)):
            if not p.logit_bias and not p.min_tokens:  # most rows: nothing to add
                continue
            bias = dict(p.logit_bias or {})
            if seqs[s].num_tokens + e - seqs[s].num_prompt_tokens < p.min_tokens:
                bias.update(dict.fromkeys(p.stop_token_ids + ([] if p.ignore_eos else eos_token_ids), float("-inf")))
            rows += [i] * len(bias)
            ids += bias
            values += bias.values()
        return rows, ids, values

    def _penalty_inputs(self, seqs: list[Sequence], params: list[SamplingParams], up: Upload) -> dict[str, int]:
        """Per penalised row: its sequence's row of the token counts, the tokens that sequence appended
        since they were last counted, and which drafts precede the row (as (sequence, draft) pairs,
        read from the device drafts)."""
        rows, new = self.counts.track([seqs[self.seq_of[i]] for i in self.penalised])
        drafts = ([], [], [])
        for j, i in enumerate(self.penalised):
            drafts[0].extend([j] * self.extra[i])
            drafts[1].extend([self.seq_of[i]] * self.extra[i])
            drafts[2].extend(range(self.extra[i]))
        names = ("count_rows", "draft_rows", "draft_seqs", "draft_index")
        handles = {name: up.add(values) for name, values in zip(names, (rows, *drafts))}
        if new[0]:  # nothing to count at the later drafting depths of a step
            handles.update(new_rows=up.add(new[0]), new_ids=up.add(new[1]), new_output=up.add(new[2], torch.bool))
        handles["penalised_rows"] = up.add(self.penalised)
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            handles[name] = up.add([getattr(params[i], name) for i in self.penalised], torch.float32)
        return handles

    def greedy_tokens(self, processed: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        """The rows' greedy tokens: `processed`'s argmax, or `top` (the raw logits' argmax, where the
        step computed it) when `process` changed nothing: no penalty, bias, stop-token ban or mask."""
        if top is not None and not self.penalised and self.add_rows is None and self.mask is None:
            return top
        return argmax(processed)

    def process(self, logits: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor:
        """Penalties, logit bias, stop tokens banned until min_tokens, then the grammar mask (a copy
        when any applies). drafts [S, k]: the sequences' drafts, of which row i follows the first extra[i]."""
        if self.penalised or self.add_rows is not None:
            logits = logits.clone()
            if self.penalised:
                self._penalise(logits, drafts)
            if self.add_rows is not None:
                logits.index_put_((self.add_rows, self.add_ids), self.add_values, accumulate=True)
        return logits if self.mask is None else apply_bitmask(logits, self.mask)

    def _penalise(self, logits: torch.Tensor, drafts: torch.Tensor | None) -> None:
        """Repetition (prompt + output tokens), presence and frequency (output tokens) penalties;
        a row's drafts count as output tokens."""
        rows = self.penalised_rows
        counts = self.counts.output.index_select(0, self.count_rows)
        seen = self.counts.seen.index_select(0, self.count_rows)
        if drafts is not None and self.draft_rows.numel():
            tokens = drafts[self.draft_seqs, self.draft_index]
            counts.index_put_((self.draft_rows, tokens), counts.new_ones(tokens.shape), accumulate=True)
            seen[self.draft_rows, tokens] = True
        rep = self.repetition_penalty[:, None]
        vals = logits[rows]
        vals = torch.where(seen, torch.where(vals > 0, vals / rep, vals * rep), vals)
        vals -= self.frequency_penalty[:, None] * counts + self.presence_penalty[:, None] * (counts > 0).float()
        logits[rows] = vals

    def probs(self, processed: torch.Tensor) -> torch.Tensor:
        """The distributions sampled rows draw from: temperature, then top-k / top-p / min-p."""
        return tempered(processed, self.temperature, *self.filters, ranked=self.ranked, floor=self.floor)


class TokenCounts:
    """What penalties count, per penalised sequence, kept on the device between steps: how often each
    token occurs in its output (frequency, presence penalties) and whether it occurs at all, prompt
    included (repetition penalty). A step sends only the tokens appended since the last (host work
    per step does not grow with the context); a finished sequence's row goes to the next one."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.output = torch.zeros(0, vocab_size, device=device)
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.rows: dict[Sequence, tuple[int, int]] = {}  # its row, and how many of its tokens it counts

    def track(self, seqs: list[Sequence]) -> tuple[list[int], tuple[list[int], list[int], list[bool]]]:
        """Each sequence's row (a new one starts empty) and what to add: (row, token, in the output)
        for every token appended since its last count, each sequence once."""
        for seq in [s for s in self.rows if s.finished]:
            del self.rows[seq]
        new: tuple[list[int], list[int], list[bool]] = ([], [], [])
        for seq in dict.fromkeys(seqs):
            row, start = self.rows.get(seq) or (self._free_row(), 0)
            new[0].extend([row] * (seq.num_tokens - start))
            new[1].extend(seq.token_ids[start:])
            new[2].extend(i >= seq.num_prompt_tokens for i in range(start, seq.num_tokens))
            self.rows[seq] = row, seq.num_tokens
        return [self.rows[seq][0] for seq in seqs], new

    def add(self, rows: torch.Tensor, ids: torch.Tensor, output: torch.Tensor) -> None:
        """Count tokens (`track`'s triples, on the device)."""
        self.seen[rows, ids] = True
        self.output.index_put_((rows, ids), output.float(), accumulate=True)

    def _free_row(self) -> int:
        """A row no tracked sequence holds, emptied (the tables grow to twice their rows when full)."""
        row = min(set(range(len(self.output))) - {r for r, _ in self.rows.values()}, default=len(self.output))
        if row == len(self.output):
            grown = max(4, 2 * row)
            self.output = torch.cat([self.output, self.output.new_zeros(grown - row, self.output.shape[1])])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grown - row, self.seen.shape[1])])
        self.output[row] = 0
        self.seen[row] = False
        return row


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """For rows of raw logprobs [..., V]: the chosen tokens' logprobs, and the k best (ids, values)."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return logprobs.gather(-1, chosen[..., None])[..., 0], ids, values


# -- drafting and verification ----------------------------------------------------------------------
def draft_tokens(batch: RowBatch, logits: torch.Tensor, drafts: torch.Tensor | None,
                 top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft per row (processed argmax, or a draw from q when sampling) and the q of the
    sampled rows ([R, V], None when all are greedy). `top`: the logits' argmax, where the step
    computed it."""
    processed = batch.process(logits, drafts)
    tokens = batch.greedy_tokens(processed, top)
    if not batch.any_sampled:
        return tokens, None
    q = batch.probs(processed)
    drawn = draw(q, batch.seeds, batch.positions, DRAFT)
    return torch.where(batch.greedy, tokens, drawn), q


def greedy_accepted(target: torch.Tensor, num_drafts: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor:
    """target [S, K + 1] (each row's token), drafts [S, K] of which the first num_drafts[s] are real
    (None: all) -> how many drafts each sequence accepts: those equal to the target's token before
    them, in a run from the first."""
    K = drafts.shape[1]
    same = target[:, :K] == drafts
    if num_drafts is not None:
        same &= torch.arange(K, device=drafts.device)[None, :] < num_drafts[:, None]
    return same.cumprod(-1).sum(-1)


def verify(batch: RowBatch, logits: torch.Tensor, num_drafts: torch.Tensor | None, drafts: torch.Tensor | None,
           q: torch.Tensor | None, top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [S, K + 1] (sequence s: its newest token, then K drafts, of which the first num_drafts[s]
    are real) -> (tokens [S, K + 1], accepted [S]): sequence s emits tokens[s, :accepted[s] + 1].
    drafts [S, K]; q [S, K, V] (the draft distributions, sampled sequences; None when none of them drafts).
    Without drafts (drafts None, K = 0) every row emits its token, and `accepted` is None;
    num_drafts None with drafts: all K are real. `top` [S, K + 1]: the logits'
    argmax, where the step computed it."""
    S, width, V = logits.shape
    K = width - 1
    processed = batch.process(logits.reshape(S * width, V), drafts).view(S, width, V)
    target = batch.greedy_tokens(processed, top)
    if drafts is None and not batch.any_sampled:
        return target, None
    if drafts is None:
        p = batch.probs(processed.view(S, V))
        token = draw(p, batch.seeds, batch.positions, DRAW)[:, None]
        return torch.where(batch.greedy[:, None], target, token), None
    accepted = greedy_accepted(target, num_drafts, drafts)
    if not batch.any_sampled:
        return target, accepted
    if num_drafts is None:
        num_drafts = torch.full((S,), K, device=logits.device)
    real = torch.arange(K, device=logits.device)[None, :] < num_drafts[:, None]
    p = batch.probs(processed.view(S * width, V)).view(S, width, V)
    if q is None:  # no sampled row drafted (greedy rows verify drafts beside sampled rows without): the
        q = p.new_zeros(S, K, V)  # q of rows with no real draft, and of greedy rows, is never used
    seeds, positions = batch.seeds.view(S, width), batch.positions.view(S, width)
    d = drafts[..., None]
    p_d, q_d = p[:, :K].gather(-1, d)[..., 0], q.gather(-1, d)[..., 0]
    u = uniforms(seeds[:, :K].reshape(-1), positions[:, :K].reshape(-1), ACCEPT, 1).view(S, K)
    kept = (real & (u * q_d <= p_d)).long().cumprod(-1).sum(-1)
    rows = torch.arange(S, device=logits.device)
    final = p[rows, kept]
    # a rejection at position kept < num_drafts: draw from the residual there
    residual = (final - q[rows, kept.clamp(max=K - 1)]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, final)
    final = torch.where((kept < num_drafts)[:, None], residual, final)
    token = draw(final, seeds[rows, kept], positions[rows, kept], DRAW)
    sampled = torch.cat([drafts, token[:, None]], 1).scatter(1, kept[:, None], token[:, None])
    greedy = batch.greedy.view(S, width)[:, 0]
    return torch.where(greedy[:, None], target, sampled), torch.where(greedy, accepted, kept)


@dataclass
class PlainRows:
    """What `verify` needs of rows that draw plainly (SamplingParams.plain_draws, no grammar): nothing
    to process, the greedy take the argmax, the others draw at their temperature, after top-k / top-p
    / min-p where given. Settings per sequence, each over its `width` rows (its newest token, then
    its drafts) in the graph."""

    greedy_of: torch.Tensor  # [S] bool
    temperature_of: torch.Tensor  # [S], 1 where greedy
    seeds_of: torch.Tensor  # [S]
    length_of: torch.Tensor  # [S], the position row 0 draws for
    filters_of: tuple[torch.Tensor, ...]  # top_k, top_p, min_p [S]; none where no row filters
    width: int
    any_sampled = True

    def _per_row(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, None].expand(values.shape[0], self.width).reshape(-1)

    @property
    def greedy(self) -> torch.Tensor:
        return self._per_row(self.greedy_of)

    @property
    def seeds(self) -> torch.Tensor:
        return self._per_row(self.seeds_of)

    @property
    def positions(self) -> torch.Tensor:
        return (self.length_of[:, None] + torch.arange(self.width, device=self.length_of.device)).reshape(-1)

    def process(self, logits: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor:
        return logits

    def greedy_tokens(self, processed: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        return argmax(processed)

    def probs(self, processed: torch.Tensor) -> torch.Tensor:
        return tempered(processed, self._per_row(self.temperature_of), *map(self._per_row, self.filters_of))


def plain_verify(logits: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                 lengths: torch.Tensor, *rest: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`verify` for plain rows (PlainRows: the settings per sequence, as runner.draw_settings adds
    them), as the Sampler compiles it. `rest`: top_k, top_p, min_p where any row filters, then
    num_drafts, drafts and q (all None in a step without drafts). A graph for each: drafts or none,
    filters or none."""
    *filters, num_drafts, drafts, q = rest
    S, width, _ = logits.shape
    drafted = (num_drafts, drafts, q) if drafts is not None else ()
    for per_seq in (greedy, temperature, seeds, lengths, *filters, *drafted):
        torch._check(per_seq.shape[0] == S)  # the sizes are unbacked (_plain_counts): state what they equal
    if drafts is not None:
        torch._check(drafts.shape[1] == width - 1)
        torch._check(q.shape[1] == width - 1)
    return verify(PlainRows(greedy, temperature, seeds, lengths, tuple(filters), width), logits, num_drafts, drafts, q)


def _plain_counts(logits: torch.Tensor, *rest: torch.Tensor | None) -> list[tuple[torch.Tensor, int]]:
    """plain_verify's counted dimensions: sequences, and drafts where there are any (logits, drafts, q)."""
    counted = [(t, 0) for t in (logits, *rest) if t is not None]
    if rest[-1] is not None:
        counted += [(logits, 1), (rest[-2], 1), (rest[-1], 1)]
    return counted


class Readback:
    """Device tensors a step reports, brought to the host in a single copy."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        self.parts.append(tensor)
        return len(self.parts) - 1

    def fetch(self) -> list[list]:
        """Each added tensor as (nested) Python lists, in the order added."""
        if len(self.parts) <= 1:
            return [p.tolist() for p in self.parts]  # one part (most steps: the tokens): torch nests it
        dtype = self.parts[0].dtype if all(p.dtype == self.parts[0].dtype for p in self.parts) else torch.float64
        flat = torch.cat([p.reshape(-1).to(dtype) for p in self.parts])
        values, out, start = flat.tolist(), [], 0  # the copy
        for p in self.parts:
            out.append(_nested(values[start:start + p.numel()], p.shape))
            start += p.numel()
        return out


def _nested(values: list, shape: torch.Size) -> list:
    """A flat list as the nested lists Tensor.tolist gives for `shape` (no tensor op per part)."""
    for i in range(len(shape) - 1, 0, -1):
        size = shape[i]
        values = [values[j * size:(j + 1) * size] for j in range(math.prod(shape[:i]))]
    return values


@dataclass
class StagedDrafts:
    """Constrained members (row, scheduled, member) and their drafts on their way to the host."""

    members: list[tuple[int, ScheduledSeq, Sequence]]
    row: dict[int, int]  # seq_id -> row of `tokens`
    tokens: torch.Tensor | None
    done: "torch.cuda.Event | None"


class Sampler:
    """Logits of a step -> each member's tokens (drafts verified) and logprobs, and the scored prompt
    positions' logprobs, with one device-to-host copy."""

    def __init__(self, eos_token_ids: list[int], counts: TokenCounts,
                 structured: StructuredOutputs | None = None, compiled: bool = False) -> None:
        self.eos_token_ids, self.counts, self.structured = eos_token_ids, counts, structured
        self.plain_verify = Compiled(plain_verify, _plain_counts) if compiled else plain_verify

    def __call__(self, rows: StepRows, step_logits: Logits, drafts: "Drafts | None",
                 staged: "StagedDrafts | None" = None) -> StepResult:
        logits, top = step_logits
        device, width = logits.device, rows.width
        S, V = len(rows.members), logits.shape[-1]
        num_drafts, tokens_in, probs_in = self._member_drafts(rows, drafts) if width > 1 else (None, None, None)
        if rows.prompt:  # the scored prompt positions' next tokens
            up = Upload()
            chosen = up.send(device)(up.add([seq.token_ids[p + 1] for seq, p in rows.prompt]))
        if staged is None and not rows.prompt and all(m.params.plain_greedy for _, m in rows.members):
            return self._plain_greedy(rows, argmax_of(step_logits), num_drafts, tokens_in)
        sample_logits = logits[:S * width].view(S, width, V)
        params = [m.params for _, m in rows.members]
        if staged is None and all(p.plain_draws for p in params) and not all(p.greedy for p in params):
            tokens, accepted = self._plain(rows, sample_logits, num_drafts, tokens_in, probs_in)
        else:
            seq_of, extra = [i for i in range(S) for _ in range(width)], list(range(width)) * S
            batch = RowBatch([m for _, m in rows.members], seq_of, extra, self.eos_token_ids, device,
                             self._mask(rows, staged, device), self.counts)
            tokens, accepted = verify(batch, sample_logits, num_drafts, tokens_in, probs_in,
                                      None if top is None else top[:S * width].view(S, width))
        back = Readback()
        handles = {"tokens": back.add(tokens)}
        if accepted is not None:
            handles["accepted"] = back.add(accepted)
        k = max((m.params.logprobs for _, m in rows.members if m.params.logprobs is not None), default=None)
        if k is not None:  # not in the plain greedy branch: its members ask for no logprobs
            handles["logprobs"] = [back.add(t) for t in top_logprobs(sample_logits.log_softmax(-1), tokens, k)]
        if rows.prompt:
            k_prompt = max(seq.params.prompt_logprobs for seq, _ in rows.prompt)
            raw = logits[S * width:].log_softmax(-1)
            handles["prompt"] = [back.add(t) for t in top_logprobs(raw, chosen, k_prompt)]
        fetched = back.fetch()
        return StepResult(self._sampled(rows, fetched, handles), self._prompt_logprobs(rows, fetched, handles))

    def _plain(self, rows: StepRows, logits: torch.Tensor, num_drafts: torch.Tensor | None,
               drafts: torch.Tensor | None, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`verify` for members that all draw plainly, some sampling: their settings in one copy, then plain_verify
        (compiled where the steps are), with every draft counted and a q where drafts come without."""
        members, up = [m for _, m in rows.members], Upload()
        sent = draw_settings(up, [m.params for m in members], [m.seed for m in members],
                             [m.num_tokens for m in members])
        got = up.send(logits.device)
        if drafts is not None:
            S, K = drafts.shape
            num_drafts = torch.full((S,), K, device=logits.device) if num_drafts is None else num_drafts
            q = logits.new_zeros(S, K, logits.shape[-1]) if q is None else q  # no sampled member drafted
        return self.plain_verify(logits, *map(got, sent), num_drafts, drafts, q)

    @staticmethod
    def _plain_greedy(rows: StepRows, tokens: torch.Tensor, num_drafts: torch.Tensor | None,
                      drafts: torch.Tensor | None) -> StepResult:
        """Members with nothing to process: each row's argmax as it is, the drafts checked against it
        as `verify` does; the tokens and how many drafts each member keeps read in one copy."""
        if rows.width == 1:  # no drafts: the tokens are all there is to read
            return StepResult({m: Sampled([t], None) for (_, m), t in zip(rows.members, tokens.tolist())}, {})
        tokens = tokens.view(len(rows.members), rows.width)
        read = torch.cat([tokens, greedy_accepted(tokens, num_drafts, drafts)[:, None]], 1).tolist()
        return StepResult({m: Sampled(row[:row[-1] + 1], None, s.num_drafts)
                           for (s, m), row in zip(rows.members, read)}, {})

    @staticmethod
    def _member_drafts(rows: StepRows, drafts: "Drafts") -> tuple[torch.Tensor | None, torch.Tensor,
                                                                   torch.Tensor | None]:
        """Each member's draft count, drafts and their distributions ([S], [S, K], [S, K, V]): the
        drafter's own where each member drafted all K in a row of its own, in order (count None: all
        real; one sequence, most decode batches); else gathered, a stand-in row where a member has
        none (never compared), in one copy."""
        index = [drafts.row(s) if s.num_drafts else 0 for s, _ in rows.members]
        counts = [s.num_drafts for s, _ in rows.members]
        if len(index) == len(drafts.seqs) and index == list(range(len(index))) and min(counts) == rows.width - 1:
            return None, drafts.tokens, drafts.probs
        up = Upload()
        sent = up.add(counts), up.add(index)
        got = up.send(drafts.tokens.device)
        num_drafts, index = got(sent[0]), got(sent[1])
        probs = drafts.probs.index_select(0, index) if drafts.probs is not None else None
        return num_drafts, drafts.tokens.index_select(0, index), probs

    def stage(self, rows: StepRows, drafts: "Drafts | None") -> "StagedDrafts | None":
        """Start copying the constrained members' drafts to the host, before the target's forward is
        queued: the copy then waits for drafting only, and the masks after each draft are filled on
        the host while the forward runs (`__call__`). None when no member is constrained."""
        members = [(i, s, m) for i, (s, m) in enumerate(rows.members) if m.constraint and m.constraint.active]
        if not members or self.structured is None:
            return None
        drafting = [s for _, s, _ in members if s.num_drafts]
        if not drafting:
            return StagedDrafts(members, {}, None, None)
        index = torch.tensor([drafts.row(s) for s in drafting], device=drafts.tokens.device)
        source = drafts.tokens.index_select(0, index)
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
        host.copy_(source, non_blocking=True)
        done = torch.cuda.Event() if source.is_cuda else None
        if done is not None:
            done.record()
        return StagedDrafts(members, {s.seq.seq_id: j for j, s in enumerate(drafting)}, host, done)

    def _mask(self, rows: StepRows, staged: "StagedDrafts | None", device: torch.device) -> torch.Tensor | None:
        """The grammar bitmask of every verify row, filled on the host for the whole batch at once
        (None when no member is constrained)."""
        if staged is None:
            return None
        if staged.done is not None:
            staged.done.synchronize()
        drafts = staged.tokens.tolist() if staged.tokens is not None else []
        bitmask = self.structured.bitmask(
            [(m.constraint, m.token_ids[-UTF8_GRACE:], drafts[staged.row[s.seq.seq_id]][:s.num_drafts]
              if s.num_drafts else [], i * rows.width) for i, s, m in staged.members],
            len(rows.members) * rows.width)
        return bitmask.to(device, non_blocking=True)

    @staticmethod
    def _sampled(rows: StepRows, fetched: list[list], got: dict) -> dict[Sequence, Sampled]:
        tokens = fetched[got["tokens"]]
        accepted = fetched[got["accepted"]] if "accepted" in got else [0] * len(tokens)
        sampled = {}
        for i, (s, member) in enumerate(rows.members):
            n = int(accepted[i]) + 1
            ids = [int(t) for t in tokens[i][:n]]
            k = member.params.logprobs
            lps = None
            if k is not None:
                chosen, top_ids, top_vals = (fetched[h][i] for h in got["logprobs"])
                lps = [{**{int(t): v for t, v in zip(top_ids[j][:k], top_vals[j][:k])}, ids[j]: chosen[j]}
                       for j in range(n)]
            sampled[member] = Sampled(ids, lps, s.num_drafts)
        return sampled

    @staticmethod
    def _prompt_logprobs(rows: StepRows, fetched: list[list], got: dict) -> dict[Sequence, list[dict[int, float]]]:
        out: dict[Sequence, list[dict[int, float]]] = {}
        if not rows.prompt:
            return out
        chosen, top_ids, top_vals = (fetched[h] for h in got["prompt"])
        for i, (seq, p) in enumerate(rows.prompt):
            k = seq.params.prompt_logprobs
            entry = {int(t): v for t, v in zip(top_ids[i][:k], top_vals[i][:k])}
            entry[seq.token_ids[p + 1]] = chosen[i]
            out.setdefault(seq, []).append(entry)
        return out
