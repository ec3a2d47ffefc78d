"""Objective per-piece music metrics on symusic scores, the reference setup's failure modes, and copying, as numbers.

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
_DRUM_GRIDS = {"duple": np.arange(RESOLUTION) % (RESOLUTION // 4) == 0, "triple": np.arange(RESOLUTION) % (RESOLUTION // 3) == 0}
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
    return np.bincount(n.pitch[~n.is_drum] % classes, minlength=classes).astype(float)


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total < 1:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _sounding_pitches(n: Notes) -> np.ndarray:
    """Per time step (0 .. length-1), how many distinct pitches sound: muspy's pianoroll summed over pitches.

    Notes of one pitch are merged into disjoint intervals first (sorted by pitch then onset, a running max of
    the ends; each pitch offset by pitch * (length + 1) so pitches never merge), then counted with a difference array.
    """
    length = n.length
    keep = ~n.is_drum & (n.end > n.start)
    order = np.lexsort((n.start[keep], n.pitch[keep]))
    base = n.pitch[keep][order] * (length + 1)
    start, end = base + n.start[keep][order], base + n.end[keep][order]
    reach = np.maximum.accumulate(end) if len(end) else end
    new = np.r_[True, start[1:] >= reach[:-1]] if len(end) else np.zeros(0, bool)
    first = np.flatnonzero(new)
    merged_start = start[first] - base[first]
    merged_end = (np.maximum.reduceat(end, first) if len(first) else end[first]) - base[first]
    diff = np.bincount(merged_start, minlength=length + 1) - np.bincount(merged_end, minlength=length + 1)
    return np.cumsum(diff)[:length]


def _covered(first: np.ndarray, last: np.ndarray, size: int) -> np.ndarray:
    """Bool mask of `size` cells: True where some interval [first, last] (inclusive) covers the cell."""
    diff = np.bincount(first, minlength=size + 1) - np.bincount(last + 1, minlength=size + 1)
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
    sounding = _sounding_pitches(_as_notes(score))
    on = np.count_nonzero(sounding)
    return float(sounding.sum() / on) if on else math.nan


def polyphony_rate(score, threshold: int = 2) -> float:
    """Share of time steps with more than `threshold` pitches sounding (muspy's definition)."""
    sounding = _sounding_pitches(_as_notes(score))
    return float(np.count_nonzero(sounding > threshold) / len(sounding)) if len(sounding) else math.nan


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
    if meter not in _DRUM_GRIDS:
        raise ValueError(f"meter={meter!r}: expected 'duple' or 'triple'")
    grid = _DRUM_GRIDS[meter]
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


# ----------------------------------------------------------------------------------------------------
# Copying: which bars of a piece occur exactly in a training set.

COPY_INDEX_FILE = "copy_index.npz"  # a prepared data folder's training bars (beside its manifest)
MAX_COPIED_RUN = 4  # a run of this many consecutive bars of one training piece counts as a copy (sampler --reject)
_BAR_BITS = 24  # a bar's place in the index: piece << _BAR_BITS | bar


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value (uint64 arithmetic wraps)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bar_hashes(score, start_tick: int = 0, max_bars: int = 0) -> np.ndarray:
    """One 64-bit hash per bar from the bar that begins at or after `start_tick` (ticks of the score; bars as
    in failure_modes, of the first time signature): of the set of (onset within the bar, pitch) over all
    tracks (drums as pitches of their own), 0 for a bar without onsets. `max_bars` > 0: the first that many."""
    if isinstance(score, Notes):
        n, start = score, int(start_tick)
    else:
        score = score if isinstance(score, symusic.Score) else symusic.Score(score)
        n = collect_notes(score)
        start = int(np.rint(start_tick * RESOLUTION / score.ticks_per_quarter))
    first, total = _bars(n, start)
    if max_bars:
        total = min(total, first + max_bars)
    total = max(total, first)
    bar, onset = np.divmod(n.start, n.measure)
    keep = (bar >= first) & (bar < total)
    pitch = n.pitch + np.where(n.is_drum, 128, 0)
    code = np.unique((bar[keep] - first) << 20 | onset[keep] << 8 | pitch[keep])  # the set: repeats count once
    hashes = np.zeros(total - first, np.uint64)
    np.add.at(hashes, code >> 20, _mix64(code & ((1 << 20) - 1)))  # a set hash: the sum of the members' hashes
    return hashes


@dataclass(frozen=True)
class CopyIndex:
    """Every non-empty bar of a set of pieces (a training split): hashes sorted, with where each bar is."""

    hashes: np.ndarray  # uint64, sorted
    places: np.ndarray  # int64 piece << _BAR_BITS | bar, ascending within one hash
    n_pieces: int

    @classmethod
    def from_bars(cls, bars_per_piece) -> CopyIndex:
        """From each piece's bar_hashes."""
        hashes, places, n = [], [], 0
        for n, h in enumerate(bars_per_piece, 1):
            bar = np.flatnonzero(h)
            hashes.append(h[bar])
            places.append((n - 1) << _BAR_BITS | np.minimum(bar, (1 << _BAR_BITS) - 1))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        p = np.concatenate(places).astype(np.int64) if places else np.zeros(0, np.int64)
        order = np.lexsort((p, h))
        return cls(h[order], p[order], n)

    def save(self, path) -> None:
        """As .npz (numpy only, no pickle), through a temporary name (callers rename it into place)."""
        np.savez(path, hashes=self.hashes, places=self.places, n_pieces=np.int64(self.n_pieces))

    @classmethod
    def load(cls, path) -> CopyIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["hashes"], z["places"], int(z["n_pieces"]))

    def _places_of(self, h: np.uint64) -> np.ndarray:
        return self.places[np.searchsorted(self.hashes, h, "left"):np.searchsorted(self.hashes, h, "right")]

    def copying(self, score, start_tick: int = 0, max_bars: int = 0) -> dict[str, float]:
        """copied_bars: share of the piece's non-empty bars (from `start_tick`) that occur exactly in the set;
        copied_run: the longest run of consecutive bars equal to consecutive bars of ONE piece of the set."""
        hashes = bar_hashes(score, start_tick, max_bars)
        found = np.zeros(len(hashes), bool)
        run_places, runs = np.zeros(0, np.int64), np.zeros(0, np.int64)
        longest = 0
        for i, h in enumerate(hashes):  # a loop over bars, each a binary search
            places = self._places_of(h) if h else np.zeros(0, np.int64)
            found[i] = len(places) > 0
            new_runs = np.ones(len(places), np.int64)
            if len(runs) and len(places):  # runs that end at the bar just before in the same piece grow
                at = np.searchsorted(run_places, places - 1)
                hit = (at < len(run_places)) & (run_places[np.minimum(at, len(run_places) - 1)] == places - 1)
                new_runs[hit] += runs[at[hit]]
            run_places, runs = places, new_runs
            longest = max(longest, int(runs.max()) if len(runs) else 0)
        filled = np.count_nonzero(hashes)
        return {"copied_bars": float(found.sum() / filled) if filled else 0.0, "copied_run": float(longest)}


def copying_reasons(metrics: dict, max_run: int = MAX_COPIED_RUN) -> list[str]:
    """Why a sample copies too much ([] = it does not): a run of `max_run` or more bars of one training piece."""
    run = metrics.get("copied_run")
    return [f"copies {run:.0f} bars of a training piece (>= {max_run})"] if run is not None and run >= max_run else []
