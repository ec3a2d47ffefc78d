"""The decoder: `Transformer(ModelConfig(...))`, `from_hf(dir)` for transformers checkpoints."""

from midistral.model.config import ModelConfig
from midistral.model.hf import from_hf
from midistral.model.model import Transformer

__all__ = ["ModelConfig", "Transformer", "from_hf"]
