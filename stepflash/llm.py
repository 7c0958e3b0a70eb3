"""LLM: the offline API (vLLM-style names) over the synchronous engine."""

import itertools
from pathlib import Path
from typing import Any

from stepflash.config import EngineConfig
from stepflash.engine.engine import EngineStats, LLMEngine
from stepflash.models import default_model_dir
from stepflash.outputs import RequestOutput
from stepflash.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model=None, **options)`: options are EngineConfig's fields (device, dtype, mtp,
    kv_cache_bytes, max_num_seqs, max_model_len, max_num_batched_tokens, block_size,
    enable_prefix_caching, seed, kernels, cuda_graphs, quantization, tensor_parallel_size,
    enable_expert_parallel, distributed_timeout_s). With tensor_parallel_size > 1 this process is
    rank 0 and starts the others; `shutdown()` stops them (they also stop when this process exits)."""

    def __init__(self, model: str | Path | None = None, **options: Any) -> None:
        self.engine = LLMEngine(model or default_model_dir(), EngineConfig.of(**options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in prompt order.
        Every prompt is validated before any runs, so a bad one changes nothing."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        requests = [self.engine.make_request(str(next(self._ids)), p, sp) for p, sp in zip(prompts, params)]
        for request in requests:
            self.engine.enqueue(request)
        outputs: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                if delta.request_id in outputs:
                    outputs[delta.request_id].add(delta)
                else:
                    outputs[delta.request_id] = delta
        return [outputs[r.request_id] for r in requests]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, tools: list[dict[str, Any]] | None = None
             ) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, tools=tools)) for c in conversations]
        return self.generate(prompts, sampling_params)

    def get_stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
