"""Objective per-piece music metrics on symusic scores, and the report's failure modes as numbers.

Every metric is computed at a fixed resolution of 12 ticks per quarter note (a "beat" below), as muspy 0.5
does after `adjust_resolution(12)`: onsets and ends are rounded separately (half to even). The definitions
follow muspy 0.5 where it has the metric, including its quirks (polyphony_rate counts steps with MORE than
two pitches; empty_beat_rate also marks the beat in which a note ends exactly; groove and measure metrics use
one bar length, that of the first time signature). Drum tracks are ignored by the pitch metrics and are the
only tracks the drum metrics look at. All work is numpy over the notes of a piece: no per-note Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import symusic

RESOLUTION = 12  # ticks per quarter note for every metric
_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)
_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], bool)
# the 24 scale masks: rows 0..11 major on root 0..11, rows 12..23 minor on root 0..11
SCALES = np.stack([np.roll(_MAJOR, r) for r in range(12)] + [np.roll(_MINOR, r) for r in range(12)])
DRUM_PROGRAM = -1  # how prompt_programs names the drum kit (as midistral.controls does)


@dataclass(frozen=True)
class Notes:
    """All notes of a piece at RESOLUTION: one entry per note, tracks concatenated."""

    start: np.ndarray  # int64 ticks at RESOLUTION
    end: np.ndarray
    pitch: np.ndarray
    program: np.ndarray  # the track's program, DRUM_PROGRAM for drum tracks
    is_drum: np.ndarray  # bool
    measure: int  # ticks per bar at RESOLUTION (first time signature; 4/4 when there is none)
    n_tracks: int

    @property
    def length(self) -> int:
        """muspy's song length: the latest note end (0 without notes)."""
        return int(self.end.max()) if len(self.end) else 0


def measure_resolution(score: symusic.Score) -> int:
    """Ticks per bar at RESOLUTION from the first time signature (4/4 without one)."""
    ts = score.time_signatures
    num, den = (ts[0].numerator, ts[0].denominator) if len(ts) else (4, 4)
    return max(1, round(RESOLUTION * 4 * num / den))


def collect_notes(score: symusic.Score) -> Notes:
    """The notes of `score` (ticks, any tpq) rescaled to RESOLUTION ticks per quarter note."""
    if score.ticks_per_quarter <= 0:
        raise ValueError(f"ticks_per_quarter={score.ticks_per_quarter}: expected a positive resolution")
    if str(score.ttype) != "Tick":
        score = score.to("tick")
    factor = RESOLUTION / score.ticks_per_quarter
    parts = []
    for track in score.tracks:
        n = track.notes.numpy()
        if len(n["time"]):
            prog = DRUM_PROGRAM if track.is_drum else track.program
            parts.append((n["time"].astype(np.int64), n["duration"].astype(np.int64), n["pitch"].astype(np.int64),
                          np.full(len(n["time"]), prog, np.int64), np.full(len(n["time"]), track.is_drum)))
    if parts:
        time, dur, pitch, program, drum = (np.concatenate(c) for c in zip(*parts))
    else:
        time = dur = pitch = program = np.zeros(0, np.int64)
        drum = np.zeros(0, bool)
    start = np.rint(time * factor).astype(np.int64)  # np.rint rounds half to even, as Python's round
    end = np.rint((time + dur) * factor).astype(np.int64)
    return Notes(start, end, pitch, program, drum.astype(bool), measure_resolution(score), len(score.tracks))


def _as_notes(score_or_notes) -> Notes:
    return score_or_notes if isinstance(score_or_notes, Notes) else collect_notes(score_or_notes)


def _pitch_counts(n: Notes, classes: int = 128) -> np.ndarray:
    pitched = n.pitch[~n.is_drum]
    return np.bincount(pitched % classes if classes != 128 else pitched, minlength=classes)[:classes].astype(float)


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total < 1:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _pianoroll(n: Notes) -> np.ndarray:
    """muspy's binary pianoroll (length x 128) of the pitched notes, built with a difference array."""
    length = n.length
    keep = ~n.is_drum & (n.end > n.start)
    diff = np.zeros((length + 1) * 128, np.int64)
    np.add.at(diff, n.start[keep] * 128 + n.pitch[keep], 1)
    np.add.at(diff, n.end[keep] * 128 + n.pitch[keep], -1)
    return np.cumsum(diff.reshape(length + 1, 128), axis=0)[:length] > 0


