"""What the page needs to draw a variation's piano roll itself (GET /api/jobs/{id}/{k}/roll): notes in beats,
bar lines, and which notes are new, so that bars can be selected on it and regenerated.

    {"bars": [0.0, 4.0, 8.0, ...],       # bar lines in beats (quarter notes), the last one ends the last bar
     "tracks": [{"name": "Piano", "program": 0,
                 "notes": [[start, duration, pitch, new], ...]}],   # beats; new: 1 if the model wrote it
     "span": [first, last] | null}       # the bars this variation regenerated (1-based, both included)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import symusic

from midistral import music


@dataclass(frozen=True)
class Fresh:
    """Which notes of a variation the model wrote: from `start` on (a continuation; 0: all), those of track
    `track` (an added track), or those of `programs` starting in [start, end) (regenerated bars)."""

    start: int = 0
    end: int | None = None
    track: int | None = None
    programs: tuple[int, ...] | None = None
    bars: tuple[int, int] | None = None  # the regenerated bars, 1-based, both included
    # a continuation: the prompt's notes from `start` on, (program, pitch, tick); such a note is not new
    known: tuple[tuple[int, int, int], ...] = ()
    tolerance: int = 0                   # ticks a known note may have moved by (the tokenizer's grid)

    def mask(self, index: int, track: symusic.Track, notes) -> np.ndarray:
        times = notes["time"]
        if self.track is not None:
            return np.full(len(times), index == self.track)
        new = times >= self.start
        program = music.track_program(track)
        for i in np.flatnonzero(new) if self.known else ():
            pitch, time = int(notes["pitch"][i]), int(times[i])
            new[i] = not any(p == program and q == pitch and abs(t - time) <= self.tolerance for p, q, t in self.known)
        if self.end is not None:
            new &= times < self.end
        if self.programs is not None and program not in self.programs:
            new[:] = False
        return new


def continuation(prompt: symusic.Score, tpq: int, start_tick: int) -> Fresh:
    """The new notes of a continuation of `prompt` (in a score of `tpq` ticks a quarter, the prompt decoded up to
    `start_tick`): the model writes after the prompt's last onset, so notes before it are the prompt's, and
    notes from it on are new unless the prompt has them (within a 32nd note: the tokenizer's grid moves them)."""
    prompt = prompt.resample(tpq) if prompt.ticks_per_quarter != tpq else prompt
    onsets = [int(n.time) for t in prompt.tracks for n in t.notes]
    if not onsets:
        return Fresh(0)
    tolerance = tpq // 8
    last = max(onsets) - tolerance
    known = tuple((music.track_program(t), int(n.pitch), int(n.time)) for t in prompt.tracks for n in t.notes
                  if n.time >= last)
    return Fresh(max(min(last, start_tick), 0), known=known, tolerance=tolerance)


def bar_lines(score: symusic.Score) -> np.ndarray:
    """Bar lines in ticks, the last one where the last bar ends (at least one bar, 4/4 by default)."""
    lines = music.downbeats(score) if score.note_num() else np.zeros(1, np.int64)
    lines = lines if len(lines) else np.zeros(1, np.int64)
    meter = (4, 4)
    for ts in sorted(score.time_signatures, key=lambda ts: ts.time):
        if ts.time <= lines[-1]:
            meter = (max(int(ts.numerator), 1), max(int(ts.denominator), 1))
    bar = score.ticks_per_quarter * 4 * meter[0] / meter[1]
    return np.r_[lines, lines[-1] + round(bar)]


def span_ticks(score: symusic.Score, first: int, last: int) -> tuple[int, int]:
    """Ticks [start, end) of bars first..last (1-based, both included)."""
    lines = bar_lines(score)
    end = int(lines[last]) if last < len(lines) else int(score.end()) + 1
    return int(lines[min(first - 1, len(lines) - 1)]), end


def roll_data(score: symusic.Score, fresh: Fresh) -> dict:
    tpq = float(score.ticks_per_quarter)
    tracks = []
    for i, track in enumerate(score.tracks):
        if not len(track.notes):
            continue
        a = track.notes.numpy()
        new = fresh.mask(i, track, a)
        notes = np.stack([np.round(a["time"] / tpq, 4), np.round(a["duration"] / tpq, 4),
                          a["pitch"].astype(np.float64), new.astype(np.float64)], axis=1)
        tracks.append({"name": track.name, "program": music.track_program(track),
                       "notes": [[s, d, int(p), int(n)] for s, d, p, n in notes.tolist()]})
    return {"bars": np.round(bar_lines(score) / tpq, 4).tolist(), "tracks": tracks,
            "span": list(fresh.bars) if fresh.bars else None}
