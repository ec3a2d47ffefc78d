"""Tokens after the music vocabulary: fill-in-the-middle, style, and attribute controls.

Their ids come after the base + BPE vocabulary, so plain sequences keep MidiTok's ids. The tokenizer
holds them as `tok.extra` (None for tokenizers saved without them) and saves them in its JSON.

- Fill-in-the-middle at bar boundaries (the names of MMM / MIDI-GPT):
  `Infill_Bar` stands for one bar taken out, `FillBar_Start` opens the bars that fill the hole,
  `FillBar_End` closes them. Two layouts (`fim_layout`, recorded with the tokens; docs/infilling.md):
      psm  [BOS] [Style] [track attributes] prefix  Infill_Bar x k  suffix  FillBar_Start  middle  FillBar_End
      spm  [BOS] [Style] [track attributes] Infill_Bar x k  suffix  FillBar_Start  prefix  middle  FillBar_End
  In spm the middle goes on from the prefix as a plain continuation does, with the suffix read before.
- `Style_<name>`: one per style the prepared data's manifest records (bach, renaissance, folk, ...).
- Attribute controls, with MidiTok 3.1's names and values (its defaults: density up to 18, polyphony 1..6),
  computed here from token ids over the whole stream (all tracks together, as REMI+ writes them):
    per bar    `ACBarNoteDensity_n` `ACBarOnsetPolyphonyMin_a` `ACBarOnsetPolyphonyMax_b`  before the bar's Bar token
    per chunk  `ACTrackNoteDensityMin_a` `ACTrackNoteDensityMax_b` `ACTrackOnsetPolyphonyMin_c`
               `ACTrackOnsetPolyphonyMax_d`, after the style token.
  Note density counts onsets per bar; onset polyphony is the fewest and most notes starting at one tick.
  A bar here is a Bar token's segment: a Rest crossing bar lines makes one segment of the bars it crosses.
"""

from __future__ import annotations

import numpy as np

from midistral.errors import CheckpointError
from midistral.tokenize.family import Family

FIM_TOKENS = ("Infill_Bar", "FillBar_Start", "FillBar_End")
FIM_LAYOUTS = ("psm", "spm")  # prefix-suffix-middle, suffix-prefix-middle
# MidiTok 3.1's defaults (TokenizerConfig: ac_note_density_bar_max, ac_note_density_track_min/max,
# ac_polyphony_min/max)
DENSITY_BAR_MAX, DENSITY_TRACK_MIN, DENSITY_TRACK_MAX, POLY_MIN, POLY_MAX = 18, 0, 18, 1, 6
BAR_GROUP = ("ACBarNoteDensity", "ACBarOnsetPolyphonyMin", "ACBarOnsetPolyphonyMax")
TRACK_GROUP = ("ACTrackNoteDensityMin", "ACTrackNoteDensityMax", "ACTrackOnsetPolyphonyMin", "ACTrackOnsetPolyphonyMax")


def _attribute_tokens(dbar: int, dmin: int, dmax: int, pmin: int, pmax: int) -> list[str]:
    """The attribute-control vocabularies of MidiTok 3.1's classes, in their order."""
    return [
        *(f"ACBarNoteDensity_{i}" for i in range(dbar)), f"ACBarNoteDensity_{dbar}+",
        *(f"{t}_{v}" for t in ("ACBarOnsetPolyphonyMin", "ACBarOnsetPolyphonyMax") for v in range(pmin, pmax + 1)),
        *(f"ACTrackNoteDensityMin_{i}" for i in range(dmin, dmax)),
        *(f"ACTrackNoteDensityMax_{i}" for i in range(dmin, dmax)),
        f"ACTrackNoteDensityMin_{dmax}+", f"ACTrackNoteDensityMax_{dmax}+",
        *(f"{t}_{v}" for t in ("ACTrackOnsetPolyphonyMin", "ACTrackOnsetPolyphonyMax") for v in range(pmin, pmax + 1)),
    ]


def density_value(n: int, cap: int) -> str:
    """MidiTok's density value: the count, or "<cap>+" from the cap on."""
    return f"{cap}+" if n >= cap else str(int(n))


