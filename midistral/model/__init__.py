"""The decoder: `Transformer(ModelConfig(...))` (checkpoints: midistral.checkpoint), the rolling KV
cache generation runs on, and the sampling precisions (fp32 exact, bf16, int8)."""

from midistral.model.cache import RollingKVCache
from midistral.model.config import ModelConfig
from midistral.model.model import Transformer
from midistral.model.precision import available_precisions, default_precision, prepare_for_decode

__all__ = ["ModelConfig", "RollingKVCache", "Transformer", "available_precisions", "default_precision",
           "prepare_for_decode"]
