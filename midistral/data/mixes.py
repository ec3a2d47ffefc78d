"""Training mixes, on the fly: fill-in-the-middle at bar boundaries, attribute controls, the style token.

A share of training chunks is rearranged (docs/infilling.md has the layout):

    spm  [BOS] [Style_s] [ACTrack x4] Infill_Bar x k  suffix  FillBar_Start  prefix  middle  FillBar_End
    psm  [BOS] [Style_s] [ACTrack x4] prefix  Infill_Bar x k  suffix  FillBar_Start  middle  FillBar_End

with the middle k whole bars of the chunk (1..`infill_max_bars`), cut where a bar starts: BPE never merges
across a bar, so a bar's ids begin at an id boundary (tokenize/extra.py `BarStats`). With attributes on,
each whole bar is preceded by its `ACBarNoteDensity`, `ACBarOnsetPolyphonyMin/Max` tokens (MidiTok 3.1's
values) and the chunk starts with the four track-level ones; these, the style, the holes and
FillBar_Start are what a user gives at sampling time, so they are inputs only (no loss on predicting
them); FillBar_End is learned. Validation chunks are never mixed: validation loss is on plain sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from midistral.tokenize.extra import BarStats, ExtraVocab


@dataclass
class Mixes:
    infill: float = 0.0  # share of training chunks rearranged for fill-in-the-middle
    infill_max_bars: int = 8  # the most bars a middle holds
    fim_layout: str = "spm"  # "spm": holes, suffix, FillBar_Start, prefix, middle; "psm": prefix first
    attributes: float = 0.0  # share of training chunks with attribute-control tokens
    style: float = 0.0  # share of training chunks (of pieces with a known style) that open with it

    @classmethod
    def from_data_config(cls, d) -> "Mixes":
        """From the run's DataConfig."""
        return cls(**{k: getattr(d, k) for k in ("infill", "infill_max_bars", "fim_layout", "attributes", "style")})

    @property
    def any(self) -> bool:
        return self.infill > 0 or self.attributes > 0 or self.style > 0


def add_extra_vocab(tok, styles=(), fim_layout: str = "spm") -> ExtraVocab:
    """Give `tok` the extra tokens (after its vocabulary) if it has none, in `fim_layout`; returns them."""
    if tok.extra is None:
        tok.extra = ExtraVocab(tok.music_size, styles=sorted({s for s in styles if s}))
    tok.extra.fim_layout = fim_layout
    return tok.extra


class ChunkMixer:
    """Mixes one chunk at a time: `mix(seq, style, rng) -> (ids, input_only)` (input_only: no loss on
    predicting that id)."""

    def __init__(self, tok, mixes: Mixes):
        self.tok, self.mixes, self.extra = tok, mixes, tok.extra
        self.stats = BarStats(tok)
        e = self.extra
        given = [e.hole_id, e.fill_start_id, *e.style_ids.values()]
        given += [i for t, i in e.id.items() if t.startswith("AC")]
        self.input_only = np.zeros(len(tok), bool)
        self.input_only[given] = True

    def mix(self, seq: np.ndarray, style: str | None, rng: np.random.Generator,
            max_len: int | None = None) -> np.ndarray:
        """The chunk `seq` (framed ids: BOS first if it opens the piece, EOS last if it closes it), mixed;
        longer than `max_len`, it loses whole bars from the end of its suffix, then ids from the start of
        what follows its head (BOS, style, track attributes); a middle is never cut."""
        m, e, tok = self.mixes, self.extra, self.tok
        use_style = style in e.style_ids and rng.random() < m.style
        use_attr = rng.random() < m.attributes
        use_fim = rng.random() < m.infill
        if not (use_style or use_attr or use_fim):
            return seq
        bos = len(seq) > 0 and seq[0] == tok.bos_id
        eos = len(seq) > 0 and seq[-1] == tok.eos_id
        body = seq[int(bos): len(seq) - int(eos)]
        starts = self.stats.bar_starts(body)
        bounds = np.r_[starts, len(body)]
        bars = [body[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        whole = len(bars) if eos else len(bars) - 1  # the chunk may cut its last bar
        head = [tok.bos_id] if bos else []
        if use_style:
            head.append(e.style_ids[style])
        if use_attr and whole > 0:
            dens, pmin, pmax = self.stats.per_bar(body, starts)
            sounding = dens[:whole] > 0
            head += e.track_ids(dens[:whole], int(pmin[:whole][sounding].min()) if sounding.any() else 1,
                                int(pmax[:whole].max()))
            bars = [np.r_[e.bar_ids(dens[i], pmin[i], pmax[i]), b] if i < whole else b for i, b in enumerate(bars)]
        pre = body[:starts[0]] if len(starts) else body
        cat = lambda parts: np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])  # noqa: E731
        if use_fim and whole >= 1 and len(bars) >= 2:
            k = int(rng.integers(1, min(m.infill_max_bars, whole) + 1))
            a = int(rng.integers(0, whole - k + 1))
            # a bar the chunk cuts is left out: FillBar_Start comes where a bar could start
            prefix, suffix, mid = cat([pre, *bars[:a]]), bars[a + k:whole], cat(bars[a:a + k])
            fixed = len(head) + k + 2 + len(mid)
            while suffix and max_len and fixed + len(prefix) + sum(map(len, suffix)) > max_len:
                suffix = suffix[:-1]  # too long: whole bars off the suffix's end, then the prefix's start
            room = max_len - fixed - sum(map(len, suffix)) if max_len else len(prefix)
            if room >= 0:
                prefix = prefix[len(prefix) - room:] if room < len(prefix) else prefix
                return cat([head, e.fim(prefix, k, cat([[], *suffix]), mid), [e.fill_end_id]])
        out = cat([head, pre, *bars, [tok.eos_id] if eos else []])
        excess = len(out) - max_len if max_len else 0
        if excess > 0:  # too long: ids off the start of what follows the head
            out = np.r_[out[:len(head)], out[len(head) + excess:]]
        return out