class ExtraVocab:
    """The extra tokens of one tokenizer: `ExtraVocab(start=len(tok), styles=[...])`; ids start..start+len-1."""

    def __init__(self, start: int, styles=(), density_bar_max: int = DENSITY_BAR_MAX,
                 density_track_min: int = DENSITY_TRACK_MIN, density_track_max: int = DENSITY_TRACK_MAX,
                 polyphony_min: int = POLY_MIN, polyphony_max: int = POLY_MAX, fim_layout: str = "psm"):
        if fim_layout not in FIM_LAYOUTS:
            raise ValueError(f"fim_layout {fim_layout!r}: expected one of {', '.join(FIM_LAYOUTS)}")
        self.start = int(start)
        self.fim_layout = fim_layout  # how the model was trained to fill a middle (tokenizers saved before: psm)
        self.styles = [str(s) for s in styles]
        self.params = dict(density_bar_max=int(density_bar_max), density_track_min=int(density_track_min),
                           density_track_max=int(density_track_max), polyphony_min=int(polyphony_min),
                           polyphony_max=int(polyphony_max))
        p = self.params
        self.tokens = [*FIM_TOKENS, *(f"Style_{s}" for s in self.styles),
                       *_attribute_tokens(p["density_bar_max"], p["density_track_min"], p["density_track_max"],
                                          p["polyphony_min"], p["polyphony_max"])]
        self.id = {t: self.start + i for i, t in enumerate(self.tokens)}
        self.hole_id, self.fill_start_id, self.fill_end_id = (self.id[t] for t in FIM_TOKENS)
        self.style_ids = {s: self.id[f"Style_{s}"] for s in self.styles}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def stop(self) -> int:
        return self.start + len(self.tokens)

    def kind(self, token_id: int) -> str:
        """What an extra id is: "Infill_Bar", "FillBar_Start", "FillBar_End", "Style", or the attribute's
        MidiTok type name ("ACBarNoteDensity", ...)."""
        t = self.tokens[token_id - self.start]
        return t if t in FIM_TOKENS else t.split("_", 1)[0]

    def is_extra(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.start) & (ids < self.stop)

    def bar_ids(self, density: int, poly_min: int, poly_max: int) -> list[int]:
        """The three per-bar tokens for a bar of `density` onsets and onset polyphony poly_min..poly_max."""
        p = self.params
        return [self.id[f"ACBarNoteDensity_{density_value(density, p['density_bar_max'])}"],
                self.id[f"ACBarOnsetPolyphonyMin_{_clip(poly_min, p)}"],
                self.id[f"ACBarOnsetPolyphonyMax_{_clip(poly_max, p)}"]]

    def track_ids(self, densities, poly_min: int, poly_max: int) -> list[int]:
        """The four per-chunk tokens from the per-bar onset counts and the stream's onset polyphony."""
        vals = track_values(densities, poly_min, poly_max, self.params)
        return [self.id[f"{t}_{v}"] for t, v in zip(TRACK_GROUP, vals)]

    def to_dict(self) -> dict:
        return {"start": self.start, "styles": list(self.styles), **self.params, "fim_layout": self.fim_layout}

    def fim(self, prefix, k: int, suffix, middle=()) -> np.ndarray:
        """The ids of a fill-in-the-middle sequence after its head (BOS, style, track attributes), in this
        vocabulary's layout: prefix, `k` holes, suffix, FillBar_Start, middle (psm) or holes, suffix,
        FillBar_Start, prefix, middle (spm)."""
        holes, start = [self.hole_id] * k, [self.fill_start_id]
        parts = ([prefix, holes, suffix, start, middle] if self.fim_layout == "psm"
                 else [holes, suffix, start, prefix, middle])
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer") -> "ExtraVocab":
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: field 'extra' cannot be read ({e})") from None


def _clip(poly: int, p: dict) -> int:
    return min(max(int(poly), p["polyphony_min"]), p["polyphony_max"])


def bar_values(density: int, poly_min: int, poly_max: int, p: dict | None = None) -> tuple[str, str, str]:
    """MidiTok 3.1's BarNoteDensity and BarOnsetPolyphony values of one bar (as token value strings)."""
    p = p or _default_params()
    return (density_value(density, p["density_bar_max"]),
            str(min(max(poly_min, p["polyphony_min"]), p["polyphony_max"])), str(min(poly_max, p["polyphony_max"])))


