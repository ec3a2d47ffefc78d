"""Attention: the one place that picks a backend and the one function generation attends through.

- `sliding_window_attention(q, k, v, window, backend)`: full-sequence attention (training, a fresh prefill).
  "auto" runs the Triton kernel (midistral/kernels/, imported lazily) on CUDA tensors and the plain PyTorch
  path below otherwise; the PyTorch path is also the reference the kernel is tested against.
- `attention_at_positions(q, k, v, start_pos, k_pos, window)`: attention against a KV cache, masked by the
  absolute positions the cache returns, so the cache's slot order never matters. A one-token step under
  torch.compile on CPU attends by broadcast products and sums (`_attend_fused`) that inductor fuses into a
  few loops; eagerly, by SDPA, or from batch 4 by two batched products (`_attend_by_products`).

Semantics (transformers 5.x Mistral): query i attends keys j with i - W < j <= i, i.e. W keys
including itself.

Cost grows as N*W, never N*N: queries are cut into blocks of `block` rows; block b only needs the keys
of blocks b - c .. b, where c = ceil((W - 1) / block). All blocks are gathered into one batched
`scaled_dot_product_attention` call (blocks folded into the batch dimension), with one small additive
mask of shape (n_blocks, block, (c + 1) * block) that is the same for every batch row, head and layer.
Grouped-query attention uses SDPA's `enable_gqa`, so K/V are never repeated per query head.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _block_size(n: int, window: int) -> int:
    # Small blocks keep the key span (W rounded up to blocks, plus one block) close to W; 128 was fastest here.
    return max(16, min(window, 128, n))


def _key_blocks(x: torch.Tensor, block: int, n_prev: int, n_blocks: int) -> torch.Tensor:
    """(B, H, N, D) -> (n_blocks, B * H, (n_prev + 1) * block, D): for each query block, its key span."""
    B, H, N, D = x.shape
    pad_front, pad_back = n_prev * block, n_blocks * block - N
    x = F.pad(x, (0, 0, pad_front, pad_back))  # zeros before position 0 and after N - 1; both are masked
    span = (n_prev + 1) * block
    x = x.unfold(2, span, block)  # (B, H, n_blocks, D, span), a view
    return x.permute(2, 0, 1, 4, 3).reshape(n_blocks, B * H, span, D)


@functools.lru_cache(maxsize=8)
def _block_mask(n_blocks: int, block: int, n_prev: int, window: int, device: torch.device, dtype: torch.dtype):
    """Additive mask (n_blocks, 1, block, span): 0 where query r of block b sees key s of its span, -inf
    elsewhere. The same for every layer, batch row and head, so it is built once (a float mask also spares
    SDPA converting a boolean one in forward and backward)."""
    span = (n_prev + 1) * block
    qi = torch.arange(block, device=device)[:, None]  # query offset in its block
    kj = torch.arange(span, device=device)[None, :] - n_prev * block  # key offset relative to the block start
    start = torch.arange(n_blocks, device=device)[:, None, None] * block
    visible = (kj <= qi) & (kj > qi - window) & (start + kj >= 0)
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None]


@functools.lru_cache(maxsize=8)
def _band_mask(n: int, window: int, device: torch.device, dtype: torch.dtype):
    i = torch.arange(n, device=device)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))


def sliding_window_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                                   segments: "Segments | torch.Tensor | None" = None) -> torch.Tensor:
    """q (B, Hq, N, D); k, v (B, Hkv, N, D), Hq a multiple of Hkv -> (B, Hq, N, D). Differentiable.
    segments (B, N) (or `Segments` around them): a packed batch, several sequences end to end in a row; a
    query sees only keys of its own segment, as if each sequence had a row of its own."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    W = min(int(window), N)
    gqa = Hq != Hkv
    if segments is not None:
        return _packed_attention(q, k, v, W, segments if isinstance(segments, Segments) else Segments(segments))
    if N <= 2 * W or N <= 256:
        # The whole sequence is within ~2 windows: one causal call costs at most ~2x the N*W work.
        if W >= N:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band_mask(N, W, q.device, q.dtype), enable_gqa=gqa)

    block = _block_size(N, W)
    n_blocks = math.ceil(N / block)
    n_prev = math.ceil((W - 1) / block)

    # Blocks go in SDPA's batch dimension and the batch rows join the heads: query head b * Hq + h then
    # shares K/V head b * Hkv + h // G, exactly GQA's grouping, and one mask serves every row and head.
    qb = F.pad(q, (0, 0, 0, n_blocks * block - N)).view(B, Hq, n_blocks, block, D)
    qb = qb.permute(2, 0, 1, 3, 4).reshape(n_blocks, B * Hq, block, D)
    kb = _key_blocks(k, block, n_prev, n_blocks)
    vb = _key_blocks(v, block, n_prev, n_blocks)
    mask = _block_mask(n_blocks, block, n_prev, W, q.device, q.dtype)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)
    out = out.view(n_blocks, B, Hq, block, D).permute(1, 2, 0, 3, 4).reshape(B, Hq, n_blocks * block, D)
    return out[:, :, :N]


