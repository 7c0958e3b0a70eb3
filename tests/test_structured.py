"""Structured outputs: grammars (llguidance) over the real decoding path, free reasoning with a thinking
budget, exactness under MTP, and errors that stay with their request.

Models: a random tiny checkpoint (it writes noise, so every valid reply is the grammar's doing) and
scripted checkpoints whose greedy choice (and MTP drafts) follow a script that breaks the grammar."""

import json
import re
import sys
from collections import Counter

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from checkpoints import _SAMPLE_TEXT, write_checkpoint  # noqa: E402
from scripted import write_scripted_checkpoint  # noqa: E402
from stepflash import LLM, SamplingParams  # noqa: E402
from stepflash.models import default_model_dir  # noqa: E402
from stepflash.engine.sampler import RowBatch, verify  # noqa: E402
from stepflash.engine.sequence import Sequence  # noqa: E402
from stepflash.sampling import StructuredOutputsParams as SO  # noqa: E402
from stepflash.structured import UTF8_GRACE, Constraint, StructuredOutputs, apply_bitmask, tool_call_grammar  # noqa: E402
from stepflash.tokenizer import Tokenizer  # noqa: E402
from stepflash.train.configs import tiny_config  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
    "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["x"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "pos"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "days"], "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "Reply in JSON."}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def so(tok):
    return StructuredOutputs(tok, 4096, tok.eos_token_ids)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("random"), tiny_config())


@pytest.fixture(scope="module")
def llms(random_ckpt):
    return {mtp: LLM(random_ckpt, mtp=mtp) for mtp in (0, 3)}


def _answer(text: str) -> str:
    assert "</think>" in text, text
    return text.split("</think>", 1)[1]


# -- pieces ---------------------------------------------------------------------------------------------
def test_apply_bitmask_keeps_exactly_the_set_bits():
    V = 70
    allowed = [[0, 31, 32, 69], list(range(V))]
    mask = torch.zeros(2, 3, dtype=torch.int32)
    for r, ids in enumerate(allowed):
        for t in ids:
            mask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 wraps to the sign
    out = apply_bitmask(torch.randn(2, V), mask)
    assert [torch.isfinite(row).nonzero().flatten().tolist() for row in out] == allowed


def test_grammar_consume_validate_rollback(so, tok):
    g = so.backend.compile(SO(regex=r"[0-9]{3}-[a-z]{2}")).fork()
    assert so.backend.compile(SO(regex=r"[0-9]{3}-[a-z]{2}")) is so.backend.compile(SO(regex=r"[0-9]{3}-[a-z]{2}"))
    ids = tok.encode("123-ab")
    assert g.validate(ids + tok.encode("!")) == len(ids)
    assert g.consume(ids[:2]) and not g.is_finished()
    g.rollback(2)
    assert g.validate(ids) == len(ids)  # back at the start
    assert g.consume(ids) and g.is_finished() and g.error() is None
    fork = g.fork()
    assert not fork.consume(tok.encode("x")) and fork.error() and g.error() is None  # sticky, and only the fork's


def test_tool_call_grammar_follows_each_parameter_schema(so, tok):
    def valid(text, mode="required", parallel=True):
        g = so.backend.compile(SO(tool_calls={"tools": [TOOL], "mode": mode, "parallel": parallel})).fork()
        ids = tok.encode(text)
        return g.validate(ids) == len(ids) and g.consume(ids) and g.validate([tok.eos_token_ids[0]]) == 1

    call = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>")
    assert valid(call) and valid("\n" + call + "\n" + call)
    assert not valid(call + "\n" + call, parallel=False)
    assert not valid(call.replace("\n3\n", "\n9\n"))  # days above its maximum
    assert not valid(call.replace("\nc\n", "\nk\n"))  # unit outside its enum
    assert not valid(call.replace("New\nYork", "Amsterdam!"))  # city above maxLength
    assert not valid(call.split("<parameter=days>")[0] + "</function>\n</tool_call>")  # a required parameter missing
    assert not valid("Sure. " + call) and valid("Sure. " + call, mode="auto") and valid("No call.", mode="auto")


