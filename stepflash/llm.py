"""LLM: the offline API (vLLM-style names) over the synchronous engine."""

import itertools
from pathlib import Path
from typing import Any

from stepflash.config import EngineConfig
from stepflash.engine.engine import EngineStats, LLMEngine
from stepflash.models import default_model_dir
from stepflash.multimodal import MediaPolicy, chat_images
from stepflash.outputs import RequestOutput
from stepflash.sampling import SamplingParams

Prompt = str | list[int] | dict[str, Any]  # dict: vLLM's {"prompt" | "prompt_token_ids", "multi_modal_data"}


class LLM:
    """`LLM(model=None, **options)`: options are EngineConfig's fields (device, dtype, mtp,
    kv_cache_bytes, max_num_seqs, max_model_len, max_num_batched_tokens, block_size,
    enable_prefix_caching, seed, kernels, cuda_graphs, compile, quantization, tensor_parallel_size,
    enable_expert_parallel, distributed_timeout_s, limit_images_per_prompt, max_image_pixels,
    max_image_tokens), and `allowed_local_media_path` (where `chat` may read image files). With
    tensor_parallel_size > 1 this process is rank 0 and starts the others; `shutdown()` stops them
    (they also stop when this process exits)."""

    def __init__(self, model: str | Path | None = None, allowed_local_media_path: str | None = None,
                 **options: Any) -> None:
        self.engine = LLMEngine(model or default_model_dir(), EngineConfig.of(**options))
        self.media = MediaPolicy(local_path=allowed_local_media_path)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists, or vLLM-style dicts carrying images as
        `{"prompt": "... <im_patch> ...", "multi_modal_data": {"image": image or [images]}}`, one
        placeholder per image) to completion; outputs in prompt order. Every prompt is validated
        before any runs, so a bad one changes nothing."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        requests = []
        for prompt, sp in zip(prompts, params):
            text, images = _prompt_and_images(prompt)
            requests.append(self.engine.make_request(str(next(self._ids)), text, sp, images))
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
        """One conversation or a list of them, rendered with the model's chat template. Images come as
        OpenAI content parts, `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
        (or a file under the `allowed_local_media_path` given to `LLM`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.encode(self.tokenizer.apply_chat_template(c, tools=tools)),
                    "multi_modal_data": {"image": chat_images(c, self.media)}} for c in conversations]
        return self.generate(prompts, sampling_params)

    def get_stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _prompt_and_images(prompt: Prompt) -> tuple[str | list[int], list]:
    if not isinstance(prompt, dict):
        return prompt, []
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
    data = prompt.get("multi_modal_data") or {}
    if unknown or not isinstance(data, dict) or set(data) - {"image"}:
        raise ValueError("a prompt dict takes 'prompt' or 'prompt_token_ids' and 'multi_modal_data' "
                         f"({{'image': ...}}); got keys {sorted(prompt)} / {sorted(data) if isinstance(data, dict) else data}")
    images = data.get("image", [])
    text = prompt.get("prompt", prompt.get("prompt_token_ids"))
    if text is None:
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return text, images if isinstance(images, list) else [images]
