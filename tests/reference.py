"""The oracle for tests: Hugging Face transformers' step3p5 text decoder (models/step3p7), fed the
same checkpoint through `stepflash.testing` (which reads it without stepflash's loader)."""

import functools
import json
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig  # noqa: E402,F401
from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel  # noqa: E402

from stepflash.testing import transformers_text_model  # noqa: E402


@functools.lru_cache(maxsize=4)
def _cached_model(ckpt: str, overrides: str) -> tuple[Step3p7TextModel, torch.Tensor]:
    return transformers_text_model(Path(ckpt), json.loads(overrides))


@torch.no_grad()
def reference_logits(ckpt: Path, token_ids: list[int], config_overrides: dict | None = None) -> torch.Tensor:
    """[len(token_ids), vocab] fp32 logits of one sequence (models are cached per checkpoint)."""
    model, lm_head = _cached_model(str(ckpt), json.dumps(config_overrides or {}, sort_keys=True))
    hidden = model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
    return hidden @ lm_head.T
