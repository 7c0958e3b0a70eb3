"""The step loop: requests in, one planned step at a time, deltas out.

`LLMEngine` is synchronous (used by `LLM` and the CLI); the server runs it in a process of its own
behind an asyncio front (engine/front.py).
"""

import dataclasses
import importlib.util
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stepflash.config import EngineConfig, ModelConfig
from stepflash.engine.kv_cache import FULL, KVCacheManager, plan_kv_layout
from stepflash.engine.output import OutputProcessor
from stepflash.engine.runner import ModelRunner, StepRows
from stepflash.engine.sampler import Sampler, TokenCounts
from stepflash.engine.scheduler import Scheduler, StepResult
from stepflash.engine.sequence import Sequence
from stepflash.engine.speculative import MTPDrafter
from stepflash.engine.worker import Ranks, kv_budget, layout_message
from stepflash.distributed import Parallel, check_shardable, use_expert_parallel
from stepflash.model.loader import load_model, mtp_modules_in
from stepflash.multimodal import ImageInput, ImageProcessor, PlacedImage
from stepflash.outputs import RequestOutput, SpecStats
from stepflash.sampling import SamplingParams
from stepflash.structured import Constraint, StructuredOutputs
from stepflash.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
    """A validated request, not yet queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    constraint: Constraint | None = None
    images: list[PlacedImage] = field(default_factory=list)


def image_processor(cfg: ModelConfig, tokenizer: Tokenizer, ec: EngineConfig) -> ImageProcessor | None:
    """The preprocessor of a vision model's images (None: the model takes none)."""
    return ImageProcessor.of(cfg.vision, tokenizer.token_to_id, max_pixels=ec.max_image_pixels,
                             max_image_tokens=ec.max_image_tokens) if cfg.vision else None


def _use_kernels(kernels: str, device: torch.device) -> bool:
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
    if graphs == "on" and not kernels:
        raise ValueError("cuda_graphs='on' needs the Triton kernels (kernels='triton', or 'auto' on CUDA)")
    return graphs == "on" or (graphs == "auto" and kernels and device.type == "cuda")


def _use_compile(option: str, kernels: bool, device: torch.device, ranks: int) -> bool:
    if option == "on" and (kernels or ranks > 1):
        raise ValueError("compile='on' compiles the PyTorch path of one process: not with the Triton kernels "
                         "(they use cuda_graphs) nor under tensor parallelism")
    # TORCH_COMPILE_DISABLE=1, torch's own switch, also turns auto off (the test suite sets it)
    if option == "on" or (option == "auto" and not kernels and device.type == "cpu" and ranks == 1
                          and os.environ.get("TORCH_COMPILE_DISABLE") != "1"):
        from torch._inductor.cpp_builder import get_cpp_compiler  # inductor: a second's import, only here
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as e:
            if option == "on":
                raise ValueError(f"compile='on' needs a C++ compiler for torch.compile on the CPU: {e}") from e
            return False
        return True
    return False


