"""One generated sequence: its tokens, KV blocks and sampling identity. The scheduler is its only
writer; text, stop strings and logprobs are the output processor's (engine/output.py)."""

import enum
from dataclasses import dataclass, field

from stepflash.engine.kv_cache import BlockTables
from stepflash.multimodal import PlacedImage
from stepflash.sampling import SamplingParams
from stepflash.structured import Constraint


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DRAINING = "draining"  # finished; its MTP caches catch up one more step before its blocks are freed
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    seed: int  # the sampler's random draws are a function of (seed, position): see engine/sampler.py
    blocks: BlockTables = field(default_factory=BlockTables)
    images: list[PlacedImage] = field(default_factory=list)  # in prompt order, placeholders expanded
    status: Status = Status.WAITING
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_prompt_scored: int = 0  # prompt positions whose logprobs were reported (prompt_logprobs)
    num_forks: int = 0  # n > 1: siblings still to fork off this sequence once its prompt is computed
    constraint: Constraint | None = None  # structured output / thinking budget (advanced by the scheduler)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

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
        return self.status in (Status.DRAINING, Status.FINISHED)

    def tokens_left(self, max_model_len: int) -> int:
        """Tokens it may still generate (max_tokens and the context both bound it)."""
        left = max_model_len - self.num_tokens
        if self.params.max_tokens is not None:
            left = min(left, self.params.max_tokens - self.num_output_tokens)
        return left

    def stop_reason_for(self, token: int, eos_token_ids: frozenset[int], max_model_len: int
                        ) -> tuple[str, int | None] | None:
        """(finish reason, stop reason) if `token`, just appended, ends the sequence."""
        p = self.params
        may_stop = self.num_output_tokens >= p.min_tokens
        if may_stop and token in p.stop_token_ids:
            return "stop", token
        if may_stop and token in eos_token_ids and not p.ignore_eos:
            return "stop", None
        if self.tokens_left(max_model_len) <= 0:
            return "length", None
        return None
