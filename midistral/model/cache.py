"""The rolling KV cache generation attends through: per layer a ring of W = sliding_window slots.

Absolute position p lives in slot p mod W. A sliding-window model never looks further back than W tokens,
so memory stays flat however long the piece grows. Protocol (what the model calls, any model may speak it):

    k_all, v_all, k_pos = cache.update(layer_idx, k, v, start_pos)

with k, v (B, Hkv, n, D) the new, already rotated keys/values of positions start_pos .. start_pos + n - 1,
and k_pos the absolute position of every returned key (-1 = empty slot), in any order: the model masks by
position (query p sees key s iff s >= 0 and p - W < s <= p), never by slot. For a one-token step k_pos is
None instead: the returned keys are then exactly the ones position start_pos sees (see `update`), so the
step attends to all of them with no mask, as Mistral's reference decode does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def model_config(model):
    """The model's config object (ModelConfig, or anything with MistralConfig's field names)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .cfg/.config")
    return cfg


@dataclass(frozen=True)
class CacheSnapshot:
    """The ring slots of positions start .. start + len(slots) - 1, as they were when taken (all layers)."""

    start: int
    slots: torch.Tensor  # slot of each position
    k: torch.Tensor      # (layers, B, Hkv, n, D)
    v: torch.Tensor
    pos: torch.Tensor    # (layers, n): the absolute position each slot held (-1 empty)


class RollingKVCache:
    """Per-layer ring buffers of `window` slots for keys and values, preallocated: nothing grows with the
    length of the piece. The ring may hold a narrower dtype than the model (a bf16 ring halves the bytes
    every decode step reads); `update` stores into it and returns keys/values in the ring's dtype."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.window = int(window)
        shape = (n_layers, batch_size, n_kv_heads, self.window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Positions are per layer: in a prefill chunk layer i must still see the positions that were
        # cached before layer 0 of this chunk wrote into its own ring.
        self.pos = torch.full((n_layers, self.window), -1, dtype=torch.long, device=device)
        self.n_seen = [0] * n_layers  # tokens stored so far per layer (= next position to write)
        # per-layer views, made once: a decode step indexes nothing but its slot
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), self.pos.unbind(0)))

    @classmethod
    def for_model(cls, model, batch_size: int, dtype: torch.dtype | None = None) -> "RollingKVCache":
        """A cache shaped for `model` (layers, KV heads, head dim, window); dtype: the model's
        `kv_cache_dtype` if it has one, else its parameters' dtype."""
        cfg = model_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        window = cfg.sliding_window or cfg.max_position_embeddings
        p = next(model.parameters())
        named = getattr(model, "kv_cache_dtype", None)  # a name (model/precision.py says why)
        dtype = dtype or (getattr(torch, named) if named else p.dtype)
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, head_dim, window,
                   dtype=dtype, device=p.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor):
        W = self.window
        n = k.shape[2]
        k_buf, v_buf, pos = self._layers[layer_idx]
        if isinstance(start_pos, torch.Tensor):  # a static step (model/static.py): tensors only, no Python state
            return self._update_static(k_buf, v_buf, pos, k, v, start_pos)
        if n == 1 and start_pos == self.n_seen[layer_idx]:
            # A decode step right after the cached positions: write one slot and return the filled part of
            # the ring in place (no copy), k_pos None. Guarantee: the ring then holds positions
            # max(0, p - W + 1) .. p (slot p mod W was the oldest, p - W), exactly the keys query p sees.
            slot = start_pos % W
            k_buf.select(2, slot).copy_(k.squeeze(2))
            v_buf.select(2, slot).copy_(v.squeeze(2))
            pos[slot] = start_pos
            self.n_seen[layer_idx] = start_pos + 1
            if start_pos + 1 >= W:  # the ring is full: all of it
                return k_buf, v_buf, None
            return k_buf[:, :, :start_pos + 1], v_buf[:, :, :start_pos + 1], None  # slots fill from 0

        new_pos = torch.arange(start_pos, start_pos + n, device=k.device)
        if self.n_seen[layer_idx] == 0:  # nothing cached yet: the chunk attends to itself only
            k_all, v_all, k_pos = k.to(k_buf.dtype), v.to(v_buf.dtype), new_pos
        else:  # copies (torch.cat), so overwriting the ring below does not change what we return
            k_all = torch.cat([k_buf, k.to(k_buf.dtype)], dim=2)
            v_all = torch.cat([v_buf, v.to(v_buf.dtype)], dim=2)
            k_pos = torch.cat([pos, new_pos])
        keep = min(n, W)  # store the last min(n, W) entries of the chunk into their slots
        slots = new_pos[n - keep:] % W
        k_buf[:, :, slots] = k[:, :, n - keep:].to(k_buf.dtype)
        v_buf[:, :, slots] = v[:, :, n - keep:].to(v_buf.dtype)
        pos[slots] = new_pos[n - keep:]
        self.n_seen[layer_idx] = start_pos + n
        return k_all, v_all, k_pos

    def snapshot(self, start_pos: int, n: int) -> CacheSnapshot:
        """The slots positions start_pos .. start_pos + n - 1 will be written into (n <= window), as they are
        now: read speculatively past them, then `restore` to forget what was read."""
        if not 0 <= n <= self.window:
            raise ValueError(f"snapshot of {n} positions: a ring of {self.window} slots holds at most that many")
        slots = torch.arange(start_pos, start_pos + n, device=self.pos.device) % self.window
        return CacheSnapshot(int(start_pos), slots, self.k[:, :, :, slots].clone(), self.v[:, :, :, slots].clone(),
                             self.pos[:, slots].clone())

    def restore(self, snap: CacheSnapshot, from_pos: int) -> None:
        """Put back the snapshot's slots of positions from_pos onwards and make from_pos the next position
        to write: the cache then holds what it held after reading positions up to from_pos - 1 (those
        of the snapshot's positions before from_pos stay as read since)."""
        keep = max(int(from_pos) - snap.start, 0)
        if keep < len(snap.slots):
            slots = snap.slots[keep:]
            self.k[:, :, :, slots] = snap.k[:, :, :, keep:]
            self.v[:, :, :, slots] = snap.v[:, :, :, keep:]
            self.pos[:, slots] = snap.pos[:, keep:]
        self.n_seen = [int(from_pos)] * len(self.n_seen)

    def _update_static(self, k_buf, v_buf, pos, k, v, start_pos: torch.Tensor):
        """One token at position `start_pos` (a 0-d tensor) into slot start_pos mod W with `index_copy_`;
        returns the whole ring and its position tags, for the step to mask by (static shapes: one compiled
        graph serves every position). The caller records the positions seen (`advance`)."""
        if k.shape[2] != 1:
            raise ValueError(f"a static cache update takes one token, got {k.shape[2]}")
        p = start_pos.view(1)
        slot = p.remainder(self.window)
        k_buf.index_copy_(2, slot, k.to(k_buf.dtype))
        v_buf.index_copy_(2, slot, v.to(v_buf.dtype))
        pos.index_copy_(0, slot, p)
        return k_buf, v_buf, pos

    def advance(self, next_pos: int) -> None:
        """Record that every layer has stored positions up to next_pos - 1 (after static steps)."""
        self.n_seen = [next_pos] * len(self.n_seen)