class LLMEngine:
    """With tensor_parallel_size N > 1 this process is rank 0 of N (engine/worker.py): it holds the
    scheduler, sampler and outputs, and its runner hands every call to the other ranks."""

    def __init__(self, model_dir: str | Path, ec: EngineConfig | None = None) -> None:
        self.config = ec = ec or EngineConfig()
        device = torch.device(ec.device if ec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model_config = ModelConfig.from_pretrained(model_dir)
        available = mtp_modules_in(model_dir)
        self.num_mtp = available if ec.mtp is None else ec.mtp
        if not 0 <= self.num_mtp <= available:
            raise ValueError(f"mtp={ec.mtp}: the checkpoint has {available} MTP modules, "
                             f"so mtp must be in 0..{available}")
        self.ranks: Ranks | None = None
        if ec.tensor_parallel_size > 1:
            ec = self.config = dataclasses.replace(ec, enable_expert_parallel=use_expert_parallel(
                cfg, ec.tensor_parallel_size, ec.enable_expert_parallel))
            check_shardable(cfg, ec.tensor_parallel_size, ec.enable_expert_parallel)
            self.ranks = Ranks.start(model_dir, ec)
            device = self.ranks.device
        try:
            self._build(model_dir, ec, cfg, device)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, model_dir: str | Path, ec: EngineConfig, cfg: ModelConfig, device: torch.device) -> None:
        kernels = _use_kernels(ec.kernels, device)
        graphs = _use_graphs(ec.cuda_graphs, kernels, device)
        parallel, channel = (self.ranks.parallel, self.ranks.channel) if self.ranks else (Parallel(), None)
        if channel:
            channel.send({"op": "load", "num_mtp": self.num_mtp, "kernels": kernels})
        self.model = load_model(model_dir, device=device, dtype=ec.dtype, num_mtp=self.num_mtp, keep_int4=kernels,
                                keep_fp8=kernels, parallel=parallel)
        dtype = self.model.lm_head.weight.dtype
        if channel:
            ec = kv_budget(ec, device, channel)
        self.layout = layout = plan_kv_layout(cfg, ec, self.num_mtp, dtype, device, parallel)
        self.max_model_len = layout.max_model_len
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids))
        self.kv = KVCacheManager.of(layout, ec.enable_prefix_caching)
        self.structured = StructuredOutputs(self.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(self.kv, layout.max_num_seqs, layout.max_num_batched_tokens, layout.max_model_len,
                                   self.num_mtp, self.eos_token_ids, self._fork,
                                   watermark_blocks=layout.num_blocks[FULL] // 100,
                                   think_end=self.structured.think_end)
        graph_rows = min(layout.max_num_seqs * (1 + self.num_mtp), layout.max_num_batched_tokens) if graphs else 0
        capture = graphs and device.type == "cuda"
        if channel:
            channel.send(layout_message(layout, graph_rows, capture))
        compiled = _use_compile(ec.compile, kernels, device, ec.tensor_parallel_size)
        self.runner = ModelRunner(self.model, layout, kernels, graph_rows, capture, channel, compiled)
        counts = TokenCounts(cfg.vocab_size, device)
        self.sampler = Sampler(self.eos_token_ids, counts, self.structured, compiled)
        self.drafter = MTPDrafter(self.runner, self.eos_token_ids, counts, self.structured) if self.num_mtp else None
        self.output = OutputProcessor(self.tokenizer)
        self.images = image_processor(cfg, self.tokenizer, ec)
        self._seq_ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(ec.seed)
        self.num_steps = 0
        if compiled and not torch._dynamo.config.disable:
            self._compile_steps()

    def _compile_steps(self) -> None:
        """Compile now, not in the first requests (tens of seconds), each step kind in each of its
        variants (runner.CompiledStep: one row; then ranges of rows where the MoE twin turns from
        gathering its experts to every expert to the grouped GEMM, kernels/moe.py): two requests
        together, one short enough to be computed like a verify step, and sampled (drafting that
        samples, in one call for all MTP modules, and the sampler's plain verify, with drafts and
        without; it asks for enough tokens to outlast the other's long catch-up however many drafts
        are accepted), then one alone (greedy drafting, one call), then one with top-p (the verify
        through top-k / top-p / min-p: graphs of their own), then one with a repetition penalty (a
        drafting call per MTP module), then full batches of 4, 8, 16, ... and max_num_seqs requests.
        Their statistics are then forgotten."""
        log.info("stepflash: compiling the decode, verify and drafting steps (torch.compile; compile='off', "
                 "--compile off, skips it) ...")
        start = time.monotonic()
        most = self.layout.max_num_seqs
        full = sorted({*(1 << i for i in range(2, most.bit_length())), most})
        greedy = (12, dict(max_tokens=8))  # prompt length, sampling settings
        sampled = dict(max_tokens=16, temperature=1.0)
        for batch in (((20, dict(max_tokens=16)), (5, sampled)), (greedy,), ((12, dict(sampled, top_p=0.9)),),
                      ((12, dict(sampled, repetition_penalty=1.1)),), *((greedy,) * n for n in full)):
            for i, (prompt_len, settings) in enumerate(batch):
                self.add_request(f"compile-{i}", [t % self.model_config.vocab_size for t in range(2, 2 + prompt_len)],
                                 SamplingParams(**settings, seed=0, ignore_eos=True))
            while self.has_unfinished_requests():
                self.step()
        self.num_steps, self.output.spec = 0, SpecStats()
        self.kv.prefix_hits = self.kv.prefix_queries = 0
        log.info("stepflash: steps compiled in %.0f s", time.monotonic() - start)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    images: list | None = None) -> None:
        """Validate and queue a request; bad input raises ValueError and changes nothing."""
        self.enqueue(self.make_request(request_id, prompt, params, images))

    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     images: list | None = None, text: str | None = None) -> Request:
        """Tokenize and validate; touches no engine state. `images` (encoded bytes, PIL images, uint8
        [3, H, W] tensors or preprocessed ImageInputs) go to the prompt's image placeholders, in order.
        `text`: the prompt's text, where `prompt` holds the ids it was tokenized to elsewhere (the
        server's front does it, off the engine's process)."""
        params = params or SamplingParams()
        own_text, ids = self._tokenize(prompt)
        text = own_text if text is None else text
        ids, placed = self._place_images(ids, images or [])
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; the context is {self.max_model_len} "
                             "(max_model_len), leaving no room for output")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        if params.n > self.layout.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.layout.max_num_seqs}")
        bad = [t for t in params.stop_token_ids + list(params.logit_bias or {}) if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} in stop_token_ids/logit_bias are outside the vocabulary "
                             f"(size {self.model_config.vocab_size})")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        constraint = self.structured.constraint_for(params, ids)  # a bad grammar raises here, before queueing
        return Request(request_id, text, ids, params, seed, time.monotonic(), constraint, placed)

    def _place_images(self, ids: list[int], images: list) -> tuple[list[int], list[PlacedImage]]:
        """Preprocess the images and expand the prompt's placeholders into their layouts."""
        if self.images is None:
            if images:
                raise ValueError("this model takes no images (its config has no vision_config)")
            return ids, []
        limit = self.config.limit_images_per_prompt
        if len(images) > limit:
            raise ValueError(f"{len(images)} images in one prompt; the limit is {limit} (limit_images_per_prompt)")
        return self.images.expand(ids, [im if isinstance(im, ImageInput) else self.images.process(im) for im in images])

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.output.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.output.add(request.request_id, request.prompt, request.prompt_token_ids, request.params, request.arrival)
        seq = Sequence(next(self._seq_ids), request.request_id, 0, list(request.prompt_token_ids),
                       len(request.prompt_token_ids), request.params, request.seed, images=request.images,
                       num_forks=request.params.n - 1, constraint=request.constraint)
        self.scheduler.add(seq)

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

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """An n > 1 sibling: the parent's prompt, its own index and seed (the parent's + index, kept
        within 64 bits: the sampler sends seeds as int64)."""
        seed = (parent.seed + index + 2**63) % 2**64 - 2**63
        return Sequence(next(self._seq_ids), parent.request_id, index, list(parent.token_ids),
                        parent.num_prompt_tokens, parent.params, seed, images=parent.images,
                        constraint=parent.constraint.fork() if parent.constraint is not None else None)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks at once; its final delta."""
        for seq in self.scheduler.sequences_of(request_id):
            self.scheduler.abort(seq)
        return self.output.abort(request_id, time.monotonic())

    def abort_all(self) -> list[str]:
        """Abort every request and sequence, draining ones included (after a failed step); the ids."""
        request_ids = list(self.output.requests)
        self.scheduler.abort_all()
        for request_id in request_ids:
            self.output.abort(request_id, time.monotonic())
        return request_ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.requests) or self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan, draft (MTP), run the target, sample and verify, apply: each changed request's delta."""
        if self.ranks is None:
            return self._step()
        self.ranks.check()
        try:
            return self._step()
        except Exception as e:  # the ranks may be mid-call: no later step could be in lockstep
            raise self.ranks.failure(e) from e

    def shutdown(self) -> None:
        """Stop the other ranks (tensor parallelism); nothing to do otherwise."""
        if self.ranks is not None:
            self.ranks.close()

    def _step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return []
        self.num_steps += 1
        self.runner.copy_blocks(plan.copies)
        drafts = self.drafter.propose(plan) if self.drafter else None
        rows = StepRows.of(plan, drafts)
        result = StepResult({}, {})
        if rows.chunks:
            staged = self.sampler.stage(rows, drafts)  # grammar masks: their drafts' copy, before the forward
            logits = self.runner.execute(rows.chunks, rows.logit_rows, rows.inject)
            result = self.sampler(rows, logits, drafts, staged) if rows.logit_rows else result
        outputs, stopped = self.output.process(self.scheduler.update(plan, result), time.monotonic())
        for seq, stop in stopped:
            self.scheduler.finish(seq, "stop", stop)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks=self.kv.usage(), num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.kv.prefix_hits / self.kv.prefix_queries if self.kv.prefix_queries else 0.0,
            num_steps=self.num_steps, num_mtp=self.num_mtp, spec=self.output.spec,
        )