@pytest.mark.parametrize("slash", ["/", "\\/"])  # a slash, plain or escaped
def test_string_tool_parameters_take_an_anchored_pattern_and_any_format(so, tok, slash):
    tool = {"function": {"name": "book", "parameters": {"properties": {
        "code": {"type": "string", "pattern": f"^[A-Z]{{3}}{slash}[0-9]{{2}}$"},
        "when": {"type": "string", "format": "date-time"}}, "required": ["code", "when"]}}}
    g = so.backend.compile(SO(tool_calls={"tools": [tool], "mode": "required", "parallel": False}))

    def valid(code: str, when: str) -> bool:
        text = (f"<tool_call>\n<function=book>\n<parameter=code>\n{code}\n</parameter>\n<parameter=when>\n{when}"
                "\n</parameter>\n</function>\n</tool_call>")
        ids = tok.encode(text)
        return g.fork().validate(ids) == len(ids)

    assert valid("ABC/12", "2026-11-27T10:00:00Z") and valid("XYZ/00", "tomorrow at ten")  # format: annotation
    assert not valid("AB/12", "now") and not valid("ABC/123", "now") and not valid("ABC/12 ", "now")
    for pattern in ("[A-Z]+", "^[A-Z]+"):
        bad = {"function": {"name": "f", "parameters": {"properties": {"s": {"type": "string", "pattern": pattern}}}}}
        with pytest.raises(ValueError, match="must be anchored"):
            so.backend.compile(SO(tool_calls={"tools": [bad], "mode": "required", "parallel": False}))


def test_json_whitespace_is_capped(so, tok):
    """A degenerate model cannot pad JSON with whitespace until max_tokens: 16 characters per gap."""
    g = so.backend.compile(SO(json={"type": "object"})).fork()
    for gap, ok in ((" " * 16, True), ("\n" + " " * 15, True), (" " * 17, False)):
        ids = tok.encode("{" + gap + '"a": 1}')
        assert (g.validate(ids) == len(ids)) == ok, repr(gap)


