"""A Mistral-style decoder, the same function as transformers' MistralForCausalLM.

    x = embed(ids)
    for each block:  x = x + attention(rmsnorm(x))     # RoPE, grouped-query, sliding window W
                     x = x + mlp(rmsnorm(x))           # SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(rmsnorm(x))

The projections that read the same input are one weight each, fused once at construction as gpt-fast
does: [q|k|v] (`qkv_proj`) and [gate|up] (`gate_up_proj`), so a step runs 4 matrix products per layer
instead of 7 and training never concatenates weights. Checkpoints keep transformers' names (q_proj,
k_proj, v_proj, gate_proj, up_proj; minus its "model." prefix): `state_dict()` splits the fused weights
and `load_state_dict()` joins them (a transformers folder then loads by name, midistral.checkpoint). Attention: `midistral.model.attention` (the
backend switch, and the position-masked path generation uses with a KV cache, model/cache.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from midistral.errors import CheckpointError, ConfigError
from midistral.model.attention import Segments, attention_at_positions, sliding_window_attention
from midistral.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.register_buffer("eps_tensor", torch.tensor(eps, device="cpu"), persistent=False)  # built, not loaded

    def forward(self, x):
        # the statistics in fp32, as transformers does, whatever the activations' dtype
        h, w = x.float(), self.weight.float()
        if torch.is_grad_enabled():  # training: torch's op and its backward
            return F.rms_norm(h, x.shape[-1:], w, self.eps).to(x.dtype)
        # Inference: x / sqrt(mean(x^2) + eps) in 5 ops, where F.rms_norm dispatches 24 on CPU (a decode
        # step runs 17 norms); equal to it within 1 ulp of the norm.
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        y = (h * torch.addcmul(self.eps_tensor, norm, norm, value=1 / x.shape[-1]).rsqrt_()).mul_(w)
        return y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed in fp32 and sliced per call. The sin table has its
    first half negated, so that rotate_half(x) * sin == roll(x, D/2) * sin_signed: `rotate` is 3 ops. A table
    covers the positions asked for so far, rounded up to a power of two (at least 1,024, at most
    max_positions): a sampler that never passes position 320 does not hold 8,192 rows."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, start: int, n: int, device, dtype):
        """cos, sin_signed (n, 1, D) for positions start .. start + n - 1, to broadcast over (B, n, H, D)."""
        key = (torch.device(device), dtype)
        if key not in self._tables or self._tables[key][0].shape[0] < start + n:
            rows = min(self.max_positions, max(1024, 1 << (start + n - 1).bit_length()))
            freqs = torch.arange(rows, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
            cos, sin = freqs.cos(), freqs.sin()
            self._tables[key] = (torch.cat([cos, cos], -1).to(dtype)[:, None],
                                 torch.cat([-sin, sin], -1).to(dtype)[:, None])
        cos, sin = self._tables[key]
        return cos[start:start + n], sin[start:start + n]

    def cached_tensors(self) -> list[torch.Tensor]:
        """The cos and sin tables built so far (for a copy of the model that shares them)."""
        return [t for pair in self._tables.values() for t in pair]

    def at(self, pos: torch.Tensor, dtype):
        """cos, sin_signed (1, 1, D) for one position given as a 0-d tensor (the compiled decode step: no
        table lookup by Python int, so one graph serves every position); the table's values, computed alike."""
        freqs = pos.float().view(1, 1) * self.inv_freq.to(pos.device)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], -1).to(dtype)[:, None], torch.cat([-sin, sin], -1).to(dtype)[:, None]


def rotate(x, cos, sin_signed):
    """RoPE, Mistral's "rotate half" convention (pairs i and i + D/2), on x (B, n, H, D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def _join_on_load(names: tuple[str, ...], fused: str):
    """A load_state_dict pre-hook: transformers' separate weights `names` -> our fused one, in order."""
    def hook(module, state, prefix, *_):
        if all(prefix + n + ".weight" in state for n in names):
            state[prefix + fused + ".weight"] = torch.cat([state.pop(prefix + n + ".weight") for n in names])
    return hook


