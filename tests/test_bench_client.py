"""The benchmark client: chunk timestamps and usage from SSE, failures reported (never hung), and
the eval scorers (the sandbox that runs programs: test_sandbox.py)."""

import asyncio
import json

import httpx
import pytest

from stepflash.bench.client import Endpoint, request_body, spec_delta, stream_request
from stepflash.bench.evals import Item, cut_completion, last_number, load_items, score

ENDPOINT = Endpoint("http://test", "m", timeout=5.0)


def sse(*events: dict, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def run(handler) -> object:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_request(client, ENDPOINT, request_body(ENDPOINT, "hi", 8))
    return asyncio.run(go())


def delta(content: str = "", reasoning: str = "") -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content, "reasoning_content": reasoning}}]}


def test_stream_records_chunks_reasoning_and_usage():
    body = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, delta(reasoning="think"),
               delta("Hello"), delta(" world"), {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
    trace = run(lambda request: httpx.Response(200, content=body))
    assert trace.ok and trace.error is None
    assert [(c.content, c.reasoning) for c in trace.chunks] == [("", "think"), ("Hello", ""), (" world", "")]
    assert trace.prompt_tokens == 7 and trace.completion_tokens == 5
    assert trace.ttft <= trace.ttfat <= trace.e2el


def test_request_body_asks_for_usage_and_fixed_lengths():
    body = request_body(ENDPOINT, "hi", 16, fixed_length=True)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["min_tokens"] == 16 and body["messages"][0]["content"] == "hi"


@pytest.mark.parametrize("handler, reason", [
    (lambda request: httpx.Response(500, content=b'{"error": "boom"}'), "HTTP 500"),
    (lambda request: httpx.Response(200, content=sse(delta("a"), done=False)), "before [DONE]"),
    (lambda request: httpx.Response(200, content=sse()), "no tokens"),
    (lambda request: httpx.Response(200, content=sse({"error": {"message": "engine failed"}})), "engine failed"),
])
def test_failures_are_reported(handler, reason):
    trace = run(handler)
    assert not trace.ok and reason in trace.error


def test_timeouts_and_connection_errors_are_reported():
    def timeout(request):
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    assert run(timeout).error == "timeout"
    assert "ConnectError" in run(refused).error


def test_spec_delta_from_counters():
    before = {"verify_steps": 10, "num_draft_tokens": 30, "num_accepted_tokens": 15, "num_accepted_tokens_per_pos_0": 8,
              "num_accepted_tokens_per_pos_1": 5, "num_accepted_tokens_per_pos_2": 2, "mean_accepted_length": 2.5}
    after = {"verify_steps": 30, "num_draft_tokens": 90, "num_accepted_tokens": 55, "num_accepted_tokens_per_pos_0": 26,
             "num_accepted_tokens_per_pos_1": 17, "num_accepted_tokens_per_pos_2": 12, "mean_accepted_length": 2.8}
    d = spec_delta(before, after)
    assert d["tau"] == pytest.approx(1 + 40 / 20) and d["acceptance_rate"] == pytest.approx(40 / 60)
    assert d["acceptance_per_position"] == pytest.approx([18 / 20, 12 / 20, 10 / 20])
    assert spec_delta(None, after) is None


def test_scorers():
    assert last_number("so 3 + 4 = 7, the answer is 1,234.") == "1234"
    assert last_number("#### 18") == "18" and last_number("no digits") is None
    assert score(Item("1", "q", "18", "number"), "She makes $18.0 a day") == (True, "got 18")
    assert score(Item("2", "q", "ab", "exact"), " ab\n")[0] and not score(Item("3", "q", "ab", "exact"), "abc")[0]
    assert score(Item("4", "q", "ab", "contains"), "xxabyy")[0]
    assert score(Item("5", "q", "    return x", "prefix"), "    return x\n")[0]
    assert not score(Item("6", "q", "    return x", "prefix"), "return x")[0]
    assert cut_completion("    return x\n\ndef other():\n    pass") == "    return x\n"


def test_task_files_are_validated(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a gsm8k item"):
        load_items("gsm8k", bad)
    with pytest.raises(ValueError, match="unknown task"):
        load_items("mmlu", bad)
    good = tmp_path / "g.jsonl"
    good.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n' * 3)
    items = load_items("gsm8k", good, limit=2)
    assert len(items) == 2 and items[0].reference == "2" and "1+1?" in items[0].prompt


def test_prompts_are_unique_to_a_run_unless_seeded(tmp_path):
    from stepflash.bench.load import PromptSource

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 100)
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Say hi."}\n')
    for kwargs in ({"corpus": [corpus]}, {"dataset": dataset}):
        runs = [[PromptSource(**kwargs, seed=seed).prompt(i, 50) for i in range(3)] for seed in (None, None, 3, 3)]
        assert len({p for run in runs[:2] for p in run}) == 6  # two unseeded runs share no prompt
        assert runs[2] == runs[3]  # a seed repeats a run's prompts
        assert all(p.endswith("Say hi.") for p in runs[0]) or "dataset" not in kwargs