def _covered(first: np.ndarray, last: np.ndarray, size: int) -> np.ndarray:
    """Bool mask of `size` cells: True where some interval [first, last] (inclusive) covers the cell."""
    diff = np.zeros(size + 1, np.int64)
    np.add.at(diff, first, 1)
    np.add.at(diff, last + 1, -1)
    return np.cumsum(diff)[:size] > 0


def pitch_range(score) -> float:
    """Highest minus lowest pitched note (0 without pitched notes)."""
    n = _as_notes(score)
    p = n.pitch[~n.is_drum]
    return float(p.max() - p.min()) if len(p) else 0.0


def n_pitches_used(score) -> float:
    return float(np.count_nonzero(_pitch_counts(_as_notes(score))))


def n_pitch_classes_used(score) -> float:
    return float(np.count_nonzero(_pitch_counts(_as_notes(score), 12)))


def pitch_entropy(score) -> float:
    return _entropy(_pitch_counts(_as_notes(score)))


def pitch_class_entropy(score) -> float:
    return _entropy(_pitch_counts(_as_notes(score), 12))


def pitch_in_scale_rate(score, root: int, mode: str) -> float:
    """Share of pitched notes in the scale of `root` (0 = C) and `mode` ("major" | "minor")."""
    if mode not in ("major", "minor"):
        raise ValueError(f"mode={mode!r}: expected 'major' or 'minor'")
    counts = _pitch_counts(_as_notes(score), 12)
    if counts.sum() < 1:
        return math.nan
    return float(counts[SCALES[root % 12 + (12 if mode == "minor" else 0)]].sum() / counts.sum())


def scale_consistency(score) -> float:
    """The largest pitch-in-scale rate over the 24 major and minor scales."""
    counts = _pitch_counts(_as_notes(score), 12)
    if counts.sum() < 1:
        return math.nan
    return float((SCALES @ counts).max() / counts.sum())


def polyphony(score) -> float:
    """Mean number of pitches sounding, over the steps where at least one sounds."""
    roll = _pianoroll(_as_notes(score))
    on = np.count_nonzero(roll.any(axis=1))
    return float(roll.sum() / on) if on else math.nan


def polyphony_rate(score, threshold: int = 2) -> float:
    """Share of time steps with more than `threshold` pitches sounding (muspy's definition)."""
    roll = _pianoroll(_as_notes(score))
    return float(np.count_nonzero(roll.sum(axis=1) > threshold) / len(roll)) if len(roll) else math.nan


