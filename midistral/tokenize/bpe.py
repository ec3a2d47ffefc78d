"""BPE over REMIPlus base tokens, on Hugging Face `tokenizers` (Rust), compatible with MidiTok 3.1.

The recipe (remi-spec §8), so that vocabularies, merges and ids equal MidiTok's:
- base token id i is the character chr(i + 33); a piece is split into one string per bar, so merges
  never cross a bar line;
- the Metaspace pre-tokenizer prepends "▁" to each bar string (merges may include it);
- special tokens (PAD, BOS, EOS, MASK) are added tokens, never merged;
- training is `BpeTrainer` with the whole base alphabet as initial alphabet.

Decoding never goes through strings at run time: every BPE id maps to a precomputed array of base ids.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from midistral.errors import CheckpointError, ConfigError, MidistralError

CHR_OFFSET = 33  # base id i <-> chr(i + 33): printable, no space, as MidiTok
METASPACE = "\u2581"


def _build(base_vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = {chr(i + CHR_OFFSET): i for i in range(base_vocab_size)}
    tk = Tokenizer(models.BPE(vocab=alphabet, merges=[], continuing_subword_prefix="", end_of_word_suffix=""))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return tk, alphabet


class BPE:
    """A trained BPE model over base ids: `encode_bars(list of per-bar base id arrays) -> ids`, `decode(ids)`."""

    def __init__(self, hf_tokenizer, base_vocab_size: int):
        self.hf = hf_tokenizer
        self.base_vocab_size = int(base_vocab_size)
        self._chars = np.array([chr(i + CHR_OFFSET) for i in range(self.base_vocab_size)])
        # id -> base ids: strip one leading "▁", map each character back (a lone "▁" expands to nothing)
        size = self.hf.get_vocab_size()
        pieces = []
        for i in range(size):
            s = self.hf.id_to_token(i) or ""
            if s.startswith(METASPACE):
                s = s[1:]
            pieces.append([ord(ch) - CHR_OFFSET for ch in s])
        self._lens = np.array([len(p) for p in pieces], dtype=np.int64)
        self._offs = np.r_[0, np.cumsum(self._lens)[:-1]]
        self._flat = np.array([x for p in pieces for x in p], dtype=np.int64)

    def __len__(self) -> int:
        return self.hf.get_vocab_size()

    def _strings(self, bars: list[np.ndarray]) -> list[str]:
        return ["".join(self._chars[np.asarray(b, dtype=np.int64)]) for b in bars]

    def encode_bars(self, bars: list[np.ndarray]) -> np.ndarray:
        """BPE ids of one piece given as per-bar base id arrays (empty bars give nothing)."""
        if not bars:
            return np.zeros(0, dtype=np.int64)
        return np.array(self.hf.encode(self._strings(bars), is_pretokenized=True).ids, dtype=np.int64)

    def encode_pieces(self, pieces: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Several pieces at once (the Rust side runs them in parallel)."""
        enc = self.hf.encode_batch([self._strings(b) for b in pieces], is_pretokenized=True)
        return [np.array(e.ids, dtype=np.int64) for e in enc]

    def decode(self, ids) -> np.ndarray:
        """Base ids of BPE ids (a vectorised gather; unknown ids dropped)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < len(self._lens))]
        lens = self._lens[ids]
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.repeat(self._offs[ids] - np.r_[0, np.cumsum(lens)[:-1]], lens)
        return self._flat[starts + np.arange(total)]

    @classmethod
    def train(cls, bar_chunks_per_piece: Iterable[list[np.ndarray]], base_vocab_size: int, vocab_size: int,
              special_ids=(0, 1, 2, 3), show_progress: bool = True, length: int | None = None) -> "BPE":
        from tokenizers import AddedToken, trainers

        if vocab_size <= base_vocab_size:
            raise ConfigError(f"BPE vocab_size={vocab_size} must be larger than the base vocabulary ({base_vocab_size})")
        tk, alphabet = _build(base_vocab_size, [])
        chars = np.array(list(alphabet))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=show_progress,
            special_tokens=[AddedToken(chr(i + CHR_OFFSET)) for i in special_ids],
            initial_alphabet=list(alphabet), continuing_subword_prefix="", end_of_word_suffix="",
        )

        def strings():
            for bars in bar_chunks_per_piece:
                yield ["".join(chars[np.asarray(b, dtype=np.int64)]) for b in bars if len(b)]

        tk.train_from_iterator(strings(), trainer=trainer, length=length)
        return cls(tk, base_vocab_size)

    def to_dict(self) -> dict:
        return {"base_vocab_size": self.base_vocab_size, "hf_tokenizer": self.hf.to_str()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer") -> "BPE":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(d["hf_tokenizer"]), int(d["base_vocab_size"]))
        except KeyError as e:
            raise CheckpointError(f"{source}: BPE section lacks field {e.args[0]!r}") from None
        except Exception as e:
            raise CheckpointError(f"{source}: BPE model cannot be read ({e.__class__.__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------
# functions behind REMI.train_bpe / base_ids / encode_many / from_miditok


def _bars_of(tok, item) -> list[np.ndarray]:
    """Per-bar base ids of a MIDI path/bytes/Score, or of an already-tokenized piece (strings or base ids)."""
    if isinstance(item, (list, tuple, np.ndarray)) and len(item) and not isinstance(item[0], (list, np.ndarray)):
        ids = np.array([tok.vocab[t] for t in item]) if isinstance(item[0], str) else np.asarray(item, dtype=np.int64)
        return _split_ids_per_bar(tok, ids)
    if isinstance(item, (list, tuple)) and len(item) and isinstance(item[0], (list, np.ndarray)):
        return [np.asarray(b, dtype=np.int64) for b in item]  # already per bar
    return tok.base_ids_by_bar(item)


def _split_ids_per_bar(tok, ids: np.ndarray) -> list[np.ndarray]:
    """Token lists without ticks: split at each Bar token and at each bar crossed by rests, by re-encoding
    the decoded piece (the tokenizer's own round trip gives the same tokens)."""
    return tok.base_ids_by_bar(tok.decode(ids))


def _bars_or_error(tok, items) -> list:
    out = []
    for item in items:
        try:
            out.append((_bars_of(tok, item), None))
        except MidistralError as e:
            out.append((None, str(e)))
    return out


def _bars_worker(args):
    tok_dict, items = args
    from midistral.tokenize.remi import REMI

    return _bars_or_error(REMI.from_dict_cached(tok_dict), items)


def _workers(workers: int | None, n: int) -> int:
    w = (os.cpu_count() or 1) if workers is None else workers
    return max(1, min(w, n // 8 if n >= 16 else 1))


def _map_bars(tok, items: list, workers: int | None):
    """[(bars or None, error or None)] for each item, in parallel processes when worth it."""
    w = _workers(workers, len(items))
    if w == 1:
        return _bars_or_error(tok, items)
    d = tok.to_dict()
    d.pop("bpe", None)  # workers only need base ids
    step = max(1, len(items) // (w * 4))
    batches = [items[i:i + step] for i in range(0, len(items), step)]
    with ProcessPoolExecutor(w) as ex:
        return [r for batch in ex.map(_bars_worker, [(d, b) for b in batches]) for r in batch]


def train_bpe(tok, files_or_token_lists, vocab_size: int, workers: int | None = None, progress: bool = True):
    """Learn BPE merges on MIDI files (paths/bytes/Scores) or token lists; replaces any previous BPE.
    Files that cannot be read are skipped; returns the list of (item, error) skipped."""
    items = list(files_or_token_lists)
    results = _map_bars(tok, items, workers)
    skipped = [(it, err) for it, (_, err) in zip(items, results) if err is not None]
    pieces = [bars for bars, err in results if err is None]
    if not pieces:
        raise MidistralError("BPE training: no readable piece among the inputs")
    special_ids = [tok.vocab[f"{s}_None"] for s in tok.config.special_tokens]
    tok.bpe = BPE.train(pieces, len(tok.vocab), vocab_size, special_ids=special_ids,
                        show_progress=progress and len(pieces) >= 200, length=len(pieces))
    return skipped


def base_ids(tok, ids) -> np.ndarray:
    if tok.bpe is None:
        return np.asarray(ids, dtype=np.int64)
    return tok.bpe.decode(ids)


@dataclass
class EncodeResult:
    path: object
    ids: np.ndarray | None
    error: str | None


def encode_many(tok, paths, workers: int | None = None) -> list[EncodeResult]:
    """Encode many files in parallel processes; each file's failure is reported, not raised."""
    paths = list(paths)
    results = _map_bars(tok, paths, workers)
    bars_ok = [b for b, e in results if e is None]
    if tok.bpe is not None:
        encoded = iter(tok.bpe.encode_pieces(bars_ok)) if bars_ok else iter(())
    else:
        encoded = iter([np.concatenate(b) if b else np.zeros(0, np.int64) for b in bars_ok])
    return [EncodeResult(p, next(encoded), None) if e is None else EncodeResult(p, None, e)
            for p, (b, e) in zip(paths, results)]


def from_miditok(path):
    """A REMI tokenizer from a MidiTok 3.1 tokenizer JSON (`tokenizer.save`), with its BPE model if trained."""
    from tokenizers import Tokenizer

    from midistral.tokenize.config import REMIConfig
    from midistral.tokenize.remi import REMI

    from midistral.io import read_tokenizer_json

    path = Path(path)
    d = read_tokenizer_json(path)
    if "config" not in d:
        raise CheckpointError(f"{path}: not a MidiTok tokenizer file (no field 'config')")
    kind = d.get("tokenization")
    if kind != "REMI":
        raise CheckpointError(f"{path}: field 'tokenization' is {kind!r}; midistral reads MidiTok 'REMI' tokenizers")
    try:
        tok = REMI(REMIConfig.from_miditok_dict(d["config"]))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if "_vocab_base" in d and d["_vocab_base"] != tok.vocab:
        raise CheckpointError(f"{path}: field '_vocab_base' differs from the vocabulary its config gives")
    if d.get("_model"):
        try:
            hf = Tokenizer.from_str(d["_model"])
        except Exception as e:
            raise CheckpointError(f"{path}: field '_model' is not a tokenizers model ({e.__class__.__name__})") from None
        if json.loads(d["_model"]).get("model", {}).get("type") != "BPE":
            raise CheckpointError(f"{path}: field '_model' is not a BPE model (only BPE is supported)")
        tok.bpe = BPE(hf, len(tok.vocab))
    return tok
