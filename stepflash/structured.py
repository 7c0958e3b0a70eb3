"""Constrained decoding: the answer follows a grammar (JSON Schema, regex, choice, Lark, Step's XML
tool calls), reasoning stays free, and a thinking budget closes the reasoning when it is spent.

`Grammar` is the small interface the engine needs of a backend's matcher (consume, validate,
rollback, is finished, error; masks are filled for a whole batch by the backend in one call);
`GuidanceBackend` implements it with llguidance (an optional extra: `pip install
'stepflash[structured]'`). `Constraint` is one sequence's state: inside the reasoning block it
counts tokens and, once the budget is spent (and the last UTF-8 character is complete), allows only
`</think>`; after `</think>` the grammar governs. It advances only on accepted tokens (the
scheduler's `update`); masks for MTP verify rows walk the drafts without changing it.
`StructuredOutputs` (the engine's) turns requests into constraints and a step's rows into one
int32 bitmask (bit j of word i allows token 32 i + j; -1 rows allow everything), applied to the
logits on the device by `apply_bitmask` before greedy choice and rejection sampling alike.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from stepflash.sampling import SamplingParams, StructuredOutputsParams
from stepflash.tokenizer import Tokenizer

WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"  # between JSON tokens: bounded, so no padding to max_tokens
UTF8_GRACE = 4  # tokens a spent budget waits for a UTF-8 character to complete before forcing </think>
THINK_START, THINK_END = "<think>", "</think>"


class Grammar(Protocol):
    """One request's matcher. Never raises for bad tokens: it enters a sticky error state."""

    def consume(self, tokens: list[int]) -> bool: ...
    def validate(self, tokens: list[int]) -> int: ...  # length of the acceptable prefix; state unchanged
    def rollback(self, num_tokens: int) -> None: ...
    def is_finished(self) -> bool: ...  # only end-of-sequence is left
    def error(self) -> str | None: ...
    def fork(self) -> Grammar: ...


class GrammarBackend(Protocol):
    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """A matcher at the grammar's start (fork it per request); ValueError names what is wrong."""
    def fill_masks(self, items: list[tuple[Grammar, int, list[int]]], bitmask: torch.Tensor) -> None:
        """For each (grammar, row, drafts): the mask at its state in `row` and after drafts[:i + 1] in
        row + 1 + i (stopping at the first invalid draft), for the whole batch in one call."""


# -- llguidance --------------------------------------------------------------------------------------
class GuidanceGrammar:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def consume(self, tokens: list[int]) -> bool:
        return all(self.matcher.consume_token(t) for t in tokens)  # consume_tokens refuses EOS once stopped

    def validate(self, tokens: list[int]) -> int:
        return self.matcher.validate_tokens(tokens)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error().split("\n")[0]  # the rest is a parser state dump

    def fork(self) -> GuidanceGrammar:
        return GuidanceGrammar(self.matcher.deep_copy())


