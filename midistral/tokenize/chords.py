"""Chord detection, as MidiTok 3.1 does it (remi-spec §4.3), order sensitivity included, with numpy.

MidiTok walks a track's notes: from note i it takes the notes among the next 10 that start within one
position of it; if their ends spread more than half a beat the group is skipped, else (for a short first
note, only the notes starting with it) 3 to 5 notes whose intervals form a known quality make a chord; the
walk then jumps past the group, and a note starting where the last group's latest note started is passed
over. What each note would do as a group's first note is computed for all notes at once on an (n, 10)
window; only the jumps are walked in Python, over plain lists.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 10  # MidiTok looks at most 10 notes ahead


def detect_chords(start: np.ndarray, end: np.ndarray, pitch: np.ndarray, tpb: np.ndarray, max_res: int,
                  qualities: dict[tuple, int]) -> tuple[list[int], list[int]]:
    """(chord times, quality ids) of one track's notes (int64 arrays; tpb: ticks per beat at each note)."""
    n = len(start)
    if n < 3:
        return [], []
    far = int(start.max()) + int(tpb.max()) + 1  # a padding start no window reaches
    # row k of a window holds the notes k places ahead: (WINDOW, n), so reductions run down contiguous rows
    win = lambda a, fill: sliding_window_view(np.concatenate([a, np.full(WINDOW - 1, fill, a.dtype)]), n)  # noqa: E731
    s, e = win(start, far), win(end, 0)
    in_a = (s - start) * max_res <= tpb  # start <= s0 + tpb / max_res, exactly, in integers
    half = tpb // 2
    bad = (in_a & (np.abs(e - end) > half)).any(0)
    in_b = in_a & ((end - start > half) | (s == start))  # a short first note keeps only the notes starting with it
    len_b = in_b.sum(0)
    step = np.where(bad, in_a.sum(0), len_b)
    latest = np.where(in_b, s, -1).max(0)
    earliest = np.where(in_b, s, far).min(0)
    quality = _qualities(win(pitch, 0), in_b, len_b, bad, qualities)
    return _walk(start.tolist(), step.tolist(), bad.tolist(), latest.tolist(), earliest.tolist(), quality)


def _qualities(p: np.ndarray, in_b: np.ndarray, len_b: np.ndarray, bad: np.ndarray,
               qualities: dict[tuple, int]) -> dict[int, int]:
    """{note index: quality id} of the groups of 3 to 5 notes whose intervals name a quality."""
    cand = np.flatnonzero(~bad & (len_b >= 3) & (len_b <= 5))
    if not len(cand):
        return {}
    order = np.argsort(~in_b[:, cand].T, axis=1, kind="stable")[:, :5]  # each group's window rows, in order
    rows = np.take_along_axis(p[:, cand].T, order, 1)
    k = len_b[cand]
    found = _lookup(rows - rows[:, :1], k, qualities)
    keep = (found >= 0) & (np.take_along_axis(rows, (k - 1)[:, None], 1)[:, 0] - rows[:, 0] <= 24)
    return dict(zip(cand[keep].tolist(), found[keep].tolist()))


def _interval_keys(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """One int64 per interval tuple (rows[i, :k[i]], intervals in -127..127), equal iff the tuples are."""
    used = np.arange(rows.shape[1]) < k[:, None]
    digits = np.where(used, rows + 128, 0) << (8 * np.arange(rows.shape[1], dtype=np.int64))
    return (digits.sum(1) << 3) | k


def _lookup(intervals: np.ndarray, k: np.ndarray, qualities: dict[tuple, int]) -> np.ndarray:
    """The quality id of each row's first k intervals, or -1."""
    known = [(q, i) for q, i in qualities.items() if 3 <= len(q) <= 5 and all(-127 <= x <= 127 for x in q)]
    if not known:
        return np.full(len(k), -1, dtype=np.int64)
    table = np.zeros((len(known), 5), dtype=np.int64)
    for r, (q, _) in enumerate(known):
        table[r, :len(q)] = q
    keys = _interval_keys(table, np.array([len(q) for q, _ in known], dtype=np.int64))
    order = np.argsort(keys)
    keys, ids = keys[order], np.array([i for _, i in known], dtype=np.int64)[order]
    mine = _interval_keys(intervals, k)
    at = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
    return np.where(keys[at] == mine, ids[at], -1)


def _walk(start: list, step: list, bad: list, latest: list, earliest: list, quality: dict) -> tuple[list, list]:
    times, quals = [], []
    n, count, previous = len(start), 0, -1
    while count < n:
        if start[count] == previous:
            count += 1
        elif bad[count]:
            count += step[count]
        else:
            q = quality.get(count)
            if q is not None:
                times.append(earliest[count])
                quals.append(q)
            previous = latest[count]
            count += step[count]
    return times, quals
