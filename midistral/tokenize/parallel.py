"""Many pieces at once: per-bar base ids in worker processes, and `encode_many` (REMI.encode_many).

A worker rebuilds the caller's tokenizer from its dict (once per process) with the caller's own class,
passed along with the work, so this module needs nothing from remi.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from midistral.errors import MidistralError


@dataclass
class EncodeResult:
    path: object
    ids: np.ndarray | None
    error: str | None


def bars_of(tok, item) -> list[np.ndarray]:
    """Per-bar base ids of a MIDI path/bytes/Score, or of an already-tokenized piece (strings or base ids)."""
    if isinstance(item, (list, tuple, np.ndarray)) and len(item) and not isinstance(item[0], (list, np.ndarray)):
        ids = np.array([tok.vocab[t] for t in item]) if isinstance(item[0], str) else np.asarray(item, dtype=np.int64)
        # token lists carry no ticks: the tokenizer's round trip gives the same tokens, with their bars
        return tok.base_ids_by_bar(tok.decode(ids))
    if isinstance(item, (list, tuple)) and len(item) and isinstance(item[0], (list, np.ndarray)):
        return [np.asarray(b, dtype=np.int64) for b in item]  # already per bar
    return tok.base_ids_by_bar(item)


def _bars_or_error(tok, items) -> list:
    out = []
    for item in items:
        try:
            out.append((bars_of(tok, item), None))
        except MidistralError as e:
            out.append((None, str(e)))
    return out


def _bars_worker(args):
    tok_class, tok_dict, items = args
    return _bars_or_error(tok_class.from_dict_cached(tok_dict), items)


def _workers(workers: int | None, n: int) -> int:
    w = (os.cpu_count() or 1) if workers is None else workers
    return max(1, min(w, n // 8 if n >= 16 else 1))


def map_bars(tok, items: list, workers: int | None) -> list:
    """[(bars or None, error or None)] for each item, in parallel processes when worth it."""
    w = _workers(workers, len(items))
    if w == 1:
        return _bars_or_error(tok, items)
    d = tok.to_dict()
    d.pop("bpe", None)  # workers only need base ids
    step = max(1, len(items) // (w * 4))
    batches = [items[i:i + step] for i in range(0, len(items), step)]
    with ProcessPoolExecutor(w) as ex:
        return [r for batch in ex.map(_bars_worker, [(type(tok), d, b) for b in batches]) for r in batch]


def encode_many(tok, paths, workers: int | None = None) -> list[EncodeResult]:
    """Encode many files in parallel processes; each file's failure is reported, not raised."""
    paths = list(paths)
    results = map_bars(tok, paths, workers)
    bars_ok = [b for b, e in results if e is None]
    if tok.bpe is not None:
        encoded = iter(tok.bpe.encode_pieces(bars_ok)) if bars_ok else iter(())
    else:
        encoded = iter([np.concatenate(b) if b else np.zeros(0, np.int64) for b in bars_ok])
    return [EncodeResult(p, next(encoded), None) if e is None else EncodeResult(p, None, e)
            for p, (b, e) in zip(paths, results)]