class Segments:
    """A packed batch's segment ids (B, N) (data/dataset.py: several sequences end to end in a row, -1 on the
    padding tail) and the attention masks built from them, once per forward pass rather than once per layer."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._masks: dict = {}

    def mask(self, W: int, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Boolean, True = visible: (B, 1, N, N) for the plain path (blocks None); (n_blocks * B, 1, block, span)
        for blocks (n_blocks, block, n_prev). (An additive float mask measured no faster in the chorale quick
        start's step.)"""
        key = (W, blocks)
        if key not in self._masks:
            ids = self.ids
            B, N = ids.shape
            if blocks is None:
                self._masks[key] = (_band_mask(N, W, ids.device, torch.float32) == 0) & (ids[:, None, :, None] == ids[:, None, None, :])
            else:
                n_blocks, block, n_prev = blocks
                span = (n_prev + 1) * block
                # segment ids of each query block and of its key span (-1 beyond the row; the band hides it)
                seg_k = F.pad(ids, (n_prev * block, n_blocks * block - N), value=-1).unfold(1, span, block).transpose(0, 1)
                seg_q = seg_k[:, :, n_prev * block:]  # (n_blocks, B, block): a span ends with its query block
                band = _block_mask(n_blocks, block, n_prev, W, ids.device, torch.float32) == 0  # (n_blocks, 1, block, span)
                self._masks[key] = (band & (seg_q[..., :, None] == seg_k[..., None, :])).reshape(n_blocks * B, 1, block, span)
        return self._masks[key]


def _packed_attention(q, k, v, W: int, segments: Segments) -> torch.Tensor:
    """Sliding-window attention within segments: the band of the paths above, and one more condition, same
    segment. The mask now differs per row, so blocks fold into the batch dimension beside the rows (not into
    the heads): (n_blocks * B, H, block, D), one mask row per (block, row) broadcast over the heads."""
    B, Hq, N, D = q.shape
    gqa = Hq != k.shape[1]
    if N <= 2 * W or N <= 256:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=segments.mask(W), enable_gqa=gqa)
    block = _block_size(N, W)
    n_blocks = math.ceil(N / block)
    n_prev = math.ceil((W - 1) / block)
    span = (n_prev + 1) * block

    def blocks(x):  # (B, H, N, D) -> (n_blocks * B, H, span, D)
        kb = _key_blocks(x, block, n_prev, n_blocks)
        return kb.view(n_blocks, B, x.shape[1], span, D).reshape(n_blocks * B, x.shape[1], span, D)

    qb = F.pad(q, (0, 0, 0, n_blocks * block - N)).view(B, Hq, n_blocks, block, D)
    qb = qb.permute(2, 0, 1, 3, 4).reshape(n_blocks * B, Hq, block, D)
    out = F.scaled_dot_product_attention(qb, blocks(k), blocks(v), attn_mask=segments.mask(W, (n_blocks, block, n_prev)),
                                         enable_gqa=gqa)
    out = out.view(n_blocks, B, Hq, block, D).permute(1, 2, 0, 3, 4).reshape(B, Hq, n_blocks * block, D)
    return out[:, :, :N]


BACKENDS = ("auto", "torch", "triton")


def sliding_window_attention(q, k, v, window: int, backend: str = "auto", segments=None) -> torch.Tensor:
    """Causal sliding-window GQA attention, q (B, Hq, N, D), k/v (B, Hkv, N, D) -> (B, Hq, N, D); with
    segments (B, N), within each segment of a packed row (the PyTorch path: the kernel does not read segments)."""
    if segments is None and (backend == "triton" or (backend == "auto" and q.is_cuda)):
        from midistral.kernels.attention import sliding_window_attention_triton  # imports triton

        return sliding_window_attention_triton(q, k, v, window)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return sliding_window_attention_torch(q, k, v, window, segments)


