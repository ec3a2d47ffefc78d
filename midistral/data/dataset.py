"""Training examples from token shards: pieces cut into chunks, BOS/EOS, right padding, labels -100 on PAD.

A piece of n tokens becomes chunks of at most `max_seq` tokens; BOS opens the piece's first chunk and
EOS closes its last (the model learns where pieces start and end, not where chunks do). Chunks shorter
than `min_seq` are dropped unless they are the whole piece. A batch is gathered with one fancy index:
no Python loop over tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenChunks:
    def __init__(self, folder: str | Path, split: str, min_seq: int, max_seq: int, bos_id: int, eos_id: int, pad_id: int):
        folder = Path(folder)
        self.tokens = np.memmap(folder / f"{split}.bin", dtype=_dtype(folder), mode="r") if (folder / f"{split}.bin").stat().st_size else np.zeros(0, np.uint16)
        self.offsets = np.load(folder / f"{split}.idx.npy")
        self.bos, self.eos, self.pad = bos_id, eos_id, pad_id
        self.max_seq = max_seq
        # each piece framed as BOS + ids + EOS, cut every max_seq tokens of that framed sequence
        lengths = np.diff(self.offsets) + 2
        starts, piece, lens = [], [], []
        for p, n in enumerate(lengths.tolist()):  # one entry per piece (not per token)
            s = np.arange(0, n, max_seq)
            ln = np.minimum(n - s, max_seq)
            keep = (ln >= min_seq) | (len(s) == 1)
            starts.append(s[keep]), lens.append(ln[keep]), piece.append(np.full(keep.sum(), p))
        self.chunk_piece = np.concatenate(piece) if piece else np.zeros(0, np.int64)
        self.chunk_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)  # in the framed sequence
        self.chunk_len = np.concatenate(lens) if lens else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.chunk_piece)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L - 1) with L the longest chunk in the batch; targets -100 on padding."""
        idx = np.asarray(idx)
        lens, start, piece = self.chunk_len[idx], self.chunk_start[idx], self.chunk_piece[idx]
        L = int(lens.max())
        pos = start[:, None] + np.arange(L)[None, :]  # position in the framed piece BOS + ids + EOS
        n_ids = (self.offsets[piece + 1] - self.offsets[piece])[:, None]
        valid = np.arange(L)[None, :] < lens[:, None]
        src = np.clip(self.offsets[piece][:, None] + pos - 1, 0, max(len(self.tokens) - 1, 0))
        seq = self.tokens[src].astype(np.int64) if len(self.tokens) else np.zeros(pos.shape, np.int64)
        seq = np.where(pos == 0, self.bos, np.where(pos == n_ids + 1, self.eos, seq))
        seq = np.where(valid, seq, self.pad)
        x = torch.from_numpy(seq[:, :-1].copy())
        y = torch.from_numpy(np.where(valid[:, 1:], seq[:, 1:], -100))
        return x, y


def _dtype(folder: Path):
    import json

    return np.dtype(json.loads((folder / "manifest.json").read_text())["dtype"])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of chunks in an epoch: a pure function of (seed, epoch), so a resumed run sees the same data."""
    return np.random.default_rng([seed, epoch]).permutation(n)
