"""The step loop: requests in, one scheduled forward per step, tokens and text out.

`LLMEngine` is synchronous (used by `LLM` and the CLI); `AsyncLLMEngine` runs the same step loop
in a worker thread behind an asyncio interface (submit, stream outputs, abort) for the server.
"""

import asyncio
import importlib.util
import itertools
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from stepflash.config import ModelConfig
from stepflash.engine.kv_cache import FULL, SLIDING, KVCacheManager
from stepflash.engine.runner import Chunk, ModelRunner, kv_bytes_per_block
from stepflash.engine.sampler import Sampler, top_logprobs
from stepflash.engine.scheduler import Scheduler
from stepflash.engine.sequence import Sequence
from stepflash.engine.speculative import MTPDrafter, verify
from stepflash.model.loader import load_model, mtp_modules_in
from stepflash.model.step3p5 import use_kernels
from stepflash.outputs import CompletionOutput, RequestMetrics, RequestOutput, SpecStats
from stepflash.sampling import SamplingParams
from stepflash.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class EngineConfig:
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_bytes: int | None = None  # default: a share of free memory
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's context, or what the KV budget holds
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds requests that bring no seed of their own
    mtp: int | None = None  # MTP drafts per step (speculative decoding); None: the checkpoint's MTP modules
    # attention and routed experts in Triton: "triton", "torch", or "auto" (Triton on CUDA); "torch" by
    # default until the kernels have been checked on a GPU
    kernels: str = "torch"
    # decode and MTP-verify steps from CUDA graphs captured per batch bucket (engine/graphs.py): "auto"
    # (on with the kernels on CUDA), "off", or "on" (where there is no CUDA, the bucketed static-buffer
    # step runs eagerly: for tests of its padding)
    cuda_graphs: str = "auto"


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks: dict[str, dict[str, int]]  # kind -> total / used / free
    num_preemptions: int
    prefix_cache_hit_rate: float
    num_steps: int
    num_mtp: int  # drafts per verify step (0: no speculative decoding)
    spec: SpecStats


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    pending_forks: int = 0  # siblings (n > 1) still to fork off seqs[0] once the prompt is computed

    @property
    def finished(self) -> bool:
        return self.pending_forks == 0 and all(s.finished for s in self.seqs)


@dataclass
class KVPlan:
    num_blocks: dict[str, int]
    max_model_len: int


def plan_kv_cache(cfg: ModelConfig, layer_ids: list[int], ec: EngineConfig, dtype: torch.dtype,
                  budget: int, num_mtp: int = 0) -> KVPlan:
    """Split the byte budget: sliding layers get what max_num_seqs windows (+ one step's tokens,
    + 2 x num_mtp speculative positions) need, full-attention layers get all the rest, so context
    length is limited by full layers alone. `layer_ids` lists every layer with a cache (MTP ones too)."""
    bs = ec.block_size
    by_kind = {kind: [i for i in layer_ids if (cfg.layers[i].sliding_window) == (kind == SLIDING)]
               for kind in (FULL, SLIDING)}
    bpb = {kind: kv_bytes_per_block(cfg, ids, bs, dtype, num_mtp if kind == SLIDING else 0)
           for kind, ids in by_kind.items()}
    sliding = 0
    if by_kind[SLIDING]:
        per_seq = math.ceil((cfg.sliding_window - 1 + 2 * num_mtp) / bs) + 2
        sliding = ec.max_num_seqs * per_seq + math.ceil(ec.max_num_batched_tokens / bs)
    wanted_len = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not by_kind[FULL]:
        return KVPlan({FULL: 0, SLIDING: sliding}, wanted_len)
    full = (budget - sliding * bpb[SLIDING]) // bpb[FULL]
    capacity = (full - 1) * bs  # tokens one sequence can hold (a block of slack for copy-on-write)
    if capacity < wanted_len:
        if ec.max_model_len is not None or capacity < bs:
            need = (math.ceil(wanted_len / bs) + 1) * bpb[FULL] + sliding * bpb[SLIDING]
            raise ValueError(f"kv_cache_bytes={budget} holds {max(capacity, 0)} tokens of context per sequence, "
                             f"max_model_len={wanted_len} needs about {need} bytes (sliding windows for "
                             f"max_num_seqs={ec.max_num_seqs} included)")
        wanted_len = capacity
    return KVPlan({FULL: full, SLIDING: sliding}, wanted_len)