def _empty_rate(n: Notes, unit: int) -> float:
    if n.length < 1:
        return math.nan
    cells = n.length // unit + 1
    return 1.0 - np.count_nonzero(_covered(n.start // unit, n.end // unit, cells)) / cells


def empty_beat_rate(score) -> float:
    """Share of beats in which no note (drums included) sounds."""
    return _empty_rate(_as_notes(score), RESOLUTION)


def empty_measure_rate(score) -> float:
    """Share of bars in which no note (drums included) sounds."""
    n = _as_notes(score)
    return _empty_rate(n, n.measure)


def groove_consistency(score) -> float:
    """1 - mean Hamming distance between the onset patterns of neighbouring bars (per bar position)."""
    n = _as_notes(score)
    bars = n.length // n.measure + 1
    if bars < 2:
        return math.nan
    grid = np.zeros(bars * n.measure, bool)
    grid[n.start] = True
    grid = grid.reshape(bars, n.measure)
    return 1.0 - np.count_nonzero(grid[:-1] != grid[1:]) / (n.measure * (bars - 1))


def drum_in_pattern_rate(score, meter: str = "duple") -> float:
    """Share of drum onsets on the meter's grid within a beat (duple: 0, 1/4, 1/2, 3/4; triple: 0, 1/3, 2/3)."""
    if meter == "duple":
        grid = np.isin(np.arange(RESOLUTION), [0, RESOLUTION // 4, RESOLUTION // 2, 3 * RESOLUTION // 4])
    elif meter == "triple":
        grid = np.isin(np.arange(RESOLUTION), [0, RESOLUTION // 3, 2 * RESOLUTION // 3])
    else:
        raise ValueError(f"meter={meter!r}: expected 'duple' or 'triple'")
    n = _as_notes(score)
    onsets = n.start[n.is_drum]
    return float(grid[onsets % RESOLUTION].mean()) if len(onsets) else math.nan


def drum_pattern_consistency(score) -> float:
    return max(drum_in_pattern_rate(score, "duple"), drum_in_pattern_rate(score, "triple"))


def notes_per_bar(score) -> float:
    """Notes (drums included) per bar, bars counted up to the last note end (NaN without notes)."""
    n = _as_notes(score)
    return len(n.start) / -(-n.length // n.measure) if n.length else math.nan


METRICS = {f.__name__: f for f in (
    pitch_range, n_pitches_used, n_pitch_classes_used, polyphony, polyphony_rate, scale_consistency,
    pitch_entropy, pitch_class_entropy, empty_beat_rate, empty_measure_rate, groove_consistency,
    drum_in_pattern_rate, drum_pattern_consistency, notes_per_bar)}


def piece_metrics(score) -> dict[str, float]:
    """Every metric of METRICS for one piece (NaN where a metric is undefined, e.g. drum metrics without drums)."""
    n = _as_notes(score)
    return {name: float(f(n)) for name, f in METRICS.items()}


def _bars(n: Notes, start_tick: int) -> tuple[int, int]:
    """First bar entirely after `start_tick` (RESOLUTION ticks) and the number of bars up to the last note end."""
    return -(-start_tick // n.measure), -(-n.length // n.measure)


def _silent_share(n: Notes, first: int, total: int, programs: np.ndarray) -> float:
    """Share of bars [first, total) in which at least one of `programs` has no sounding note."""
    if total <= first or not len(programs):
        return 0.0
    heard = np.zeros((len(programs), total), bool)
    for row, prog in enumerate(programs):  # a loop over instruments, not notes
        mine = (n.program == prog) & (n.end > n.start)
        heard[row] = _covered(n.start[mine] // n.measure, (n.end[mine] - 1) // n.measure, total)
    return float((~heard[:, first:]).any(axis=0).mean())


def _loop_score(n: Notes, first: int, total: int) -> float:
    """Share of bars [first, total) whose notes (position in bar, pitch, duration, program) repeat bar i-1 or i-2."""
    if total <= first:
        return 0.0
    bar, pos = np.divmod(n.start, n.measure)
    rows = np.stack([bar, pos, n.pitch, n.end - n.start, n.program], axis=1)
    rows = rows[np.lexsort(rows.T[::-1])]
    bounds = np.searchsorted(rows[:, 0], np.arange(total + 1))
    content = [rows[bounds[b]:bounds[b + 1], 1:].tobytes() for b in range(total)]  # a loop over bars
    repeats = [bool(content[b]) and content[b] in content[max(0, b - 2):b] for b in range(first, total)]
    return float(np.mean(repeats))


def failure_modes(score, start_tick: int = 0, prompt_programs=None) -> dict[str, float]:
    """The report's three failure modes, over the bars that begin at or after `start_tick` (the generated part).

    silent_share: share of those bars in which an instrument of the prompt is silent. The prompt's
        instruments are `prompt_programs` (drums = -1) if given, else the programs that play before
        `start_tick`, else (no prompt) every program that plays in the piece.
    loop_score: share of those bars that repeat one of the previous two bars exactly (same notes at the
        same positions; an empty bar is no repeat).
    out_of_key: share of the pitched notes starting at or after `start_tick` outside the best of the 24
        major/minor keys of the whole piece.
    """
    score = score if isinstance(score, symusic.Score) else symusic.Score(score)
    n = collect_notes(score)
    start = int(np.rint(start_tick * RESOLUTION / score.ticks_per_quarter))
    first, total = _bars(n, start)
    if prompt_programs is not None:
        programs = np.unique(np.asarray(list(prompt_programs), np.int64))
    else:
        before = n.start < start
        programs = np.unique(n.program[before] if before.any() else n.program)
    counts = _pitch_counts(n, 12)
    key = SCALES[np.argmax(SCALES @ counts)]
    later = ~n.is_drum & (n.start >= start)
    out_of_key = float((~key[n.pitch[later] % 12]).mean()) if later.any() else 0.0
    return {"silent_share": _silent_share(n, first, total, programs), "loop_score": _loop_score(n, first, total),
            "out_of_key": out_of_key}
