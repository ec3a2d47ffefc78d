"""BPE training on MIDI files or token lists (REMI.train_bpe): per-bar chunks in parallel, then HF BPE."""

from __future__ import annotations

from midistral.errors import MidistralError
from midistral.tokenize.bpe import BPE
from midistral.tokenize.parallel import map_bars


def train_bpe(tok, files_or_token_lists, vocab_size: int, workers: int | None = None, progress: bool = True):
    """Learn BPE merges on MIDI files (paths/bytes/Scores) or token lists; replaces any previous BPE.
    Files that cannot be read are skipped; returns the list of (item, error) skipped."""
    items = list(files_or_token_lists)
    results = map_bars(tok, items, workers)
    skipped = [(it, err) for it, (_, err) in zip(items, results) if err is not None]
    pieces = [bars for bars, err in results if err is None]
    if not pieces:
        raise MidistralError("BPE training: no readable piece among the inputs")
    tok.bpe = BPE.train(pieces, len(tok.vocab), vocab_size, special_ids=tok.special_ids,
                        show_progress=progress and len(pieces) >= 200, length=len(pieces))
    return skipped
