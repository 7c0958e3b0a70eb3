"""Prometheus metrics for /metrics: requests, latency histograms, engine state."""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from stepflash.engine.engine import EngineStats
from stepflash.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("stepflash_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("stepflash_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("stepflash_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("stepflash_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("stepflash_time_per_output_token_seconds", "Decode time per output token after the "
                              "first", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("stepflash_e2e_request_latency_seconds", "Arrival to finish", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.running = Gauge("stepflash_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("stepflash_num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_used = Gauge("stepflash_kv_blocks_used", "KV blocks in use", ["kind"], registry=r)
        self.kv_total = Gauge("stepflash_kv_blocks_total", "KV blocks in the pool", ["kind"], registry=r)
        self.preemptions = Gauge("stepflash_preemptions_total", "Sequences preempted so far", registry=r)
        self.prefix_hit_rate = Gauge("stepflash_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.spec_steps = Gauge("stepflash_spec_decode_verify_steps", "MTP verify steps so far", registry=r)
        self.spec_drafts = Gauge("stepflash_spec_decode_num_draft_tokens", "MTP draft tokens proposed so far",
                                 registry=r)
        self.spec_accepted = Gauge("stepflash_spec_decode_num_accepted_tokens", "MTP draft tokens accepted so far",
                                   registry=r)
        self.spec_accepted_at = Gauge("stepflash_spec_decode_num_accepted_tokens_per_pos",
                                      "MTP drafts accepted so far, by draft position", ["position"], registry=r)
        self.spec_tau = Gauge("stepflash_spec_decode_mean_accepted_length",
                              "Tokens emitted per verify step (1 + accepted / steps)", registry=r)

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.decode_tokens_per_s:
            self.tpot.observe(1.0 / m.decode_tokens_per_s)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def render(self, stats: EngineStats) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        for kind, blocks in stats.kv_blocks.items():
            self.kv_used.labels(kind).set(blocks["used"])
            self.kv_total.labels(kind).set(blocks["total"])
        self.preemptions.set(stats.num_preemptions)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        spec = stats.spec
        self.spec_steps.set(spec.num_verify_steps)
        self.spec_drafts.set(spec.num_draft_tokens)
        self.spec_accepted.set(spec.num_accepted_tokens)
        for position, accepted in enumerate(spec.accepted_per_position):
            self.spec_accepted_at.labels(str(position)).set(accepted)
        self.spec_tau.set(spec.mean_accepted_length)
        return generate_latest(self.registry)
