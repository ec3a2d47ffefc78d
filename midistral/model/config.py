"""Model configuration with transformers' `MistralConfig` field names, so the report's dict works as is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from midistral.errors import ConfigError

# Keys a transformers config.json carries that say nothing about the function the model computes.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "attention_dropout", "hidden_act",
    "rope_parameters", "rope_scaling", "tie_encoder_decoder", "torchscript", "pruned_heads",
}


@dataclass
class ModelConfig:
    vocab_size: int = 5000
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    sliding_window: int | None = 512  # None: plain causal attention
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 1 (or None)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")

    @property
    def window(self) -> int:
        """The attention window W: query i sees keys i - W < j <= i."""
        return self.sliding_window or self.max_position_embeddings

    @property
    def decode_weights(self) -> int:
        """How many weights one decode step reads through matrix products: every block's linear layers and
        the LM head (the report's model: 21.4M; the embedded default: 0.9M)."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        C, inter = self.hidden_size, self.intermediate_size
        return self.num_hidden_layers * (C * (q + 2 * kv) + q * C + 3 * C * inter) + self.vocab_size * C

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Our config.json or a transformers MistralConfig dict (bookkeeping keys dropped, unknown keys refused)."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"model rope_type={rope['rope_type']!r} is not supported (only 'default')")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"model hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _HF_BOOKKEEPING)
        if unknown:
            raise ConfigError(f"unknown model config key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
        return cls(**{k: v for k, v in d.items() if k in fields})
