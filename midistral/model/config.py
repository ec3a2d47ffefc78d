"""Model configuration with transformers' `MistralConfig` field names, so the reference setup's dict works as is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from midistral.errors import ConfigError
from midistral.fields import Bool, Float, Int, check_fields, setting

# Keys a transformers config.json carries that say nothing about the function the model computes.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "attention_dropout", "hidden_act",
    "rope_parameters", "rope_scaling", "tie_encoder_decoder", "torchscript", "pruned_heads",
}


@dataclass
class ModelConfig:
    """The decoder's shape; each field checks its own type and range (a ConfigError naming `model.KEY`)."""

    vocab_size: int = setting(5000, Int(1), "tokens in the vocabulary (set from the tokenizer)", flag=False)
    hidden_size: int = setting(512, Int(1), "width of the residual stream")
    intermediate_size: int = setting(1024, Int(1), "width of the SwiGLU feed-forward layer")
    num_hidden_layers: int = setting(8, Int(1), "decoder blocks")
    num_attention_heads: int = setting(4, Int(1), "query heads")
    num_key_value_heads: int = setting(2, Int(1), "key/value heads (grouped-query attention)")
    head_dim: int | None = setting(None, Int(2, unset=True), "width of a head (unset: hidden_size // heads)")
    sliding_window: int | None = setting(512, Int(1, unset=True), "attention window (unset: plain causal)")
    max_position_embeddings: int = setting(8192, Int(2), "longest sequence the model is meant for")
    rope_theta: float = setting(10000.0, Float(0, open_lo=True), "RoPE base")
    rms_norm_eps: float = setting(1e-6, Float(0, 1), "RMSNorm epsilon")
    tie_word_embeddings: bool = setting(False, Bool(), "the LM head shares the embedding matrix")
    initializer_range: float = setting(0.02, Float(0), "standard deviation of the initial weights")
    pad_token_id: int | None = setting(0, Int(0, unset=True), "set from the tokenizer", flag=False)
    bos_token_id: int | None = setting(1, Int(0, unset=True), "set from the tokenizer", flag=False)
    eos_token_id: int | None = setting(2, Int(0, unset=True), "set from the tokenizer", flag=False)

    def __post_init__(self):
        check_fields(self, "model.")
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

    @property
    def window(self) -> int:
        """The attention window W: query i sees keys i - W < j <= i."""
        return self.sliding_window or self.max_position_embeddings

    @property
    def decode_weights(self) -> int:
        """How many weights one decode step reads through matrix products: every block's linear layers and
        the LM head (the reference model: 21.4M; the embedded default: 0.9M)."""
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
