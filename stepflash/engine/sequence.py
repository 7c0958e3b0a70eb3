"""One generated sequence: its tokens, KV blocks, sampling state and streamed text."""

import enum
from dataclasses import dataclass, field

import torch

from stepflash.engine.kv_cache import BlockTables
from stepflash.sampling import SamplingParams
from stepflash.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    blocks: BlockTables = field(default_factory=BlockTables)
    status: Status = Status.WAITING
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""  # decoded output, up to what is safe to show (stop strings may still cut it)
    pending_text: str = ""  # decoded but held back: it might be the start of a stop string
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    draft_ids: list[int] = field(default_factory=list)  # MTP drafts for the next verify step
    draft_probs: torch.Tensor | None = None  # [len(draft_ids), vocab]: the q they were sampled from (None: greedy)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Positions start..end-1 of the token ids followed by the drafts (no copy of the rest)."""
        n = len(self.token_ids)
        if end <= n:
            return self.token_ids[start:end]
        return self.token_ids[start:] + self.draft_ids[max(start - n, 0):end - n]

    @property
    def num_computed(self) -> int:
        return self.blocks.num_computed

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token still lacks KV (prompt, or recompute after preemption)."""
        return self.num_tokens - self.num_computed > 1

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
