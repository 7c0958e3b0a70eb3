"""Serving metrics on synthetic timestamp traces, against answers computed by hand."""

import pytest

from stepflash.bench.metrics import Chunk, RequestTrace, aggregate, peak_concurrency, summarize


def trace(send: float, times: list[float], tokens: int, prompt: int = 10, reasoning_chunks: int = 0) -> RequestTrace:
    chunks = [Chunk(t, reasoning="r") if i < reasoning_chunks else Chunk(t, content="a") for i, t in enumerate(times)]
    return RequestTrace(send, chunks, prompt_tokens=prompt, completion_tokens=tokens)


def test_per_request_metrics():
    # sent at 1.0; chunks at 1.5 (reasoning), 1.7 (reasoning), 2.0, 2.5, 3.5; 9 tokens
    t = trace(1.0, [1.5, 1.7, 2.0, 2.5, 3.5], tokens=9, reasoning_chunks=2)
    assert t.ttft == pytest.approx(0.5)
    assert t.ttfat == pytest.approx(1.0)  # the first answer chunk at 2.0
    assert t.e2el == pytest.approx(2.5)
    assert t.tpot == pytest.approx((2.5 - 0.5) / 8)  # 0.25
    assert t.itl == pytest.approx([0.2, 0.3, 0.5, 1.0])
    assert t.output_speed == pytest.approx(9 / 2.0)  # tokens / (3.5 - 1.5)
    assert t.e2e_500() == pytest.approx(1.0 + 500 / 4.5)


def test_single_token_and_reasoning_only_outputs():
    one = trace(0.0, [0.4], tokens=1)
    assert one.tpot is None and one.itl == [] and one.output_speed is None and one.e2e_500() is None
    thinking = trace(0.0, [0.1, 0.2], tokens=5, reasoning_chunks=2)
    assert thinking.ttfat is None and thinking.ttft == pytest.approx(0.1)


def test_summary_uses_linear_interpolation():
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["mean"] == pytest.approx(4.0) and s["median"] == pytest.approx(3.0)
    assert s["p90"] == pytest.approx(4.0 + 0.6 * 6.0)  # rank 3.6 between 4 and 10
    assert s["p99"] == pytest.approx(4.0 + 0.96 * 6.0)
    assert summarize([]) is None


def test_peak_concurrency_sweep():
    a = trace(0.0, [1.0, 2.0], tokens=2)  # in flight 0-2
    b = trace(1.0, [2.5, 3.0], tokens=2)  # 1-3
    c = trace(2.0, [2.2, 4.0], tokens=2)  # 2-4: starts when a ends, so a and c never overlap
    d = trace(1.5, [1.6], tokens=1)  # 1.5-1.6
    assert peak_concurrency([a, b, c, d]) == 3  # a, b, d at 1.5
    assert peak_concurrency([a, c]) == 1


def test_aggregate_throughputs_goodput_and_failures():
    a = trace(0.0, [0.5, 1.0, 2.0], tokens=10, prompt=100)  # ttft .5, e2el 2, tpot 1.5/9
    b = trace(1.0, [1.2, 3.0, 4.0], tokens=4, prompt=50)  # ttft .2, e2el 3, tpot 2.8/3
    failed = RequestTrace(0.5, error="HTTP 500")
    dropped = RequestTrace(0.7, [], error=None)  # a stream that closed before any chunk
    result = aggregate([a, b, failed, dropped], slo={"ttft": 0.3, "tpot": 1.0})
    assert result["completed"] == 2 and result["failed"] == 2
    assert result["errors"] == ["HTTP 500", "empty"]
    assert result["duration_s"] == pytest.approx(4.0)  # first send 0.0 -> last completion 4.0
    assert result["request_throughput"] == pytest.approx(2 / 4.0)
    assert result["output_throughput"] == pytest.approx(14 / 4.0)
    assert result["total_token_throughput"] == pytest.approx(164 / 4.0)
    assert result["ttft_s"]["mean"] == pytest.approx(0.35)
    assert result["itl_s"]["median"] == pytest.approx(1.0)  # gaps 0.5, 1.0 (a) and 1.8, 1.0 (b)
    assert result["itl_s"]["mean"] == pytest.approx(4.3 / 4)
    assert result["goodput"] == pytest.approx(1 / 4.0)  # only b: ttft 0.2 <= 0.3 and tpot 0.933 <= 1.0
    assert result["peak_concurrency"] == 2


def test_aggregate_with_only_failures():
    result = aggregate([RequestTrace(0.0, error="timeout")])
    assert result == {"completed": 0, "failed": 1, "errors": ["timeout"]}
