"""Chord detection, as MidiTok 3.1 does it (remi-spec §4.3), order sensitivity included, with numpy.

MidiTok walks a track's notes: from note i it takes the notes among the next 10 that start within one
position of it; if their ends spread more than half a beat the group is skipped, else (for a short first
note, only the notes starting with it) 3 to 5 notes whose intervals form a known quality make a chord; the
walk then jumps past the group, and a note starting where the last group's latest note started is passed
over. What each note would do as a group's first note is computed for all notes at once on a (10, n)
window; the walk itself is followed by pointer doubling (notes in order, as symusic gives them) or note by
note in Python (any other order).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 10  # MidiTok looks at most 10 notes ahead


def quality_table(qualities: dict[tuple, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted interval keys, quality ids) of the qualities a group of 3 to 5 notes can name; build it once."""
    known = [(q, i) for q, i in qualities.items() if 3 <= len(q) <= 5 and all(-127 <= x <= 127 for x in q)]
    table = np.zeros((len(known), 5), dtype=np.int64)
    for r, (q, _) in enumerate(known):
        table[r, :len(q)] = q
    keys = _interval_keys(table, np.array([len(q) for q, _ in known], dtype=np.int64))
    order = np.argsort(keys)
    return keys[order], np.array([i for _, i in known], dtype=np.int64)[order]


def detect_chords(start: np.ndarray, end: np.ndarray, pitch: np.ndarray, tpb: np.ndarray, max_res: int,
                  table: tuple[np.ndarray, np.ndarray], track: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chord times, quality ids, track of each chord) of notes given track after track (int64 arrays;
    tpb: ticks per beat at each note; table: `quality_table(...)`; track: the track of each note, all 0 if
    None). Each track is walked on its own, as MidiTok does; doing all tracks in one pass saves numpy's
    per-call cost on small tracks."""
    n = len(start)
    track = np.zeros(n, dtype=np.int64) if track is None else track
    if n < 3:
        return (np.zeros(0, dtype=np.int64),) * 3
    # one key per note, in order across tracks: a window never reaches into the next track
    span = int(start.max()) + int(tpb.max()) + 2
    key = track * span + start
    far = int(key[-1]) + span  # a padding key no window reaches
    # row k of a window holds the notes k places ahead: (WINDOW, n), so reductions run down contiguous rows
    win = lambda a, fill: sliding_window_view(np.concatenate([a, np.full(WINDOW - 1, fill, a.dtype)]), n)  # noqa: E731
    s, e = win(key, far), win(end, 0)
    in_a = (s - key) * max_res <= tpb  # start <= s0 + tpb / max_res, exactly, in integers
    half = tpb // 2
    bad = (in_a & (np.abs(e - end) > half)).any(0)
    in_b = in_a & ((end - start > half) | (s == key))  # a short first note keeps only the notes starting with it
    len_b = in_b.sum(0)
    step = np.where(bad, in_a.sum(0), len_b)
    latest = np.where(in_b, s, -1).max(0)
    in_order = bool((key[1:] >= key[:-1]).all())
    if in_order:
        groups = _walk_sorted(key, step, bad, latest)
    else:
        groups = np.array(_walk(key.tolist(), step.tolist(), bad.tolist(), latest.tolist()), dtype=np.int64)
    groups = groups[(len_b[groups] >= 3) & (len_b[groups] <= 5)]
    quality = _qualities(win(pitch, 0)[:, groups], in_b[:, groups], len_b[groups], table, in_order)
    groups, quality = groups[quality >= 0], quality[quality >= 0]
    earliest = np.where(in_b[:, groups], s[:, groups], far).min(0)
    return earliest - track[groups] * span, quality, track[groups]


def _qualities(p: np.ndarray, in_b: np.ndarray, k: np.ndarray, table, in_order: bool) -> np.ndarray:
    """The quality id each group's pitches name (p, in_b: (WINDOW, groups); k notes each), or -1."""
    if in_order:  # a group is then the first k notes of its window
        rows = p[:5].T
    else:
        order = np.argsort(~in_b.T, axis=1, kind="stable")[:, :5]  # each group's window rows, in order
        rows = np.take_along_axis(p.T, order, 1)
    intervals = rows - rows[:, :1]
    keys, ids = table
    if not len(keys) or not len(k):
        return np.full(len(k), -1, dtype=np.int64)
    mine = _interval_keys(intervals, k)
    at = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
    top = np.take_along_axis(intervals, (k - 1)[:, None], 1)[:, 0]  # MidiTok ignores chords over two octaves
    return np.where((keys[at] == mine) & (top <= 24), ids[at], -1)


def _interval_keys(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """One int64 per interval tuple (rows[i, :k[i]], intervals in -127..127), equal iff the tuples are."""
    used = np.arange(rows.shape[1]) < k[:, None]
    digits = np.where(used, rows + 128, 0) << (8 * np.arange(rows.shape[1], dtype=np.int64))
    return (digits.sum(1) << 3) | k


def _walk_sorted(start: np.ndarray, step: np.ndarray, bad: np.ndarray, latest: np.ndarray) -> np.ndarray:
    """The first notes of the groups the walk takes (not skipped, not spread), for starts in order.

    In order, the notes passed over after a group are exactly those starting at its latest start, and
    no later note can start there; so the next group taken depends on the group alone, and the chain of
    groups is followed by pointer doubling."""
    n = len(start)
    idx = np.arange(n + 1)
    settle = np.r_[np.where(bad, idx[:-1] + step, idx[:-1]), n]  # from a note, past spread groups
    while True:
        twice = settle[settle]
        if np.array_equal(twice, settle):
            break
        settle = twice
    nxt = np.r_[settle[np.searchsorted(start, latest, side="right")], n]  # the group taken after each
    path, jump = settle[:1], nxt
    while path[-1] != n:
        path = np.concatenate([path, jump[path]])
        jump = jump[jump]
    return path[path < n]


def _walk(start: list, step: list, bad: list, latest: list) -> list[int]:
    """The first notes of the groups the walk takes, note by note (starts in any order)."""
    groups = []
    n, count, previous = len(start), 0, -1
    while count < n:
        if start[count] == previous:
            count += 1
        elif bad[count]:
            count += step[count]
        else:
            groups.append(count)
            previous = latest[count]
            count += step[count]
    return groups
