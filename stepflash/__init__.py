"""stepflash: fast inference and serving for Step-3.5-Flash-class models."""

from stepflash.config import ConfigError, ModelConfig
from stepflash.llm import LLM
from stepflash.model.loader import CheckpointError, load_model
from stepflash.outputs import CompletionOutput, RequestMetrics, RequestOutput
from stepflash.sampling import SamplingParams
from stepflash.tokenizer import IncrementalDetokenizer, Tokenizer

__version__ = "0.1.0"
__all__ = ["LLM", "CheckpointError", "CompletionOutput", "ConfigError", "IncrementalDetokenizer", "ModelConfig",
           "RequestMetrics", "RequestOutput", "SamplingParams", "Tokenizer", "load_model"]
