"""SamplingParams: what a request asks of the sampler, validated when it is made."""

import json
import math
from dataclasses import dataclass, field
from typing import Any

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy


@dataclass
class StructuredOutputsParams:
    """vLLM's shape: exactly one of `json` (a JSON Schema, as a dict or its JSON text), `regex`,
    `choice` (the output is one of these strings), `grammar` (Lark, llguidance's dialect),
    `json_object` (any JSON object) or `tool_calls` (Step's XML tool calls: set by the server from
    `tools` / `tool_choice`). `whitespace_pattern` replaces the regex of the whitespace JSON allows
    between tokens (default: at most 16 whitespace characters, so a model cannot pad until
    max_tokens). Compiled and checked by the engine when the request is made."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    tool_calls: dict[str, Any] | None = None  # {"tools": [...], "mode": "required" | "auto", "parallel": bool}
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "tool_calls")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object"
                             f" (got {', '.join(given) or 'none'})")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON Schema (an object)")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")

    @property
    def key(self) -> str:
        """Identifies the grammar (the compiled-grammar cache key)."""
        return json.dumps([self.json, self.regex, self.choice, self.grammar, self.json_object, self.tool_calls,
                           self.whitespace_pattern], sort_keys=True)


@dataclass
class SamplingParams:
    """vLLM-style sampling parameters. `temperature=0` (or below 1e-5) is greedy.

    Penalties follow the usual conventions: `repetition_penalty` divides positive (multiplies
    negative) logits of tokens seen in the prompt or output; `presence_penalty` and
    `frequency_penalty` subtract per output token (OpenAI). `logprobs=k` returns the top-k
    log-probabilities of the model's distribution per generated token, the chosen token always
    included; `prompt_logprobs=k` does the same for prompt positions (the first is None).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    structured_outputs: StructuredOutputsParams | None = None  # the answer (after reasoning) follows a grammar
    thinking_token_budget: int | None = None  # reasoning tokens before the engine itself closes the reasoning
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one below 1e-5 (as vLLM): dividing fp32 logits by it overflows."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Any repetition, presence or frequency penalty."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def plain_draws(self) -> bool:
        """Tokens are the raw logits' argmax, or draws from them at the temperature after top-k / top-p /
        min-p: no bias, banned stop tokens or penalty to apply first, nothing that depends on the
        tokens before (MTP drafting in one call, which leaves the filters to the verify; the sampler's
        compiled verify)."""
        return not self.logit_bias and not self.min_tokens and not self.penalised

    @property
    def filtered(self) -> bool:
        """Sampled through top-k, top-p or min-p."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits: no bias, banned stop tokens, penalty or logprobs to apply first."""
        return self.greedy and self.logprobs is None and self.plain_draws

    def _validate(self) -> None:
        checks = [
            (_int(self.n) and self.n >= 1, "n must be an integer >= 1"),
            (_number(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
             "top_k must be -1 (off) or an integer >= 1"),
            (_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (_number(self.repetition_penalty) and 1e-4 <= self.repetition_penalty <= 1e4,
             "repetition_penalty must be in [1e-4, 1e4]"),  # in fp32, logits are divided and multiplied by it
            (_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "presence_penalty must be in [-2, 2]"),
            (_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2]"),
            (self.seed is None or (_int(self.seed) and -2**63 <= self.seed < 2**63),
             "seed must be an integer in [-2**63, 2**63) (64-bit)"),
            (self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens must be an integer >= 1"),
            (_int(self.min_tokens) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
             "min_tokens must be in [0, max_tokens]"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop must be non-empty strings"),
            (all(_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "logprobs must be in [0, 20]"),
            (all(_int(t) and t >= 0 and _number(b) and -100 <= b <= 100 for t, b in (self.logit_bias or {}).items()),
             "logit_bias must map token ids to numbers in [-100, 100]"),  # OpenAI's range
            (self.prompt_logprobs is None or (_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs must be in [0, 20]"),
            (self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "structured_outputs must be a StructuredOutputsParams"),
            (self.thinking_token_budget is None or (_int(self.thinking_token_budget) and self.thinking_token_budget >= 0),
             "thinking_token_budget must be an integer >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameters: {message}")


def _number(x: object) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