def _split_on_save(names: tuple[str, ...], fused: str, sizes):
    """A state_dict post-hook: our fused weight -> transformers' separate weights (views, no copy)."""
    def hook(module, state, prefix, _):
        w = state.pop(prefix + fused + ".weight")
        state.update({prefix + n + ".weight": part for n, part in zip(names, w.split(sizes(module)))})
    return hook


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.backend = "auto"
        names = ("q_proj", "k_proj", "v_proj")
        self.register_load_state_dict_pre_hook(_join_on_load(names, "qkv_proj"))
        self.register_state_dict_post_hook(_split_on_save(names, "qkv_proj", lambda m: (
            m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.n_kv_heads * m.head_dim)))

    def forward(self, x, cos, sin, batch: int, cache=None, start_pos: int = 0, segments=None):
        """x (batch * n, C): the tokens of every row as rows of one matrix, so the products see 2-D inputs."""
        hq, hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(batch, -1, hq + 2 * hkv, D)
        qk = rotate(qkv[:, :, :hq + hkv], cos, sin).transpose(1, 2)  # q and k rotated in one pass
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, :, hq + hkv:].transpose(1, 2)  # (B, heads, n, D) views
        if cache is None:
            y = sliding_window_attention(q, k, v, self.window, backend=self.backend, segments=segments)
        else:
            k_all, v_all, k_pos = cache.update(self.layer_idx, k, v, start_pos)
            y = attention_at_positions(q, k_all, v_all, start_pos, k_pos, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], hq * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        names = ("gate_proj", "up_proj")
        self.register_load_state_dict_pre_hook(_join_on_load(names, "gate_up_proj"))
        self.register_state_dict_post_hook(_split_on_save(names, "gate_up_proj", lambda m: [m.down_proj.in_features] * 2))

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, batch: int, cache=None, start_pos: int = 0, segments=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache, start_pos, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        self.config = config
        # padding_idx as in transformers: the PAD row gets no gradient
        pad = config.pad_token_id if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attn_backend = attn_backend

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, backend: str):
        if backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"attn_backend={backend!r}: expected 'auto', 'torch' or 'triton'")
        self._attn_backend = backend
        for block in self.layers:
            block.self_attn.backend = backend

    def _init_weights(self, m):
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None, start_pos: int = 0,
                last_only: bool = False, segments: torch.Tensor | None = None):
        """ids (B, N) -> logits (B, N, V); with targets (B, N) (-100 ignored) -> (logits, mean cross-entropy).
        With a KV cache (model/cache.py), ids are positions start_pos .. start_pos + N - 1 of the sequence;
        last_only: logits (B, 1, V) of the last position only, all a prefill needs.
        segments (B, N), training only: a packed batch (data/dataset.py), several sequences end to end in each
        row, each numbered by its segment id; positions restart at every segment and attention stays inside it,
        so the loss is the one of the same sequences padded into rows of their own, without the padding."""
        B, N = ids.shape
        cfg = self.config
        if isinstance(start_pos, torch.Tensor):  # a static decode step (model/static.py): checked by its caller
            x = self.embed_tokens(ids.reshape(B * N))
            cos, sin = self.rope.at(start_pos, x.dtype)
            return self._blocks_and_head(x, cos, sin, B, N, cache, start_pos, last_only)
        if start_pos + N > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start_pos + N} positions is longer than max_position_embeddings={cfg.max_position_embeddings}"
            )
        if not ids.is_cuda:  # free on CPU; on a GPU it would sync every call (the embedding asserts there)
            lo, hi = (int(t) for t in torch.aminmax(ids))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size={cfg.vocab_size}")
        x = self.embed_tokens(ids.reshape(B * N))  # (B * N, C): the residual stream is one matrix of rows
        cos, sin = self.rope(start_pos, N, x.device, x.dtype)
        if segments is not None:
            if cache is not None or start_pos:
                raise ValueError("segments (a packed batch) are for training: no cache, start_pos 0")
            pos = segment_positions(segments)
            cos, sin = cos[pos], sin[pos]  # (B, N, 1, D): each segment's positions from 0
            segments = Segments(segments)  # its masks built by the first layer, reused by the others
        logits = self._blocks_and_head(x, cos, sin, B, N, cache, start_pos, last_only, segments)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def _blocks_and_head(self, x, cos, sin, B, N, cache, start_pos, last_only, segments=None):
        for block in self.layers:
            x = block(x, cos, sin, B, cache, start_pos, segments)
        x, N = (x.view(B, N, -1)[:, -1], 1) if last_only else (x, N)
        return self.lm_head(self.norm(x)).view(B, N, -1)

    # ---- checkpoints (written and read by midistral.checkpoint)

    def load_weights(self, state: dict, source: str | Path = "checkpoint") -> None:
        """Load a state dict, naming the first missing / unexpected / misshapen tensor."""
        if self.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        check_tensors(self.checkpoint_shapes(), {k: v.shape for k, v in state.items()}, source)
        self.load_state_dict(state, strict=not self.config.tie_word_embeddings)

    def checkpoint_shapes(self) -> dict[str, tuple]:
        """name -> shape of the tensors a checkpoint of this model holds (transformers' names; no lm_head
        when tied). Works on a model built on the meta device."""
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            own.pop("lm_head.weight", None)
        return own


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, N) segment ids, each segment one run -> each token's position within its segment."""
    i = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return i - torch.where(new, i, 0).cummax(1).values


def check_tensors(own: dict, state: dict, source) -> None:
    """A checkpoint's tensors (name -> shape) against the model's: CheckpointError naming the first missing,
    unexpected or misshapen one."""
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"{source}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for k, shape in state.items():
        if tuple(shape) != tuple(own[k]):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(shape)}, expected {tuple(own[k])}")
