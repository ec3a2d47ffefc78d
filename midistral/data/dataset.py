"""Training examples from token shards: pieces cut into chunks, BOS/EOS, right padding, labels -100 on PAD.

A piece of n tokens becomes chunks of at most `max_seq` tokens; BOS opens the piece's first chunk and
EOS closes its last (the model learns where pieces start and end, not where chunks do). Chunks shorter
than `min_seq` are dropped unless they are the whole piece. A batch is gathered with one fancy index:
no Python loop over tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from midistral.tokenizer_file import load_tokenizer
from midistral.data.mixes import ChunkMixer, Mixes, add_extra_vocab
from midistral.errors import ConfigError, DataError

DATA_FORMAT = {"format": "midistral.data", "version": 2}  # bumped when the shard layout changes


def read_manifest(folder: Path) -> dict:
    """FOLDER/manifest.json (written last by prepare: its presence means every shard is whole)."""
    path = Path(folder) / "manifest.json"
    try:
        man = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (the folder is not prepared, or its preparation was interrupted)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a valid manifest ({e.__class__.__name__})") from None
    if not isinstance(man, dict) or {k: man.get(k) for k in DATA_FORMAT} != DATA_FORMAT:
        found = man.get("version") if isinstance(man, dict) else None
        raise DataError(f"{path}: prepared by another version of midistral (data format {found!r}, "
                        f"expected {DATA_FORMAT['version']}): prepare it again")
    return man


def _read_shard(folder: Path, split: str, man: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, piece offsets) of one split, checked against the manifest: sizes, offsets, id range."""
    bin_path, idx_path = folder / f"{split}.bin", folder / f"{split}.idx.npy"
    dtype = np.dtype(man["dtype"])
    for p in (bin_path, idx_path):
        want = man["shards"][p.name]["bytes"]
        size = p.stat().st_size if p.is_file() else None
        if size != want:
            raise DataError(f"{p}: {'missing' if size is None else f'{size} bytes'}, the manifest says {want}: "
                            "a damaged folder, prepare it again")
    try:
        offsets = np.load(idx_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{idx_path}: corrupt piece index ({e.__class__.__name__})") from None
    n = bin_path.stat().st_size // dtype.itemsize
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise DataError(f"{idx_path}: piece offsets do not fit {bin_path.name} ({n} ids)")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    if n and int(tokens.max()) >= man["vocab_size"]:
        raise DataError(f"{bin_path}: ids up to {int(tokens.max())} but the vocabulary has {man['vocab_size']}")
    return tokens, offsets


def piece_styles(man: dict, split: str, n_pieces: int) -> list[str | None]:
    """Each piece's style: the manifest's counts.SPLIT.piece_styles (one per piece, in shard order; written by
    data/prepare.py for a styled corpus); None for every piece when the manifest has none (or not one per piece)."""
    counts = man.get("counts") if isinstance(man.get("counts"), dict) else {}
    styles = counts.get(split, {}).get("piece_styles") if isinstance(counts.get(split), dict) else None
    if not isinstance(styles, list) or len(styles) != n_pieces:
        return [None] * n_pieces
    return [s if isinstance(s, str) and s else None for s in styles]


def manifest_styles(man: dict) -> list[str]:
    """Every style the manifest records in any split, sorted."""
    counts = man.get("counts") if isinstance(man.get("counts"), dict) else {}
    return sorted({s for c in counts.values() if isinstance(c, dict) for s in (c.get("piece_styles") or [])
                   if isinstance(s, str) and s})


class TokenChunks:
    def __init__(self, folder: str | Path, split: str, min_seq: int, max_seq: int, bos_id: int, eos_id: int, pad_id: int,
                 mixer: ChunkMixer | None = None, seed: int = 0, style_repeats: dict | None = None):
        folder = Path(folder)
        man = read_manifest(folder)
        self.tokens, self.offsets = _read_shard(folder, split, man)
        # fill-in-the-middle, attributes and style (data/mixes.py); each chunk's draw n is seeded by
        # (seed, chunk, n), so a run from scratch sees the same mixes
        self.mixer, self.seed = mixer, seed
        self.styles = piece_styles(man, split, len(self.offsets) - 1)
        self.fingerprint = man["fingerprint"]
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
        if style_repeats:
            self._repeat_styles(style_repeats, folder)
        self.draws = np.zeros(len(self.chunk_piece), np.int64)

    def _repeat_styles(self, style_repeats: dict, folder: Path) -> None:
        """Each chunk of a piece of style S listed `style_repeats[S]` times (each copy mixed on its own draws):
        a style with few pieces is seen more often without being prepared twice."""
        known = sorted({s for s in self.styles if s})
        for style in style_repeats:
            if style not in known:
                raise ConfigError(f"data.style_repeats: no piece of style {style!r} in {folder} "
                                  f"(its styles: {', '.join(known) or 'none'})")
        times = np.array([style_repeats.get(self.styles[p], 1) for p in self.chunk_piece.tolist()], np.int64)
        self.chunk_piece, self.chunk_start, self.chunk_len = (np.repeat(a, times) for a in
                                                              (self.chunk_piece, self.chunk_start, self.chunk_len))

    def __len__(self) -> int:
        return len(self.chunk_piece)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L - 1) with L the longest chunk in the batch; targets -100 on padding."""
        x, y, _ = self._padded(np.asarray(idx))
        return torch.from_numpy(x), torch.from_numpy(y)

    def packed_batch(self, idx, row_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same chunks as `batch(idx)`, packed end to end into as few rows of at most `row_len` tokens as
        first-fit decreasing finds: (inputs, targets, segments), each (R, L). A chunk's segment id is its place
        in idx; the tail of a row is padding (-1, target -100). The model keeps each segment to itself
        (Transformer.forward), so the loss is `batch`'s without its padding: on the chorales a random batch
        is 29% padding."""
        x, y, n = self._padded(np.asarray(idx))
        order = np.argsort(-n, kind="stable")
        rows, fill = [], []  # chunk numbers per row, tokens used per row
        for c in order.tolist():
            r = next((r for r, used in enumerate(fill) if used + n[c] <= row_len), None)
            if r is None:
                rows.append([]), fill.append(0)
                r = len(rows) - 1
            rows[r].append(c)
            fill[r] += int(n[c])
        L = max(fill)
        xs = np.full((len(rows), L), self.pad, np.int64)
        ys = np.full((len(rows), L), -100, np.int64)
        seg = np.full((len(rows), L), -1, np.int64)
        for r, chunks in enumerate(rows):
            at = 0
            for c in sorted(chunks):  # in batch order within the row
                xs[r, at:at + n[c]], ys[r, at:at + n[c]], seg[r, at:at + n[c]] = x[c, :n[c]], y[c, :n[c]], c
                at += int(n[c])
        return torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(seg)

    def _padded(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, input lengths): each chunk's row, padded to the longest."""
        lens, start, piece = self.chunk_len[idx], self.chunk_start[idx], self.chunk_piece[idx]
        L = int(lens.max())
        pos = start[:, None] + np.arange(L)[None, :]  # position in the framed piece BOS + ids + EOS
        n_ids = (self.offsets[piece + 1] - self.offsets[piece])[:, None]
        valid = np.arange(L)[None, :] < lens[:, None]
        src = np.clip(self.offsets[piece][:, None] + pos - 1, 0, max(len(self.tokens) - 1, 0))
        seq = self.tokens[src].astype(np.int64) if len(self.tokens) else np.zeros(pos.shape, np.int64)
        seq = np.where(pos == 0, self.bos, np.where(pos == n_ids + 1, self.eos, seq))
        seq = np.where(valid, seq, self.pad)
        if self.mixer is not None:
            return self._mixed(idx, seq, lens, piece)
        return seq[:, :-1].copy(), np.where(valid[:, 1:], seq[:, 1:], -100), lens - 1

    def _mixed(self, idx, seq, lens, piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch with each chunk mixed (data/mixes.py); no loss on padding or on input-only ids."""
        rows = []
        for r, c in enumerate(idx.tolist()):
            rng = np.random.default_rng([self.seed, c, int(self.draws[c])])
            self.draws[c] += 1
            rows.append(self.mixer.mix(seq[r, :lens[r]], self.styles[piece[r]], rng, self.max_seq))
        n = np.array([len(r) for r in rows])
        out = np.full((len(rows), int(n.max())), self.pad, dtype=np.int64)
        for r, row in enumerate(rows):
            out[r, :len(row)] = row
        valid = np.arange(out.shape[1])[None, :] < n[:, None]
        target = valid[:, 1:] & ~self.mixer.input_only[out[:, 1:]]
        return out[:, :-1].copy(), np.where(target, out[:, 1:], -100), n - 1


def epoch_order(n: int, seed: int, epoch: int, lengths: np.ndarray | None = None, batch: int = 1,
                group: int = 0) -> np.ndarray:
    """The order of chunks in an epoch: a pure function of (seed, epoch), so a resumed run sees the same data.

    `group` > 0 (with the chunks' `lengths` and the `batch` size): the shuffled chunks are sorted by length
    within windows of `group` batches, cut into batches, and the batches shuffled (the last, short one kept
    last). A batch pads to its longest chunk, so batches of like lengths waste less compute on padding: on
    music21's corpus (short folk tunes beside 512-token motet chunks) most of a random batch is padding."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if not group or lengths is None or n <= batch:
        return order
    window = batch * group
    order = np.concatenate([w[np.argsort(-np.asarray(lengths)[w], kind="stable")]
                            for w in np.split(order, range(window, n, window))])
    whole = n // batch
    blocks = order[:whole * batch].reshape(whole, batch)[rng.permutation(whole)]
    return np.concatenate([blocks.reshape(-1), order[whole * batch:]])


def load_splits(folder: Path, min_seq: int, max_seq: int, mixes: Mixes | None = None, seed: int = 0,
                style_repeats: dict | None = None):
    """(tokenizer, train chunks, val chunks) of a prepared folder; a split with no chunk is refused.

    With `mixes` on (data.infill, data.attributes, data.style), the tokenizer gets the extra tokens
    (tokenize/extra.py, with the manifest's styles) and training chunks are mixed; validation stays plain.
    `style_repeats` ({style: times}): training chunks of those styles are listed that many times."""
    tok = load_tokenizer(Path(folder) / "tokenizer.json")
    mixer = None
    if mixes is not None and mixes.any:
        add_extra_vocab(tok, manifest_styles(read_manifest(Path(folder))), mixes.fim_layout)
        mixer = ChunkMixer(tok, mixes)
    splits = [TokenChunks(folder, s, min_seq, max_seq, tok.bos_id, tok.eos_id, tok.pad_id,
                          mixer=mixer if s == "train" else None, seed=seed,
                          style_repeats=style_repeats if s == "train" else None) for s in ("train", "val")]
    for name, chunks in zip(("train", "val"), splits):
        if len(chunks) == 0:
            raise DataError(f"{folder}: the {name} split has no usable piece (none of its files passed the filters, "
                            "see manifest.json 'skipped'): add files or change data.split or the filters")
    return tok, *splits