def default_kv_budget(device: torch.device, cfg: ModelConfig, layer_ids: list[int], ec: EngineConfig,
                      dtype: torch.dtype) -> int:
    """GPU: 90% of free memory. CPU: enough for max_num_seqs full-length sequences, at most a
    quarter of available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    length = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    full_ids = [i for i in layer_ids if not cfg.layers[i].sliding_window]
    sliding_ids = [i for i in layer_ids if cfg.layers[i].sliding_window]
    full_blocks = ec.max_num_seqs * (math.ceil(length / ec.block_size) + 1)
    sliding_blocks = ec.max_num_seqs * (math.ceil(cfg.sliding_window / ec.block_size) + 3) + math.ceil(
        ec.max_num_batched_tokens / ec.block_size)
    num_mtp = len(layer_ids) - len(cfg.decoder_layers)
    want = (full_blocks * kv_bytes_per_block(cfg, full_ids, ec.block_size, dtype)
            + sliding_blocks * kv_bytes_per_block(cfg, sliding_ids, ec.block_size, dtype, num_mtp))
    return min(want, _available_memory() // 4)


def _use_kernels(kernels: str, device: torch.device) -> bool:
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be auto, triton or torch, got {kernels!r}")
    if kernels == "auto":
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if kernels == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("kernels='triton' needs triton (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernels='triton' runs on a CUDA GPU, not on {device.type} (set TRITON_INTERPRET=1 "
                             "to run the kernels in Triton's interpreter instead, slowly: for tests)")
    return kernels == "triton"


def _use_graphs(graphs: str, kernels: bool, device: torch.device) -> bool:
    if graphs not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {graphs!r}")
    if graphs == "on" and not kernels:
        raise ValueError("cuda_graphs='on' needs the Triton kernels (kernels='triton', or 'auto' on CUDA)")
    return graphs == "on" or (graphs == "auto" and kernels and device.type == "cuda")


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class LLMEngine:
    def __init__(self, model_dir: str | Path, ec: EngineConfig | None = None) -> None:
        self.config = ec = ec or EngineConfig()
        if ec.max_num_seqs < 1 or ec.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        device = torch.device(ec.device if ec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model_config = ModelConfig.from_pretrained(model_dir)
        available = mtp_modules_in(model_dir)
        self.num_mtp = available if ec.mtp is None else ec.mtp
        if not 0 <= self.num_mtp <= available:
            raise ValueError(f"mtp={ec.mtp}: the checkpoint has {available} MTP modules, "
                             f"so mtp must be in 0..{available}")
        kernels = _use_kernels(ec.kernels, device)
        self.model = load_model(model_dir, device=device, dtype=ec.dtype, num_mtp=self.num_mtp, keep_int4=kernels,
                                keep_fp8=kernels)
        dtype = self.model.lm_head.weight.dtype
        layer_ids = [s.index for s in cfg.decoder_layers + cfg.mtp_layers[:self.num_mtp]]
        budget = ec.kv_cache_bytes or default_kv_budget(device, cfg, layer_ids, ec, dtype)
        plan = plan_kv_cache(cfg, layer_ids, ec, dtype, budget, self.num_mtp)
        self.max_model_len = plan.max_model_len
        self.kv = KVCacheManager(ec.block_size, plan.num_blocks[FULL], plan.num_blocks[SLIDING],
                                 cfg.sliding_window, ec.enable_prefix_caching, track_mtp=self.num_mtp > 0)
        self.scheduler = Scheduler(self.kv, ec.max_num_seqs, ec.max_num_batched_tokens,
                                   watermark_blocks=plan.num_blocks[FULL] // 100)
        graphs = _use_graphs(ec.cuda_graphs, kernels, device)
        graph_rows = min(ec.max_num_seqs * (1 + self.num_mtp), ec.max_num_batched_tokens) if graphs else 0
        self.runner = ModelRunner(self.model, plan.num_blocks, ec.block_size, kernels, graph_rows,
                                  plan.max_model_len, capture=graphs and device.type == "cuda")
        use_kernels(self.model, kernels)
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids))
        self.sampler = Sampler(self.eos_token_ids)
        self.drafter = MTPDrafter(self.runner, self.kv, self.sampler, self.num_mtp) if self.num_mtp else None
        self.spec = SpecStats()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(ec.seed)
        self.num_steps = 0

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Validate and queue a request; bad input raises ValueError and changes nothing."""
        self.enqueue(self.make_request(request_id, prompt, params))

    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """Tokenize and validate; touches no scheduler state (the async front calls it on its own thread)."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; the context is {self.max_model_len} "
                             "(max_model_len), leaving no room for output")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        bad = [t for t in params.stop_token_ids + list(params.logit_bias or {}) if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} in stop_token_ids/logit_bias are outside the vocabulary "
                             f"(size {self.model_config.vocab_size})")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        request = Request(request_id, text, ids, params, [], RequestMetrics(time.monotonic()),
                          prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
                          pending_forks=params.n - 1)
        request.seqs.append(self._new_sequence(request, 0, list(ids), seed))
        return request

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request.seqs[0])

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (size "
                                 f"{self.model_config.vocab_size})")
        else:
            raise ValueError("a prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("the prompt is empty")
        return text, ids

    def _new_sequence(self, request: Request, index: int, token_ids: list[int], seed: int) -> Sequence:
        generator = torch.Generator(device=self.runner.device).manual_seed(seed + index)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=request.params.skip_special_tokens)
        return Sequence(next(self._seq_ids), request.request_id, index, token_ids, len(request.prompt_token_ids),
                        request.params, generator, detok)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.pending_forks = 0
        for seq in request.seqs:
            if not seq.finished:
                self._flush_text(seq)
                self.scheduler.finish(seq, "abort")
        request.metrics.finished_time = time.monotonic()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the target once (verifying MTP drafts), sample, draft; report every request that changed."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        self.num_steps += 1
        now = time.monotonic()
        chunks = [Chunk(s.seq, s.seq.num_computed, s.seq.tokens(s.seq.num_computed, s.seq.num_computed + s.num_new))
                  for s in sched.scheduled]
        rows, prompt_rows, samples = self._logit_rows(chunks)
        logits = self.runner.execute(chunks, sched.copies, rows + [r for r, _, _ in prompt_rows])
        touched = {c.seq.request_id: self.requests[c.seq.request_id] for c in chunks}
        for request in touched.values():
            request.metrics.first_scheduled_time = request.metrics.first_scheduled_time or now
        self._record_prompt_logprobs(logits[len(rows):], prompt_rows)
        verifying = [c for c in chunks if c.end > c.seq.num_tokens]  # they carry drafts
        for chunk in chunks:
            if chunk.end <= chunk.seq.num_tokens:
                self.kv.commit(chunk.seq.blocks, chunk.seq.token_ids, chunk.end)
        emitted = self._sample(logits[: len(rows)], samples)
        for chunk in verifying:  # positions after the last accepted draft are scratch: drop their blocks
            seq = chunk.seq  # (blocks are named only up to the MTP caches, i.e. over tokens already known)
            self.kv.commit(seq.blocks, seq.token_ids, chunk.start + len(emitted[seq]))
            self.kv.trim(seq.blocks)
        now = time.monotonic()
        for seq, tokens in emitted.items():
            for token, logprobs in tokens:
                if seq.finished:  # stopped inside a verify step: what came after is not its output
                    seq.blocks.num_computed = min(seq.blocks.num_computed, seq.num_tokens)
                    break
                self._append_token(seq, token, logprobs, now)
        if self.drafter is not None:  # sequences that just finished still hold their blocks: fill their
            stepped = list(dict.fromkeys([c.seq for c in chunks] + list(emitted)))  # MTP caches for the prefix cache
            self.drafter.propose(stepped)
            for seq in stepped:
                self.kv.commit(seq.blocks, seq.token_ids, seq.num_computed)
                if seq.finished:
                    self.kv.free(seq.blocks)
        outputs = [self._output(r) for r in touched.values()]
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
        return outputs

    def _logit_rows(self, chunks: list[Chunk]) -> tuple[list[int], list[tuple[int, Sequence, int]],
                                                        list[tuple[Sequence, int, list[int]]]]:
        """Rows to sample from: for a sequence whose newest token was just computed, its row and one
        per draft after it, as (seq, first of its rows, drafts); and rows whose logits score the next
        prompt token (prompt_logprobs)."""
        rows, prompt_rows, samples = [], [], []
        row = 0
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            if seq.params.prompt_logprobs is not None and seq.index == 0:
                recorded = len(self.requests[seq.request_id].prompt_logprobs)
                for p in range(max(start, recorded - 1), min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((row + p - start, seq, p + 1))
            if end >= seq.num_tokens:
                newest = seq.num_tokens - 1
                samples.append((seq, len(rows), chunk.ids[newest - start + 1:]))
                rows += range(row + newest - start, row + len(chunk.ids))
            row += len(chunk.ids)
        return rows, prompt_rows, samples

    def _sample(self, logits: torch.Tensor, samples: list[tuple[Sequence, int, list[int]]]
                ) -> dict[Sequence, list[tuple[int, dict[int, float] | None]]]:
        """Tokens (with logprobs) each sequence emits: one sampled token, or a verify step's
        accepted drafts and the target's token. n > 1 siblings fork here off a finished prompt."""
        plain = [(seq, first) for seq, first, drafts in samples if not drafts]
        seqs, which = self._fork_pending([seq for seq, _ in plain])
        emitted: dict[Sequence, list[tuple[int, dict[int, float] | None]]] = {}
        if seqs:
            rows = torch.tensor([plain[i][1] for i in which], device=logits.device)
            tokens, logprobs = self.sampler(logits.index_select(0, rows), seqs)
            for seq, token, lp in zip(seqs, tokens, logprobs):
                emitted[seq] = [(token, lp)]
        for seq, first, drafts in samples:
            if not drafts:
                continue
            rows = logits[first:first + len(drafts) + 1]
            probs = seq.draft_probs[: len(drafts)] if seq.draft_probs is not None else None
            tokens = verify(self.sampler, rows, seq, drafts, probs)
            raw = rows.log_softmax(-1) if seq.params.logprobs is not None else None
            emitted[seq] = [(t, None if raw is None else top_logprobs(raw[i], seq.params.logprobs, t))
                            for i, t in enumerate(tokens)]
            self.spec.record(len(drafts), len(tokens) - 1)
            self.requests[seq.request_id].metrics.spec.record(len(drafts), len(tokens) - 1)
        return emitted

    def _record_prompt_logprobs(self, logits: torch.Tensor, prompt_rows: list[tuple[int, Sequence, int]]) -> None:
        if not prompt_rows:
            return
        logprobs = logits.log_softmax(-1)
        for i, (_, seq, position) in enumerate(prompt_rows):
            request = self.requests[seq.request_id]
            request.prompt_logprobs.append(
                top_logprobs(logprobs[i], seq.params.prompt_logprobs, seq.token_ids[position]))

    def _fork_pending(self, sample_seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """n > 1: once the prompt is computed, siblings share its blocks and sample from the same row."""
        seqs, rows = [], []
        for i, seq in enumerate(sample_seqs):
            seqs.append(seq)
            rows.append(i)
            request = self.requests[seq.request_id]
            while request.pending_forks:
                index = len(request.seqs)
                child = self._new_sequence(request, index, list(seq.token_ids), seq.generator.initial_seed())
                child.blocks = self.kv.fork(seq.blocks)
                child.blocks.mtp_computed = child.num_computed  # the parent's MTP pass fills the shared prompt
                self.scheduler.add_running(child)
                request.seqs.append(child)
                request.pending_forks -= 1
                seqs.append(child)
                rows.append(i)
        return seqs, rows

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        request = self.requests[seq.request_id]
        request.metrics.first_token_time = request.metrics.first_token_time or now
        request.metrics.num_generated_tokens += 1
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        seq.pending_text += seq.detokenizer.feed(token)
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif may_stop and token in self.eos_token_ids and not p.ignore_eos:
            self._finish(seq, "stop", None)
        elif may_stop and p.stop_strings and self._check_stop_strings(seq):
            pass
        elif seq.num_output_tokens == p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)
        else:
            self._release_safe_text(seq)

    def _check_stop_strings(self, seq: Sequence) -> bool:
        text = seq.text + seq.pending_text
        start = len(seq.text)
        hits = [(idx, s) for s in seq.params.stop_strings
                if (idx := text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not hits:
            return False
        idx, stop = min(hits)
        seq.text = text[: idx + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        seq.pending_text = ""
        self.scheduler.finish(seq, "stop", stop, free=self.drafter is None)
        return True

    def _release_safe_text(self, seq: Sequence) -> None:
        """Show decoded text except a tail that could still grow into a stop string."""
        hold = 0
        for stop in seq.params.stop_strings:
            for n in range(min(len(stop) - 1, len(seq.pending_text)), hold, -1):
                if seq.pending_text.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(seq.pending_text) - hold
        seq.text += seq.pending_text[:cut]
        seq.pending_text = seq.pending_text[cut:]

    def _flush_text(self, seq: Sequence) -> None:
        seq.text += seq.pending_text + seq.detokenizer.flush()
        seq.pending_text = ""

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        self._flush_text(seq)
        self.scheduler.finish(seq, reason, stop_reason, free=self.drafter is None)

    def _output(self, request: Request) -> RequestOutput:
        request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        outputs = [CompletionOutput(s.index, s.text, s.output_token_ids,
                                    list(s.logprobs) if request.params.logprobs is not None else None,
                                    s.finish_reason, s.stop_reason) for s in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
                             outputs, request.finished, request.metrics)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks=self.kv.usage(), num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.kv.prefix_hits / self.kv.prefix_queries if self.kv.prefix_queries else 0.0,
            num_steps=self.num_steps, num_mtp=self.num_mtp, spec=self.spec,
        )


class AsyncLLMEngine:
    """asyncio front for the server: `add` validates and queues a request, `stream` yields its
    cumulative RequestOutputs until finished (`generate` does both).

    Steps run in a worker thread; requests are added and aborted on the event loop between steps,
    so the engine's state is only ever touched by one thread at a time. A consumer that stops
    iterating (e.g. a client that disconnects) aborts its request, freeing its blocks at once.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[Request] = []
        self._aborts: set[str] = set()
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()

    def add(self, prompt: str | list[int], params: SamplingParams | None = None,
            request_id: str | None = None) -> str:
        """Validate (ValueError on bad input) and queue a request; returns its id."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.make_request(request_id, prompt, params)
        self._queues[request_id] = asyncio.Queue()
        self._pending.append(request)
        self._ensure_loop()
        return request_id

    @property
    def num_active(self) -> int:
        """Requests added and not yet fully streamed."""
        return len(self._queues)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.stream(self.add(prompt, params, request_id)):
            yield out

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        queue = self._queues[request_id]
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._aborts.add(request_id)
        self._ensure_loop()

    def abort_all(self) -> None:
        for request_id in list(self._queues):
            self.abort(request_id)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending or self._aborts or self.engine.has_unfinished_requests():
            self._apply_aborts()
            for request in self._pending:
                self.engine.enqueue(request)
            self._pending.clear()
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a failed step must not hang every stream: fail them all
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            self.engine.abort_request(request_id)
            self._pending = [r for r in self._pending if r.request_id != request_id]
        self._aborts.clear()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)