class GuidanceBackend:
    """llguidance over the model's tokenizer.json. Compiled grammars are cached by their spec, as a
    matcher at the start that requests fork (a fork shares the compiled grammar: ~1 µs, not ~1 ms)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256) -> None:
        try:
            import llguidance  # not llguidance.torch: its torch.compile decorator costs seconds at import
        except ImportError:
            raise ValueError("structured outputs (response_format, strict tools, structured_outputs) need "
                             "llguidance: pip install 'stepflash[structured]'") from None
        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids))
        self.executor = llguidance.LLExecutor()  # threads: 80% of the CPUs, up to 32
        self.cache: OrderedDict[str, GuidanceGrammar] = OrderedDict()
        self.cache_size = cache_size

    def compile(self, spec: StructuredOutputsParams) -> GuidanceGrammar:
        key = spec.key
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        kind, grammar = self._grammar(spec)
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"invalid {kind}: {messages[0].strip()}")
        start = GuidanceGrammar(self.llg.LLMatcher(self.tokenizer, grammar))
        if start.error() is not None:
            raise ValueError(f"invalid {kind}: {start.error()}")
        self.cache[key] = start
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return start

    def _grammar(self, spec: StructuredOutputsParams) -> tuple[str, str]:
        M = self.llg.LLMatcher
        ws = {"whitespace_pattern": spec.whitespace_pattern} if spec.whitespace_pattern else None
        try:
            if spec.json is not None or spec.json_object:
                schema = spec.json if spec.json is not None else {"type": "object"}
                return "JSON schema", M.grammar_from_json_schema(schema, defaults={"whitespace_pattern": WHITESPACE},
                                                                 overrides=ws)
            if spec.regex is not None:
                return "regex", M.grammar_from_regex(spec.regex)
            if spec.choice is not None:
                return "choice", self.llg.grammar_from("choice", json.dumps(spec.choice))
            if spec.grammar is not None:
                return "grammar", M.grammar_from_lark(spec.grammar)
            return "tool schema", M.grammar_from_lark(tool_call_grammar(**spec.tool_calls,
                                                                        whitespace=spec.whitespace_pattern))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # malformed schemas, grammars or tools
            raise ValueError(f"invalid structured output: {e}") from None

    def fill_masks(self, items: list[tuple[Grammar, int, list[int]]], bitmask: torch.Tensor) -> None:
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        where = (bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
        plain = [(g.matcher, row) for g, row, drafts in items if not drafts]  # the draft call wants drafts
        drafted = [(g.matcher, row, drafts) for g, row, drafts in items if drafts]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, *where)
        if drafted:
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, *where)


# -- Step's XML tool calls -----------------------------------------------------------------------------
def tool_call_grammar(tools: list[dict], mode: str, parallel: bool, whitespace: str | None = None) -> str:
    """A Lark grammar for Step-3.5 tool calls (step3p5-architecture.md section 5) whose arguments follow
    each tool's parameter schema: string parameters are free text up to the closing tag (within
    min/maxLength, or matching an anchored `pattern`; `format` is an annotation, as JSON Schema has
    it), string enums one of their values, the others JSON of their schema (`%json`). Parameters
    come in schema order; required ones must appear. mode "required": only calls (at least one);
    "auto": free text, then optionally calls; `parallel` False: at most one call."""
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"] if "function" in tool else tool
        params = function.get("parameters") or {}
        properties = params.get("properties") or {}
        required = set(params.get("required") or [])
        parts = []
        for j, (name, schema) in enumerate(properties.items()):
            rule = f"f{i}_p{j}"
            value = _value(rule, name, schema, params, whitespace, rules)
            rules.append(f"{rule}: {_lit(f'<parameter={name}>' + chr(10))} {value}")
            parts.append(rule if name in required else f"{rule}?")
        rules.append(f"f{i}: {_lit('<function=' + function['name'] + '>' + chr(10))} {' '.join(parts)}")
    functions = " | ".join(f"f{i}" for i in range(len(tools)))
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = f"start: /\\n{{0,2}}/ {calls}" if mode == "required" else f"start: TEXT ({calls})?\nTEXT: /(.|\\n)*/"
    return "\n".join([start, f'call: <tool_call> "\\n" ({functions}) "</function>\\n" </tool_call>', *rules]) + "\n"


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _value(rule: str, name: str, schema: Any, root: dict, whitespace: str | None, rules: list[str]) -> str:
    """The grammar of one parameter's value and the text around it, up to `</parameter>\\n`."""
    close = _lit("\n</parameter>\n")
    schema = schema if isinstance(schema, dict) else {}
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
        return f"({' | '.join(_lit(v) for v in schema['enum'])}) {close}"
    if kind == "string" or (isinstance(kind, list) and "string" in kind and not schema.get("enum")):
        # lazy: the value ends at the first closing tag
        rules.append(f"{rule}_v[lazy]: /{_raw_text(name, schema)}\\n<\\/parameter>/")
        return f'{rule}_v "\\n"'
    sub = {**schema, **{k: root[k] for k in ("$defs", "definitions") if k in root}}
    sub["x-guidance"] = {"whitespace_pattern": whitespace or WHITESPACE}
    return f"%json{json.dumps(sub)} {close}"