def track_values(densities, poly_min: int, poly_max: int, p: dict | None = None) -> tuple[str, str, str, str]:
    """MidiTok 3.1's TrackNoteDensity and TrackOnsetPolyphony values (as token value strings).

    As MidiTok: both densities are "<max>+" when the sparsest bar reaches the cap; the polyphony minimum
    is min() then max() with the same bound, so it is always `polyphony_min`."""
    p = p or _default_params()
    cap = p["density_track_max"]
    dmin, dmax = (int(np.min(densities)), int(np.max(densities))) if len(densities) else (0, 0)
    dens = (f"{cap}+", f"{cap}+") if dmin >= cap else (str(dmin), density_value(dmax, cap))
    pmin = max(min(poly_min, p["polyphony_min"]), p["polyphony_min"])
    # a chunk whose whole bars are silent has no onset: its maximum is clipped up to the vocabulary's lowest
    # value, as a bar's is (MidiTok never sees it: a track there always has notes)
    return (*dens, str(pmin), str(_clip(poly_max, p)))


def _default_params() -> dict:
    return dict(density_bar_max=DENSITY_BAR_MAX, density_track_min=DENSITY_TRACK_MIN,
                density_track_max=DENSITY_TRACK_MAX, polyphony_min=POLY_MIN, polyphony_max=POLY_MAX)


class BarStats:
    """Per-bar statistics of model ids, vectorised: where the bars start, onsets and polyphony per bar.

    `tok` is the REMI tokenizer (base ids or BPE). Bars start at the ids whose expansion begins with a
    Bar token (BPE never merges across a bar: a bar's tokens are one word, so a Bar is always the first
    base token of its id, or follows a lone word-start id "▁" that expands to nothing).
    """

    def __init__(self, tok):
        fam = tok.family
        n_music = len(tok.bpe) if tok.bpe is not None else len(tok.vocab)
        if tok.bpe is None:
            exps = [np.array([i]) for i in range(n_music)]
        else:
            exps = tok.bpe.expansions()
        lens = np.array([len(e) for e in exps])
        first = np.array([e[0] if len(e) else -1 for e in exps])
        self.n_music = n_music
        self.starts_bar = np.zeros(n_music + 1, bool)  # the last entry stands for any id past the music ids
        self.starts_bar[:n_music] = (first >= 0) & (fam[np.maximum(first, 0)] == Family.BAR)
        self.empty = np.zeros(n_music + 1, bool)
        self.empty[:n_music] = lens == 0
        self.tok, self.Family = tok, Family

    def bar_starts(self, ids: np.ndarray) -> np.ndarray:
        """Indices in `ids` where a bar starts (at a lone "▁" when one comes right before the Bar id)."""
        ids = np.asarray(ids, dtype=np.int64)
        safe = np.where((ids >= 0) & (ids < self.n_music), ids, self.n_music)
        i = np.flatnonzero(self.starts_bar[safe])
        lone_before = (i > 0) & self.empty[safe[np.maximum(i - 1, 0)]]
        return np.where(lone_before, i - 1, i)

    def per_bar(self, ids: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(onsets, polyphony min, polyphony max) of each bar [starts[i], starts[i+1]) (the last to the end).

        Onsets count the notes (Pitch/PitchDrum tokens); polyphony is over ticks with at least one note
        (0, 0 for a bar without notes). Everything outside the music ids is ignored."""
        ids = np.asarray(ids, dtype=np.int64)
        F = self.Family
        music = (ids >= 0) & (ids < self.n_music)
        if self.tok.bpe is not None:
            lens = self.tok.bpe.lengths[np.where(music, ids, 0)] * music
            base = self.tok.bpe.decode(ids[music])
        else:
            lens = music.astype(np.int64)
            base = ids[music]
        owner = np.repeat(np.arange(len(ids)), lens)  # the id each base token came from
        fam = self.tok.family[base]
        bar = np.searchsorted(starts, owner, side="right") - 1  # -1: before the first bar
        note = (fam == F.PITCH) | (fam == F.PITCH_DRUM)
        onset = np.cumsum((fam == F.POSITION) | (fam == F.BAR) | (fam == F.REST))
        nb = len(starts)
        keep = note & (bar >= 0)
        dens = np.bincount(bar[keep], minlength=nb)[:nb]
        pmin = np.zeros(nb, np.int64)
        pmax = np.zeros(nb, np.int64)
        if keep.any():
            pairs, counts = np.unique(np.stack([bar[keep], onset[keep]]), axis=1, return_counts=True)
            b = pairs[0]
            np.maximum.at(pmax, b, counts)
            pmin[:] = 1 << 30
            np.minimum.at(pmin, b, counts)
            pmin[pmin == 1 << 30] = 0
        return dens, pmin, pmax
