"""A Mistral-style decoder, the same function as transformers' MistralForCausalLM.

    x = embed(ids)
    for each block:  x = x + attention(rmsnorm(x))     # RoPE, grouped-query, sliding window W
                     x = x + mlp(rmsnorm(x))           # SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(rmsnorm(x))

Module and parameter names follow transformers' (minus its "model." prefix), so checkpoints map one
to one (see hf.py). Full-sequence attention goes through one call, `midistral.kernels.
sliding_window_attention`, which picks the Triton kernel on CUDA and the plain PyTorch path otherwise.
Generation passes a KV cache (midistral/generate.py) that returns the keys to attend to with their
absolute positions; the mask is then built from positions, so a rolling buffer works unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from midistral import kernels
from midistral.errors import CheckpointError, ConfigError
from midistral.io import atomic_write_json, save_tensors
from midistral.model.attention import attention_at_positions
from midistral.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # the statistics in fp32, as transformers does, whatever the activations' dtype
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed once (in fp32) and sliced per call."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, start: int, n: int, device, dtype):
        if self._cache is None or self._cache[0].device != device:
            pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = (emb.cos(), emb.sin())
        cos, sin = self._cache
        return cos[start:start + n].to(dtype), sin[start:start + n].to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, n, D) rotated by the "rotate half" convention (pairs i and i + D/2), as Mistral does."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def fused_linear(x, linears):
    """The outputs of several bias-free nn.Linear on the same input. For many rows (training, prefill) one
    wide matmul over the concatenated weights is markedly faster on CPU than several narrow ones; the
    weight copy costs little there. For a few rows (decode steps) the copy would double the bytes read."""
    if x.numel() // x.shape[-1] < 64:
        return [lin(x) for lin in linears]
    w = torch.cat([lin.weight for lin in linears])
    return F.linear(x, w).split([lin.out_features for lin in linears], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.backend = "auto"

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        B, n, _ = x.shape
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = kernels.sliding_window_attention(q, k, v, self.window, backend=self.backend)
        else:
            k_all, v_all, k_pos = cache.update(self.layer_idx, k, v, start_pos)
            q_pos = torch.arange(start_pos, start_pos + n, device=x.device)
            y = attention_at_positions(q, k_all, v_all, q_pos, k_pos, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos)
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
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None, start_pos: int = 0):
        """ids (B, N) -> logits (B, N, V); with targets (B, N) (-100 ignored) -> (logits, mean cross-entropy)."""
        B, N = ids.shape
        cfg = self.config
        if start_pos + N > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start_pos + N} positions is longer than max_position_embeddings={cfg.max_position_embeddings}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size={cfg.vocab_size}")
        x = self.embed_tokens(ids)
        cos, sin = self.rope(start_pos, N, x.device, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, start_pos)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def decoder(self, cache) -> "DecodeStep":
        """A one-token-per-row step for generation against `cache` (generate.RollingKVCache)."""
        return DecodeStep(self, cache)

    # ---- checkpoints: config.json + model.safetensors

    def save(self, dir: str | Path) -> None:
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_tensors(dir / "model.safetensors", state, metadata={"format": "pt"})
        atomic_write_json(dir / "config.json", self.config.to_dict())

    @classmethod
    def load(cls, dir: str | Path, device: str | torch.device | None = None) -> "Transformer":
        from safetensors.torch import load_file

        dir = Path(dir)
        for f in ("config.json", "model.safetensors"):
            if not (dir / f).is_file():
                raise CheckpointError(f"{dir}: checkpoint is missing {f}")
        try:
            cfg = ModelConfig.from_dict(json.loads((dir / "config.json").read_text()))
        except ValueError as e:
            raise CheckpointError(f"{dir / 'config.json'}: not valid JSON ({e})") from None
        model = cls(cfg)
        try:
            state = load_file(str(dir / "model.safetensors"), device=str(device or "cpu"))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{dir / 'model.safetensors'}: cannot be read ({e})") from None
        model.load_weights(state, source=dir / "model.safetensors")
        return model.to(device) if device is not None else model

    def load_weights(self, state: dict, source: str | Path = "checkpoint") -> None:
        """Load a state dict, naming the first missing / unexpected / misshapen tensor."""
        own = self.state_dict()
        if self.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
            own.pop("lm_head.weight", None)
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
            raise CheckpointError(f"{source}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=not self.config.tie_word_embeddings)


class DecodeLinear:
    """y = x @ W.T for the few rows of a decode step (a bias-free nn.Linear's weight W, copied).

    On CPU in fp32 the weight is prepacked for oneDNN, the op torch.compile itself emits for CPU linears
    (`torch.ops.mkldnn`): at batch 8 it runs about 1.9x faster than MKL on the plain weight here, at
    batch 1 about 1.1x. Where that op is missing (other builds, other devices, other dtypes) the weight is
    stored (in, out) contiguous, the layout a row-vector x matrix product streams fastest.
    """

    def __init__(self, w: torch.Tensor, batch_size: int):
        self.packed = None
        w = w.detach()
        if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size)
            except (AttributeError, RuntimeError):
                self.packed = None
        self.w_t = None if self.packed is not None else w.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return x @ self.w_t


class DecodeStep:
    """`step(tok (B,), pos) -> logits (B, V)`: the model's forward for one new token per row at absolute
    position `pos`, against a rolling KV cache; the same function as `model(tok[:, None], cache=cache,
    start_pos=pos)[:, -1]`, written for speed at batch 1..8 on CPU, where a step is bound by reading the
    weights once (about 80 MB) and by per-op overhead:
    - the weights are copied once per generate call (so never stale after training) into the layout a
      few-row matrix product reads fastest (`DecodeLinear`), with [q|k|v] and [gate|up] fused: 4 matrix
      products per layer instead of 7;
    - q and k are rotated together in one pass; attention is one fused SDPA call per layer;
    - no mask: after writing position `pos`, the ring's first min(pos + 1, W) slots hold exactly the keys
      pos - W < s <= pos that the query may see, in whatever order (softmax does not care).
    """

    def __init__(self, model: Transformer, cache):
        cfg = model.config
        self.model, self.cache = model, cache
        if cache.window != cfg.window:
            raise ValueError(f"cache window {cache.window} != model window {cfg.window}")
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        B = cache.k.shape[1]
        with torch.no_grad():
            t = lambda *ws: DecodeLinear(torch.cat([w.detach() for w in ws]), B)  # noqa: E731
            self.layers = [
                (b.input_layernorm.weight.detach(),
                 t(b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight),
                 t(b.self_attn.o_proj.weight),
                 b.post_attention_layernorm.weight.detach(),
                 t(b.mlp.gate_proj.weight, b.mlp.up_proj.weight),
                 t(b.mlp.down_proj.weight))
                for b in model.layers]
            self.head = t(model.lm_head.weight)
        w = model.lm_head.weight
        cos, sin = model.rope(0, cfg.max_position_embeddings, w.device, torch.float32)
        half = self.d // 2
        # rotate_half(x) * sin == roll(x, D/2) * sin_signed, with sin's first half negated: one op fewer
        self.cos, self.sin = cos.to(w.dtype), torch.cat([-sin[:, :half], sin[:, half:]], -1).to(w.dtype)

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        B = tok.shape[0]
        hq, hkv, d = self.hq, self.hkv, self.d
        if pos >= self.cos.shape[0]:
            raise ValueError(f"position {pos} is past max_position_embeddings={self.cos.shape[0]}")
        x = self.model.embed_tokens(tok)  # (B, C)
        C = x.shape[-1]
        cos, sin = self.cos[pos], self.sin[pos]
        for i, (ln1, w_qkv, w_o, ln2, w_gate_up, w_down) in enumerate(self.layers):
            qkv = w_qkv(F.rms_norm(x, (C,), ln1, self.eps))
            qk = qkv[:, :(hq + hkv) * d].view(B, hq + hkv, d)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            q = qk[:, :hq].view(B, hkv, hq // hkv, d)  # the query group of each KV head as rows
            k = qk[:, hq:, None]
            v = qkv[:, (hq + hkv) * d:].view(B, hkv, 1, d)
            keys, values, _ = self.cache.update(i, k, v, pos)
            y = F.scaled_dot_product_attention(q, keys, values)  # every cached key is visible: no mask
            x = x + w_o(y.view(B, hq * d))
            gate, up = w_gate_up(F.rms_norm(x, (C,), ln2, self.eps)).chunk(2, dim=-1)
            x = x + w_down(F.silu(gate) * up)
        return self.head(F.rms_norm(x, (C,), self.model.norm.weight, self.eps))