def _raw_text(name: str, schema: dict) -> str:
    """The regex of a string parameter's raw text: any text within min/maxLength, or the whole of its
    `pattern`, which must then be anchored (^...$; an unanchored one would let the value run on past
    its closing tag)."""
    pattern = schema.get("pattern")
    if pattern is None:
        low, high = schema.get("minLength", 0), schema.get("maxLength", "")
        return "(.|\\n)" + ("*" if (low, high) == (0, "") else f"{{{low},{high}}}")
    if not (isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$")) \
            or "minLength" in schema or "maxLength" in schema:
        raise ValueError(f"tool parameter {name!r}: a string 'pattern' must be anchored (^...$) and not combined "
                         "with minLength/maxLength (string values are raw text)")
    return "(?:" + re.sub(r"(?<!\\)/", r"\/", pattern[1:-1]) + ")"  # a slash ends Lark's /regex/ unless escaped


# -- per-sequence state --------------------------------------------------------------------------------
@dataclass
class Constraint:
    """One sequence's constraint (its state advances only on accepted tokens)."""

    grammar: Grammar | None
    reasoning: bool  # inside the reasoning block (the prompt opened it)
    budget: int | None  # reasoning tokens before </think> is forced
    thought: int = 0  # reasoning tokens generated so far
    error: str | None = None

    @property
    def active(self) -> bool:
        """Whether it still masks anything (a budget alone ends with the reasoning)."""
        return self.grammar is not None or (self.reasoning and self.budget is not None)

    def accept(self, token: int, think_end: int | None) -> bool:
        """Advance by one accepted token; False (with `error` set) when the grammar rejects it."""
        if self.reasoning:
            if token == think_end:
                self.reasoning = False
            else:
                self.thought += 1
            return True
        if self.grammar is not None and not self.grammar.consume([token]):
            self.error = f"structured output failed: {self.grammar.error() or f'token {token} was not allowed'}"
            return False
        return True

    def fork(self) -> Constraint:
        return replace(self, grammar=self.grammar.fork() if self.grammar is not None else None)


@dataclass
class RowPlan:
    """Masks for one sequence's rows 0..len(drafts): rows forcing </think>, and the row where the
    grammar's masks begin (with the drafts that follow it)."""

    forced: list[int] = field(default_factory=list)
    grammar_row: int | None = None
    grammar_drafts: list[int] = field(default_factory=list)


class StructuredOutputs:
    """The engine's constraint factory and mask builder. The backend is made on first use, so an
    engine without llguidance serves every unconstrained request (and thinking budgets)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.think_start = tokenizer.token_to_id(THINK_START)
        self.think_end = tokenizer.token_to_id(THINK_END)
        self.words = (vocab_size + 31) // 32
        self._backend: GrammarBackend | None = None

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = GuidanceBackend(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._backend

    def constraint_for(self, params: SamplingParams, prompt_ids: list[int]) -> Constraint | None:
        """The request's constraint (None when it has none); ValueError names a bad grammar."""
        spec, budget = params.structured_outputs, params.thinking_token_budget
        if spec is None and budget is None:
            return None
        grammar = self.backend.compile(spec).fork() if spec is not None else None
        reasoning = self._opens_reasoning(prompt_ids)
        if grammar is None and not reasoning:
            return None
        return Constraint(grammar, reasoning, budget if reasoning else None)

    def _opens_reasoning(self, ids: list[int]) -> bool:
        """The prompt ends inside a reasoning block: its last <think> comes after its last </think>."""
        if self.think_start is None or self.think_end is None:
            return False
        last = {t: i for i, t in enumerate(ids) if t in (self.think_start, self.think_end)}
        return last.get(self.think_start, -1) > last.get(self.think_end, -1)

    def plan(self, c: Constraint, tail: list[int], drafts: list[int]) -> RowPlan:
        """Walk the drafts from the sequence's state (nothing changes): the reasoning rows, the row
        where </think> is forced once the budget is spent, and the rows the grammar masks."""
        plan, thought = RowPlan(), c.thought
        for j in range(len(drafts) + 1):
            if not c.reasoning or (j and drafts[j - 1] == self.think_end):
                if c.grammar is not None:
                    rest = drafts[j:]
                    ends = [k for k, t in enumerate(rest) if t in self.eos_token_ids]
                    plan.grammar_row, plan.grammar_drafts = j, rest[:ends[0]] if ends else rest  # no post-EOS drafts
                return plan
            if c.budget is not None and thought >= c.budget and self._char_complete(tail + drafts[:j], thought - c.budget):
                plan.forced.append(j)
            if j < len(drafts) and drafts[j] != self.think_end:
                thought += 1
        return plan

    def _char_complete(self, tokens: list[int], over: int) -> bool:
        """The text so far does not end inside a UTF-8 character (or the grace is used up)."""
        return over >= UTF8_GRACE or not self.tokenizer.decode(tokens[-UTF8_GRACE:]).endswith("\ufffd")

    def bitmask(self, rows: list[tuple[Constraint, list[int], list[int], int]], num_rows: int) -> torch.Tensor:
        """[num_rows, words] int32 on the host for (constraint, tail tokens, drafts, first row) per
        constrained sequence; all other rows -1. One backend call fills every grammar row."""
        bitmask = torch.full((num_rows, self.words), -1, dtype=torch.int32)
        items = []
        for c, tail, drafts, row in rows:
            p = self.plan(c, tail, drafts)
            for j in p.forced:
                bitmask[row + j] = 0
                bitmask[row + j, self.think_end // 32] = _bit(self.think_end % 32)
            if p.grammar_row is not None:
                items.append((c.grammar, row + p.grammar_row, p.grammar_drafts))
        if items:
            self.backend.fill_masks(items, bitmask)
        for grammar, row, _ in items:
            if grammar.error() is not None:  # the sampled token fails in `accept`, which ends the request
                bitmask[row] = -1
        return bitmask

    def draft_bitmask(self, rows: list[tuple[Constraint, list[int], list[int], int]], num_rows: int) -> torch.Tensor:
        """MTP drafting: [num_rows, words] for (constraint, tail tokens, drafts so far, row) per
        constrained sequence, each row masked for the position after its drafts (where its next
        draft is drawn); all other rows -1. Every sequence has as many drafts (the depth)."""
        width = len(rows[0][2]) + 1
        full = self.bitmask([(c, tail, drafts, row * width) for c, tail, drafts, row in rows], num_rows * width)
        return full[width - 1::width]


def _bit(j: int) -> int:
    """Word value with only bit j set, as a signed int32."""
    return (1 << j) - (1 << 32 if j == 31 else 0)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Disallowed tokens' logits to -inf; logits [R, V], bitmask [R, ceil(V / 32)] int32 (on the device)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))
