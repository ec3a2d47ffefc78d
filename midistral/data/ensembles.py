"""Drawn ensembles (`data.ensembles`): each voice of a piece given a General MIDI instrument of its range.

A share of the pieces and of their copies is prepared in another instrumentation, so the model learns which
instruments play which role (and more instruments than the files name). The draw is seeded by the file name,
the copy (0 the piece, 1.. its copies) and `data.seed`: every split gets a fixed ensemble, the same on every
machine. Drum tracks keep their program; a piece with drums keeps its pitched tracks' programs too.

Two draws:
- `draw_ensemble` (the chorale sources and folders of MIDI files): 1 to 4 voices ranked by mean pitch get
  distinct programs from the soprano/alto/tenor/bass pools (VOICE_POOLS), whose ranges cover the chorale voices.
- `draw_general` (the music21 corpus: any number of voices, any range): per copy one kind of ensemble:
    mixed     each voice its own instrument, any family, whose range covers the voice's lowest and highest note;
    family    every voice from one family (strings, brass, winds, voices, guitars), its range covering the voice;
    band      the lowest voice a bass, the highest a melody instrument, the voices between one chord instrument
              (piano, electric piano, organ, guitar, string ensemble), which plays them as one track;
    keyboard  the whole piece on one keyboard (piano, electric piano, harpsichord, organ): a piano piece.
  Voices are distinct instruments except where the kind says (band's chords, keyboard); a voice no instrument
  of the kind covers gets a keyboard (piano covers every pitch the tokenizer writes).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Per voice (soprano, alto, tenor, bass): programs whose range covers the voice's usual tessitura in the chorales
# (about D4-F5, A3-C5, D3-G4, E2-D4; tests/test_data.py checks them against instrument ranges).
VOICE_POOLS = (
    (73, 68, 40, 56, 71, 64),      # flute, oboe, violin, trumpet, clarinet, soprano sax
    (71, 41, 60, 40, 69, 65),      # clarinet, viola, French horn, violin, English horn, alto sax (not oboe: Bb3 up)
    (71, 41, 60, 42, 57, 70, 66),  # clarinet, viola, French horn, cello, trombone, bassoon, tenor sax
    (70, 42, 43, 32, 33, 58, 57),  # bassoon, cello, contrabass, acoustic bass, electric bass, tuba, trombone
)

# Sounding range (lowest, highest MIDI pitch) of every instrument the general draw may give, by family.
FAMILIES: dict[str, dict[int, tuple[int, int]]] = {
    "keyboard": {0: (21, 108), 4: (28, 100), 6: (29, 89), 19: (24, 96)},
    "strings": {40: (55, 103), 41: (48, 91), 42: (36, 76), 43: (28, 67), 46: (24, 103), 110: (55, 100)},
    "brass": {56: (54, 82), 57: (40, 72), 58: (28, 65), 60: (34, 77)},
    "winds": {72: (74, 108), 73: (60, 96), 68: (58, 91), 69: (52, 84), 71: (50, 94), 70: (34, 75),
              64: (56, 87), 65: (49, 81), 66: (44, 76), 67: (37, 68)},
    "voices": {52: (40, 81), 53: (48, 79)},
    "guitars": {24: (40, 83), 25: (40, 86), 26: (40, 86), 27: (40, 86)},
    "basses": {32: (28, 67), 33: (28, 67), 34: (28, 67), 35: (28, 67)},
    "other": {11: (53, 89), 12: (45, 96), 21: (53, 89), 22: (60, 96)},  # vibraphone, marimba, accordion, harmonica
}
RANGES = {p: r for fam in FAMILIES.values() for p, r in fam.items()} | {48: (28, 103)}  # 48: string ensemble
CHORD_PROGRAMS = (0, 4, 19, 24, 25, 48)  # band: who plays the inner voices
KINDS = (("mixed", 0.4), ("family", 0.25), ("band", 0.2), ("keyboard", 0.15))


def _roles(n: int) -> list[int]:
    """The voices (0 soprano .. 3 bass) of n parts from the highest to the lowest: S; S B; S A B; S A T B."""
    return {1: [0], 2: [0, 3], 3: [0, 1, 3], 4: [0, 1, 2, 3]}[n]


def _rng(name: str, copy: int, seed: int, stream: int):
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, h, copy, stream])


def draw_ensemble(name: str, copy: int, seed: int = 0, voices: int = 4) -> list[int]:
    """One program per voice, highest part first: distinct, each from its voice's pool; deterministic in
    (file name, copy: 0 the piece itself, 1.. its transposed copies, seed)."""
    rng = _rng(name, copy, seed, 1)
    chosen: list[int] = []
    for role in _roles(voices):
        pool = [p for p in VOICE_POOLS[role] if p not in chosen]
        chosen.append(int(pool[rng.integers(len(pool))]))
    return chosen


def _fits(program: int, lo: int, hi: int) -> bool:
    a, b = RANGES[program]
    return a <= lo and hi <= b


def _pick(rng, pool, lo: int, hi: int, taken: list[int]) -> int | None:
    """A program of `pool` covering [lo, hi] and not yet taken, uniformly; None if there is none."""
    fit = [p for p in pool if p not in taken and _fits(p, lo, hi)]
    return int(fit[rng.integers(len(fit))]) if fit else None


def _keyboard(rng, lo: int, hi: int, taken: list[int]) -> int:
    """The fallback for a voice no instrument of the kind covers: a free keyboard that does, else the piano."""
    return _pick(rng, FAMILIES["keyboard"], lo, hi, taken) or 0


def draw_general(name: str, copy: int, ranges: list[tuple[int, int]], seed: int = 0) -> tuple[str, list[int]]:
    """(kind, one program per voice) for voices with these (lowest, highest) pitches, highest voice first;
    deterministic in (file name, copy, seed, ranges)."""
    rng = _rng(name, copy, seed, 2)
    n = len(ranges)
    kinds = [k for k, _ in KINDS if not (k == "band" and n < 3)]
    weights = np.array([w for k, w in KINDS if k in kinds])
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    chosen: list[int] = []
    if kind == "keyboard":
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        return kind, [_keyboard(rng, lo, hi, [])] * n
    if kind == "family":
        fams = [f for f in ("strings", "brass", "winds", "voices", "guitars")
                if all(any(_fits(p, lo, hi) for p in FAMILIES[f]) for lo, hi in ranges)]
        pool = list(FAMILIES[fams[rng.integers(len(fams))]] if fams else FAMILIES["keyboard"])
    else:
        pool = list(RANGES)
    chord = int(CHORD_PROGRAMS[rng.integers(len(CHORD_PROGRAMS))]) if kind == "band" else None
    for i, (lo, hi) in enumerate(ranges):
        if kind == "band" and i == n - 1:
            p = _pick(rng, FAMILIES["basses"], lo, hi, chosen)
        elif kind == "band" and 0 < i < n - 1 and _fits(chord, lo, hi):
            p = chord
        else:
            p = _pick(rng, [q for q in pool if q != chord], lo, hi, chosen)
        chosen.append(p if p is not None else _keyboard(rng, lo, hi, chosen))
    return kind, chosen


def ensemble_for(score, name: str, copy: int, share: float, seed: int = 0, general: bool = False) -> list[int] | None:
    """The programs to give `score`'s tracks (in track order) for this copy, or None to keep them: a drawn
    ensemble for a `share` of the copies (seeded like the draw). `general` False: `draw_ensemble`, for pieces
    of 1 to 4 pitched tracks and no drums; True: `draw_general`, for any number of pitched tracks (drum
    tracks keep their program). The voices are ranked by mean pitch, highest first."""
    if share <= 0 or _rng(name, copy, seed, 0).random() >= share:
        return None
    tracks = list(score.tracks)
    pitched = [i for i, t in enumerate(tracks) if not t.is_drum and len(t.notes)]
    if not pitched or (not general and (len(tracks) > 4 or len(pitched) != len(tracks))):
        return None
    notes = [tracks[i].notes.numpy()["pitch"] for i in pitched]
    by_height = sorted(range(len(pitched)), key=lambda k: (-float(notes[k].mean()), k))
    if general:
        drawn = draw_general(name, copy, [(int(notes[k].min()), int(notes[k].max())) for k in by_height], seed)[1]
    else:
        drawn = draw_ensemble(name, copy, seed, len(pitched))
    programs = [t.program for t in tracks]
    for rank, k in enumerate(by_height):
        programs[pitched[k]] = drawn[rank]
    return programs
