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

from typing import Iterable

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from midistral.errors import CheckpointError, ConfigError

CHR_OFFSET = 33  # base id i <-> chr(i + 33): printable, no space, as MidiTok
METASPACE = "\u2581"


def _build(base_vocab_size: int):
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

    @property
    def lengths(self) -> np.ndarray:
        """The number of base ids each BPE id expands to (0 for a lone word start)."""
        return self._lens

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

    def encode_word(self, base_ids, starts_bar: bool) -> list[int]:
        """BPE ids of one run of base ids inside a bar, as training segments it (`starts_bar`: the run opens
        the bar, so it carries the bar's "▁"); for streams built piece by piece (controls.accompany)."""
        s = "".join(self._chars[np.asarray(base_ids, dtype=np.int64)])
        return [t.id for t in self.hf.model.tokenize(METASPACE + s if starts_bar else s)]

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

    def expansions(self) -> list[np.ndarray]:
        """The base ids each BPE id stands for (a lone "▁" stands for none)."""
        return np.split(self._flat, self._offs[1:])

    @classmethod
    def train(cls, bar_chunks_per_piece: Iterable[list[np.ndarray]], base_vocab_size: int, vocab_size: int,
              special_ids=(0, 1, 2, 3), show_progress: bool = True, length: int | None = None) -> "BPE":
        if vocab_size <= base_vocab_size:
            raise ConfigError(f"BPE vocab_size={vocab_size} must be larger than the base vocabulary ({base_vocab_size})")
        tk, alphabet = _build(base_vocab_size)
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
        try:
            return cls(Tokenizer.from_str(d["hf_tokenizer"]), int(d["base_vocab_size"]))
        except KeyError as e:
            raise CheckpointError(f"{source}: BPE section lacks field {e.args[0]!r}") from None
        except Exception as e:
            raise CheckpointError(f"{source}: BPE model cannot be read ({e.__class__.__name__}: {e})") from None
