"""Serving metrics from client-side timestamps, as `../shared/reference/benchmarking.md` defines them.

A `RequestTrace` is what the load generator records for one streamed request: when it was sent,
each SSE chunk that carried a choice (time, answer text, reasoning text), and the server's token
usage. Per-request metrics follow vLLM `bench serve` (TTFT, TPOT, E2EL; ITL pooled over all chunk
gaps) and Artificial Analysis (output speed after the first chunk, time to first answer token, the
normalised 500-token end-to-end time). Aggregates are over the run's duration D = first send to last
completion. Percentiles use linear interpolation (numpy's default), as vLLM does.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Chunk:
    time: float  # seconds, same clock as RequestTrace.send
    content: str = ""
    reasoning: str = ""


@dataclass
class RequestTrace:
    send: float
    chunks: list[Chunk] = field(default_factory=list)
    prompt_tokens: int = 0  # server usage
    completion_tokens: int = 0  # server usage (reasoning tokens included)
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache served, when its usage says
    error: str | None = None  # failed requests are reported apart and left out of every metric

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunks)

    @property
    def done(self) -> float:
        return self.chunks[-1].time

    @property
    def ttft(self) -> float:
        """Send -> first chunk carrying a choice (a reasoning token counts)."""
        return self.chunks[0].time - self.send

    @property
    def ttfat(self) -> float | None:
        """Send -> first chunk with answer (non-reasoning) text; None if the answer never began."""
        return next((c.time - self.send for c in self.chunks if c.content), None)

    @property
    def e2el(self) -> float:
        return self.done - self.send

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (N_out - 1); None for a single-token output."""
        n = self.completion_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive chunks (a chunk may carry several tokens, e.g. with MTP)."""
        return [b.time - a.time for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def output_speed(self) -> float | None:
        """AA output speed: N_out / (last chunk - first chunk); None when no time passed."""
        span = self.done - self.chunks[0].time
        return self.completion_tokens / span if span > 0 and self.completion_tokens else None

    def e2e_500(self) -> float | None:
        """AA end-to-end time for a 500-token answer: time to first answer token + 500 / speed."""
        speed, ttfat = self.output_speed, self.ttfat
        return None if speed is None or ttfat is None else ttfat + 500 / speed


def summarize(values: list[float], percentiles: tuple[int, ...] = (50, 90, 99)) -> dict[str, float] | None:
    """mean, median and the given percentiles (linear interpolation); None for no values."""
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean()), "median": float(np.median(arr))}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def peak_concurrency(traces: list[RequestTrace]) -> int:
    """Most completed requests in flight at once (sweep over send and completion times; a request
    that ends exactly when another starts does not overlap it)."""
    events = sorted([(t.send, 1) for t in traces] + [(t.done, -1) for t in traces])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def meets(trace: RequestTrace, slo: dict[str, float]) -> bool:
    """Goodput: every given SLO (seconds) is met: keys ttft, tpot, e2el."""
    values = {"ttft": trace.ttft, "tpot": trace.tpot, "e2el": trace.e2el}
    return all(values[k] is None or values[k] <= limit for k, limit in slo.items())


def aggregate(traces: list[RequestTrace], slo: dict[str, float] | None = None) -> dict:
    """Per-request metrics summarised, throughputs over the run, and the failures apart."""
    good = [t for t in traces if t.ok]
    failed = [t for t in traces if not t.ok]
    if not good:
        return {"completed": 0, "failed": len(failed), "errors": sorted({t.error or "empty" for t in failed})}
    start = min(t.send for t in traces)
    duration = max(t.done for t in good) - start
    n_out = sum(t.completion_tokens for t in good)
    n_in = sum(t.prompt_tokens for t in good)
    cached = [t.cached_tokens for t in good if t.cached_tokens is not None]
    result = {
        "completed": len(good), "failed": len(failed),
        "errors": sorted({t.error or "empty" for t in failed}),
        "duration_s": duration,
        "input_tokens": n_in, "output_tokens": n_out,
        "request_throughput": len(good) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "peak_concurrency": peak_concurrency(good),
        # of the prompt tokens, those the server's prefix cache served (None: its usage does not say)
        "prefix_cache_hit_rate": sum(cached) / n_in if cached and n_in else None,
        "ttft_s": summarize([t.ttft for t in good]),
        "ttfat_s": summarize([x for t in good if (x := t.ttfat) is not None]),
        "tpot_s": summarize([x for t in good if (x := t.tpot) is not None]),
        "itl_s": summarize([gap for t in good for gap in t.itl]),
        "e2el_s": summarize([t.e2el for t in good]),
        "output_speed_tok_s": summarize([x for t in good if (x := t.output_speed) is not None]),
        "e2e_500_s": summarize([x for t in good if (x := t.e2e_500()) is not None]),
    }
    if slo:
        result["goodput"] = sum(meets(t, slo) for t in good) / duration
        result["slo"] = slo
    return result