def attention_at_positions(q, k, v, start_pos: int | torch.Tensor, k_pos: torch.Tensor | None, window: int) -> torch.Tensor:
    """Attention for cached generation: q (B, Hq, n, D) at absolute positions start_pos .. start_pos + n - 1;
    k, v (B, Hkv, M, D) at k_pos (M,) in any order (-1 = empty slot). Query p sees key s iff s >= 0 and
    p - W < s <= p. k_pos None (a one-token step, model/cache.py): every key is visible, no mask.
    k/v may be narrower than q (a bf16 ring): the products run in their dtype and so does the result (the
    output projection takes it as it is: no round trip through fp32)."""
    q = q.to(k.dtype)
    B, Hq, n, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # The query group of each KV head folded into rows: K/V are read once per KV head, never repeated
    # (a decode step is bound by reading the ring), and one mask row per query serves the whole group.
    if n == 1 and k.device.type == "cpu" and torch.compiler.is_compiling():
        return _attend_fused(q.view(B, Hkv, G, D), k, v, start_pos, k_pos, window).view(B, Hq, 1, D)
    q = q.reshape(B, Hkv, G * n, D)
    if k_pos is None:
        if n != 1 or M > window:
            raise ValueError(f"an unmasked cache read needs one query and at most {window} keys, got {n} and {M}")
        if _products_attend(k, B):
            return _attend_by_products(q, k, v, None).view(B, Hq, n, D)
        return F.scaled_dot_product_attention(q, k, v).view(B, Hq, n, D)
    q_pos = torch.arange(n, device=q.device) + start_pos  # start_pos: an int or a 0-d tensor (static step)
    if n > 16 and n == M and bool((k_pos == q_pos).all()):  # a fresh prefill: the chunk sees itself only
        return sliding_window_attention_torch(q.view(B, Hq, n, D), k, v, window)
    p = q_pos[:, None]
    visible = (k_pos >= 0) & (k_pos <= p) & (k_pos > p - window)  # (n, M)
    if n == 1 and _products_attend(k, B):
        return _attend_by_products(q, k, v, visible.repeat(G, 1)).view(B, Hq, n, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.repeat(G, 1))
    return y.view(B, Hq, n, D)


PRODUCTS_FROM_BATCH = 4


def _products_attend(k: torch.Tensor, batch: int) -> bool:
    # A decode step's few query rows over a bf16 ring on CPU: SDPA's flash kernel works in blocks sized for
    # many queries and reads the ring at ~5 GB/s (the report's model at batch 8: 0.58-0.82 ms a layer with the
    # position mask); two batched products and a softmax read it at about twice the plain-sum floor (0.28-0.31
    # ms). Below batch 4 each product's fixed cost loses to SDPA (batch 1: 108 against 62-70 us).
    return batch >= PRODUCTS_FROM_BATCH and k.dtype == torch.bfloat16 and k.device.type == "cpu"


def _attend_by_products(q, k, v, visible):
    """softmax(q k^T / sqrt(D)) v for q (B, H, r, D) and k, v (B, H, M, D) of one dtype; visible (r, M) or None.
    The scores come out of the product in k's dtype (bf16: 8 bits of mantissa, as the ring's keys themselves);
    scaling, the mask and the softmax run in fp32."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def _attend_fused(q, k, v, p, k_pos, window):
    """One query per row under torch.compile on CPU: q (B, Hkv, G, D), k/v (B, Hkv, M, D) -> (B, Hkv, G, D).
    Written as broadcast products and sums (no SDPA, no matmul) so inductor fuses the scores, the position mask,
    the softmax and the weighted sum into a few C++ loops over the ring, with no call out to a library kernel: the
    report's model, its 8 layers' attention at batch 1 0.20-0.31 ms against 0.38-0.58 ms by compiled SDPA; at batch
    4 and 8 a whole step times as with two batched products (bench/RESULTS.md, "Decode attention fused by
    inductor"). Eager this would materialise a (B, Hkv, G, M, D) product: only a compiled step takes it."""
    s = (q.float()[:, :, :, None, :] * k[:, :, None].float()).sum(-1) * q.shape[-1] ** -0.5  # (B, Hkv, G, M)
    if k_pos is not None:
        s = s.masked_fill(~((k_pos >= 0) & (k_pos <= p) & (k_pos > p - window)), float("-inf"))
    o = (s.softmax(-1)[..., None] * v[:, :, None].float()).sum(-2)
    return o.to(k.dtype)
