"""What the engine returns: vLLM-style RequestOutput / CompletionOutput plus per-request metrics."""

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Speculative decoding: drafts proposed and accepted (per engine, or per request)."""

    num_verify_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_verify_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        width = max(len(self.drafted_per_position), num_drafts)
        self.drafted_per_position += [0] * (width - len(self.drafted_per_position))
        self.accepted_per_position += [0] * (width - len(self.accepted_per_position))
        for i in range(num_drafts):
            self.drafted_per_position[i] += 1
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per verify step (accepted drafts + the target's own token)."""
        return 1 + self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    spec: SpecStats = field(default_factory=SpecStats)  # MTP drafts and acceptance (all of the request's samples)

    @property
    def ttft(self) -> float | None:
        """Time to first token (seconds since arrival)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        elapsed = self.finished_time - self.first_token_time
        return (self.num_generated_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" (its grammar failed)
    stop_reason: int | str | None = None  # the stop string or token id that ended it; with "error", why

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output; `LLMEngine.step` returns deltas (each field holds what is new since the
    last step, `outputs` only the completions that changed), which `add` accumulates."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(repr=False, default=None)

    def add(self, delta: "RequestOutput") -> None:
        """Append a later delta of the same request."""
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            if c.index not in mine:
                mine[c.index] = CompletionOutput(c.index, "", [], [] if c.logprobs is not None else None)
            acc = mine[c.index]
            acc.text += c.text
            acc.token_ids += c.token_ids
            if c.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + c.logprobs
            acc.finish_reason, acc.stop_reason = c.finish_reason, c.stop_reason
        self.outputs = sorted(mine.values(), key=lambda c: c.index)
        if delta.prompt_logprobs:
            self.prompt_logprobs = (self.prompt_logprobs or []) + delta.prompt_logprobs
        self.finished, self.metrics = delta.finished, delta.metrics
