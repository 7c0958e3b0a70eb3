"""stepflash: fast inference and serving for Step-3.5-Flash-class models."""

from stepflash.config import ConfigError, ModelConfig
from stepflash.model.loader import CheckpointError, load_model
from stepflash.tokenizer import IncrementalDetokenizer, Tokenizer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "IncrementalDetokenizer", "ModelConfig", "Tokenizer", "load_model"]
