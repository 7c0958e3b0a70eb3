"""Tokens -> what requests see: incremental detokenization, stop strings, logprobs, metrics, as
per-step deltas (`RequestOutput`s holding only what is new). `LLM.generate` adds them up; the server
and the CLI stream them."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from stepflash.engine.scheduler import SeqUpdate
from stepflash.engine.sequence import Sequence
from stepflash.outputs import CompletionOutput, RequestMetrics, RequestOutput, SpecStats
from stepflash.sampling import SamplingParams
from stepflash.tokenizer import IncrementalDetokenizer, Tokenizer


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`: text
    that may still grow into a marker (a stop string, a tag), so a stream holds it back."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


@dataclass
class SeqText:
    """One completion's text state: decoded text not yet shown (it may begin a stop string)."""

    detokenizer: IncrementalDetokenizer
    pending: str = ""
    finished: bool = False


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    texts: dict[int, SeqText] = field(default_factory=dict)  # completion index -> its text state
    prompt_logprobs_started: bool = False

    @property
    def finished(self) -> bool:
        return len(self.texts) == self.params.n and all(t.finished for t in self.texts.values())


class OutputProcessor:
    """Owns every request's text state and metrics; the engine-wide MTP statistics too."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.spec = SpecStats()

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            arrival: float) -> None:
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, RequestMetrics(arrival))

    def process(self, updates: list[SeqUpdate], now: float
                ) -> tuple[list[RequestOutput], list[tuple[Sequence, str]]]:
        """Deltas for the requests the updates touch, and the sequences a stop string ended, with
        the stop string (the scheduler must finish them)."""
        changed: dict[str, tuple[RequestState, list[CompletionOutput], list]] = {}
        stopped = []
        for u in updates:
            state = self.requests[u.seq.request_id]
            self._record(state, u, now)
            prompt_lps = self._prompt_logprobs(state, u)
            if not prompt_lps and not u.new_token_ids and not u.seq.finished:
                continue
            _, completions, request_lps = changed.setdefault(state.request_id, (state, [], []))
            request_lps += prompt_lps
            if u.new_token_ids or u.seq.finished:
                completion = self._completion(state, u)
                if u.seq.finish_reason is None and completion.finish_reason is not None:
                    stopped.append((u.seq, completion.stop_reason))
                completions.append(completion)
        outputs = [self._output(state, completions, lps or None, now) for state, completions, lps in changed.values()]
        return outputs, stopped

    @staticmethod
    def _prompt_logprobs(state: RequestState, u: SeqUpdate) -> list:
        """New prompt logprobs, led by None for the first prompt token (nothing scores it) once the
        first are reported, or once the first token is (a one-token prompt scores nothing)."""
        if state.params.prompt_logprobs is None or u.seq.index != 0:
            return []
        new = list(u.new_prompt_logprobs or [])
        if not state.prompt_logprobs_started and (new or u.new_token_ids):
            state.prompt_logprobs_started = True
            new.insert(0, None)
        return new

    def abort(self, request_id: str, now: float) -> RequestOutput | None:
        """The final delta of a request stopped from outside: every unfinished completion ends."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        completions = []
        for index, text in state.texts.items():
            if not text.finished:
                text.finished = True
                completions.append(CompletionOutput(index, text.pending + text.detokenizer.flush(), [], None,
                                                    "abort"))
        for index in range(state.params.n):
            if index not in state.texts:
                state.texts[index] = SeqText(self._detokenizer(state), finished=True)
                completions.append(CompletionOutput(index, "", [], None, "abort"))
        return self._output(state, completions, None, now)

    def _record(self, state: RequestState, u: SeqUpdate, now: float) -> None:
        m = state.metrics
        m.first_scheduled_time = m.first_scheduled_time or now
        if u.seq.index == 0:
            m.num_cached_tokens = u.seq.num_cached_tokens
        if u.new_token_ids:
            m.first_token_time = m.first_token_time or now
            m.num_generated_tokens += len(u.new_token_ids)
        if u.num_drafts:
            for stats in (m.spec, self.spec):
                stats.record(u.num_drafts, u.num_accepted)

    def _detokenizer(self, state: RequestState) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens=state.params.skip_special_tokens)

    def _completion(self, state: RequestState, u: SeqUpdate) -> CompletionOutput:
        """The new text of one completion: stop strings end it at the token that completes them
        (later tokens of the step are dropped); text that may begin one is held back."""
        text = state.texts.get(u.seq.index)
        if text is None:  # its first tokens
            text = state.texts[u.seq.index] = SeqText(self._detokenizer(state))
        stops, params = state.params.stop_strings, state.params
        tokens, logprobs = u.new_token_ids, u.new_logprobs
        feed = [[t] for t in tokens] if stops else [tokens]
        for i, piece in enumerate(feed):
            if not piece:
                continue
            text.pending += text.detokenizer.feed(piece)
            hits = [(at, s) for s in stops if (at := text.pending.find(s)) >= 0]
            if hits:  # what follows the stop string (in text or in held-back bytes) is not shown
                at, stop = min(hits)
                shown = text.pending[:at + (len(stop) if params.include_stop_str_in_output else 0)]
                text.pending, text.finished = "", True
                logprobs = logprobs[:i + 1] if logprobs is not None else None
                return CompletionOutput(u.seq.index, shown, tokens[:i + 1], logprobs, "stop", stop)
        if u.seq.finish_reason is not None:
            shown, text.pending = text.pending + text.detokenizer.flush(), ""
            text.finished = True
        else:
            cut = len(text.pending) - partial_suffix(text.pending, stops)
            shown, text.pending = text.pending[:cut], text.pending[cut:]
        return CompletionOutput(u.seq.index, shown, list(tokens), logprobs, u.seq.finish_reason, u.seq.stop_reason)

    def _output(self, state: RequestState, completions: list[CompletionOutput], prompt_lps: list | None,
                now: float) -> RequestOutput:
        finished = state.finished
        if finished:
            state.metrics.finished_time = now
            del self.requests[state.request_id]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, prompt_lps, completions,
                             finished, state.metrics)