@pytest.mark.parametrize("spec, needle", [
    (SO(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (SO(regex="[a-z"), "unclosed character class"),
    (SO(grammar="start: missing_rule"), "missing_rule"),
    (SO(tool_calls={"tools": [{"function": {"name": "f", "parameters": {"properties": {
        "s": {"type": "string", "pattern": "a+"}}}}}], "mode": "required", "parallel": True}), "'s'"),
])
def test_bad_grammars_are_refused_naming_the_problem(so, spec, needle):
    with pytest.raises(ValueError, match=needle):
        so.backend.compile(spec)


def test_without_llguidance_a_constrained_request_says_what_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    fresh = StructuredOutputs(tok, 4096, tok.eos_token_ids)
    with pytest.raises(ValueError, match=r"pip install 'stepflash\[structured\]'"):
        fresh.constraint_for(SamplingParams(structured_outputs=SO(regex="a")), tok.encode("x"))
    budget_only = fresh.constraint_for(SamplingParams(thinking_token_budget=2), tok.encode("<think>\n"))
    assert budget_only is not None and budget_only.grammar is None  # a budget needs no grammar library


def test_row_plan_walks_drafts_across_the_budget_and_the_end_of_reasoning(so, tok):
    think_end, eos = so.think_end, tok.eos_token_ids[0]
    a, b = tok.encode("a"), tok.encode("b")
    c = Constraint(None, reasoning=True, budget=2, thought=1)
    assert so.plan(c, a, [a[0], b[0], a[0]]).forced == [1, 2, 3]  # spent after one more reasoning token
    g = so.backend.compile(SO(regex="[0-9]+")).fork()
    c = Constraint(g, reasoning=True, budget=None)
    p = so.plan(c, a, [a[0], think_end, *tok.encode("12"), eos, *tok.encode("3")])
    assert p.forced == [] and p.grammar_row == 2 and p.grammar_drafts == tok.encode("12")  # no drafts past EOS
    assert so.plan(Constraint(g, reasoning=False, budget=None), a, []).grammar_row == 0


# -- the engine ---------------------------------------------------------------------------------------
def test_sampled_json_replies_follow_the_schema_after_a_spent_budget(llms):
    """20 sampled replies at temperature 1 from a model that writes noise, reasoning capped at 3 tokens."""
    params = [SamplingParams(temperature=1.0, max_tokens=400, seed=i, thinking_token_budget=3,
                             structured_outputs=SO(json=SCHEMA)) for i in range(20)]
    outs = llms[0].chat([CHAT] * 20, params)
    assert len({o.outputs[0].text for o in outs}) > 10
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert 3 <= c.token_ids.index(llms[0].engine.structured.think_end) <= 3 + UTF8_GRACE  # a whole last char
        jsonschema.validate(json.loads(_answer(c.text)), SCHEMA)


@pytest.mark.parametrize("spec, check", [
    (SO(json_object=True), lambda a: isinstance(json.loads(a), dict)),
    (SO(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda a: __import__("re").fullmatch(r"[0-9]{3}-[a-z]{2,4}", a)),
    (SO(choice=["yes", "no", "maybe"]), lambda a: a in ("yes", "no", "maybe")),
    (SO(grammar='start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'),
     lambda a: __import__("re").fullmatch(r"\(([1-9][0-9]?)(\+[1-9][0-9]?)*\)", a)),
])
def test_offline_json_object_regex_choice_and_lark(llms, spec, check):
    """Raw prompts that open no reasoning: the grammar governs from the first token. Six seeds; the
    noise model may not close a JSON string within max_tokens, so a reply that ran out of tokens
    goes unchecked, but at least two must finish."""
    outs = [o.outputs[0] for o in llms[3].generate(["a b c"] * 6, [
        SamplingParams(temperature=1.0, max_tokens=120, seed=s, structured_outputs=spec) for s in range(6)])]
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert len(finished) >= 2 and all(c.finish_reason in ("stop", "length") for c in outs)
    for c in finished:
        assert check(c.text), c.text


def test_greedy_under_a_grammar_is_the_same_with_and_without_mtp(llms):
    prompts = [[{"role": "user", "content": f"item {i}"}] for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=60, thinking_token_budget=2, structured_outputs=SO(json=SCHEMA))
    got = {mtp: [o.outputs[0].token_ids for o in llm.chat(prompts, params)] for mtp, llm in llms.items()}
    assert got[0] == got[3]
    assert llms[3].get_stats().spec.num_draft_tokens > 0


def test_constrained_sampling_keeps_its_distribution_under_mtp(llms):
    """A chi-square test of homogeneity between MTP-0 and MTP-3 samples of a 3-token regex (27 outcomes)."""
    params = [SamplingParams(temperature=1.0, max_tokens=8, seed=s, structured_outputs=SO(regex="[abc]{3}"))
              for s in range(300)]
    counts = {mtp: Counter(o.outputs[0].text for o in llm.generate(["x y"] * 300, params)) for mtp, llm in llms.items()}
    assert all(len(k) == 3 and set(k) <= set("abc") for c in counts.values() for k in c)
    keys = sorted(set(counts[0]) | set(counts[3]))
    stat = sum((counts[0][k] - counts[3][k]) ** 2 / (counts[0][k] + counts[3][k]) for k in keys)
    assert stat < 60, (stat, counts)  # df = 26: p(stat >= 60) < 0.0002 when both sample the same distribution


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """Greedy writes Python and never closes its reasoning; MTP drafts follow the same script."""
    path = tmp_path_factory.mktemp("scripted")
    write_scripted_checkpoint(path, ["Let", " me", " write", " code", ":", "def", " f", "(x", "):"])
    return path


def test_verify_never_accepts_a_draft_the_grammar_rejects():
    """Drafts equal to the target's unmasked choice (the first one certain), greedy and sampled; the
    mask after the first draft forbids the second: verification keeps the first, then takes an
    allowed token."""
    V, K = 40, 3
    logits = torch.randn(2, K + 1, V, generator=torch.Generator().manual_seed(0)) * 4
    drafts = logits[:, :K].argmax(-1)
    logits[:, 0].scatter_add_(1, drafts[:, :1], torch.full((2, 1), 100.0))  # the first draft: certain under p too
    mask = torch.full((2 * (K + 1), (V + 31) // 32), -1, dtype=torch.int32)
    for s in range(2):
        banned = int(drafts[s, 1])
        mask[s * (K + 1) + 1, banned // 32] = -1 ^ (1 << (banned % 32)) if banned % 32 != 31 else 0x7FFFFFFF
    seqs = [Sequence(s, "r", 0, [0], 1, SamplingParams(temperature=t), s) for s, t in enumerate((0.0, 1.0))]
    batch = RowBatch(seqs, [s for s in range(2) for _ in range(K + 1)], list(range(K + 1)) * 2, [],
                     torch.device("cpu"), mask)
    q = torch.nn.functional.one_hot(drafts, V).float()  # drafts drawn from point masses
    tokens, accepted = verify(batch, logits, torch.full((2,), K), drafts, q)
    assert accepted.tolist() == [1, 1]
    assert (tokens[:, 0] == drafts[:, 0]).all() and (tokens[:, 1] != drafts[:, 1]).all()


def test_the_budget_closes_reasoning_and_mtp_keeps_the_greedy_reply(scripted):
    params = SamplingParams(temperature=0.0, max_tokens=40, thinking_token_budget=3, structured_outputs=SO(json=SCHEMA))
    out = {}
    for mtp in (0, 3):
        llm = LLM(scripted, mtp=mtp)
        c = llm.chat([CHAT], params)[0].outputs[0]
        assert c.text.startswith("Let me write</think>"), c.text
        out[mtp] = c.token_ids
        if mtp:
            spec = llm.get_stats().spec
            assert spec.num_draft_tokens > 0
        assert _answer(c.text).startswith("{")
    assert out[0] == out[3]
    free = LLM(scripted, mtp=0).chat([CHAT], SamplingParams(temperature=0.0, max_tokens=40))[0].outputs[0]
    assert "</think>" not in free.text and "def f(x):" in free.text  # unconstrained, it reasons on


def test_a_matcher_error_finishes_only_its_request(llms):
    engine = llms[0].engine
    spec = SO(json=SCHEMA)
    engine.add_request("broken", [5, 6, 7], SamplingParams(temperature=1.0, max_tokens=300, structured_outputs=spec))
    engine.add_request("fine", [5, 6, 7], SamplingParams(temperature=1.0, max_tokens=300, structured_outputs=spec))
    outputs, steps = {}, 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).append(delta)
        steps += 1
        if steps == 3:  # a library fault mid-request: the matcher enters its sticky error state
            seq = engine.scheduler.sequences_of("broken")[0]
            seq.constraint.grammar.matcher.consume_token(engine.eos_token_ids[0])  # EOS inside unfinished JSON
    broken, fine = (outputs[r][-1].outputs[0] for r in ("broken", "fine"))
    assert broken.finish_reason == "error" and "structured output failed" in broken.stop_reason
    assert fine.finish_reason == "stop"
    jsonschema.validate(json.loads("".join(d.outputs[0].text for d in outputs["fine"])), SCHEMA)


def test_a_bad_schema_is_refused_before_anything_is_queued(llms):
    engine = llms[0].engine
    with pytest.raises(ValueError, match="uniqueItems"):
        engine.add_request("bad", [5, 6], SamplingParams(structured_outputs=SO(json={"uniqueItems": True})))
    assert not engine.has_unfinished_requests()


def test_n_completions_have_their_own_grammar_state(llms):
    out = llms[0].generate(["q"], SamplingParams(n=4, temperature=1.0, max_tokens=40, seed=3,
                                                 structured_outputs=SO(regex="[a-z]{2,6}")))[0]
    assert len({c.text for c in out.outputs}) > 1
    assert all(c.finish_reason == "stop" and c.text.isalpha() and 2 <= len(c.text) <= 6 for c in out.outputs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mtp_drafts_follow_the_grammar(llms, temperature):
    """A fixed string of characters the test tokenizer never merged (single-byte tokens only) leaves
    one token at every position: drafts drawn under the same mask as the target's verify rows are
    all accepted (the random MTP heads alone would not guess them)."""
    text = "#$%&@^~|" * 3
    llm = llms[3]
    assert len(llm.tokenizer.encode(text)) == len(text) and not set(text) & set(_SAMPLE_TEXT)
    before = llm.get_stats().spec
    drafted, accepted = before.num_draft_tokens, before.num_accepted_tokens
    params = SamplingParams(temperature=temperature, seed=1, max_tokens=40,
                            structured_outputs=SO(regex=re.escape(text)))
    out = llm.generate([[5, 6, 7]], params)[0].outputs[0]
    assert out.text == text and out.finish_reason == "stop"
    after = llm.get_stats().spec
    assert after.num_draft_tokens - drafted >= len(text) // 2
    assert after.num_accepted_tokens - accepted == after.num_draft_tokens - drafted
