"""Preprocessing a Score for the encoder (remi-spec §3): the new resolution, cleaned time signatures,
merged and binned tracks, binned tempos. Functions of the tokenizer `tok` (a REMI) and a symusic.Score."""

from __future__ import annotations

import numpy as np
import symusic


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C++ std::round for non-negative values, exactly (x - floor(x) is exact)."""
    f = np.floor(x)
    return (f + (x - f >= 0.5)).astype(np.int64)


def _closest(bins: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest bin (bins sorted ascending); an exact tie goes to the higher bin."""
    i = np.searchsorted(bins, x, side="left")
    hi = np.minimum(i, len(bins) - 1)
    lo = np.maximum(i - 1, 0)
    take_lo = (i == len(bins)) | (np.abs(x - bins[lo]) < np.abs(x - bins[hi]))
    return np.where(take_lo, lo, hi)


class _Timeline:
    """The preprocessed time frame of a piece: resolution, time signatures and their sections."""

    def __init__(self, tpq: int, factor: float | None, ts_list: list, ts_times: np.ndarray, ts_tpb: np.ndarray):
        self.tpq, self.factor, self.ts_list, self.ts_times, self.ts_tpb = tpq, factor, ts_list, ts_times, ts_tpb
        self.grid = None  # (step, section start) per time signature, for pieces with several denominators

    def resample(self, t: np.ndarray) -> np.ndarray:
        return _round_half_away(t * self.factor)

    def tpb_at(self, t: np.ndarray) -> np.ndarray:
        return self.ts_tpb[np.searchsorted(self.ts_times, t, side="right") - 1]

    def snap(self, t: np.ndarray) -> np.ndarray:
        if self.grid is None or len(t) == 0:
            return t
        k = np.searchsorted(self.ts_times, t, side="right") - 1
        step, start = self.grid[0][k], self.grid[1][k]
        return (np.round((t - start) / step) * step + start).astype(np.int64)


def preprocess(tok, score: symusic.Score):
    """(tpq, time signatures, tracks as dicts of arrays, tempo ticks, tempo bin indices)."""
    tl = _timeline(tok, score)
    return tl.tpq, tl.ts_list, _tracks(tok, score, tl), *_tempos(tok, score, tl)


def _timeline(tok, score: symusic.Score) -> "_Timeline":
    """remi-spec §3.1-3.4: supported time signatures, the new resolution, the grid of multi-meter pieces."""
    supported = set(tok.time_sigs)
    ts = score.time_signatures.numpy()
    ts_list = [(int(t), int(n), int(d)) for t, n, d in zip(ts["time"], ts["numerator"], ts["denominator"])
               if (int(n), int(d)) in supported]
    if not ts_list or ts_list[0][0] != 0:
        ts_list.insert(0, (0, 4, 4))
    tpq = int(tok.max_res * max(d for _, _, d in ts_list) / 4)
    factor = tpq / score.ticks_per_quarter
    resample = score.ticks_per_quarter != tpq
    if resample:
        ts_list = [(int(t * factor), n, d) for t, n, d in ts_list]
    ts_list = _clean_time_signatures(ts_list, tpq)
    tl = _Timeline(tpq, factor if resample else None, ts_list,
                   np.array([t for t, _, _ in ts_list], dtype=np.int64),
                   np.array([tpq * 4 // d for _, _, d in ts_list], dtype=np.int64))
    # grid: only when several denominators (then /4 sections are snapped to tpq // 12 steps)
    if len({d for _, _, d in ts_list}) > 1:
        steps = [tpq // (tok.max_res * d // 4) for _, _, d in ts_list]
        starts, prev = [], None
        for i, step in enumerate(steps):
            starts.append(tl.ts_times[i] if step != prev else starts[-1])
            prev = step
        tl.grid = (np.array(steps, dtype=np.int64), np.array(starts, dtype=np.int64))
    return tl


def _tracks(tok, score: symusic.Score, tl: "_Timeline") -> list[dict]:
    """remi-spec §3.5: merge same-program tracks (drums together), drop empty ones, filter pitches, bin.
    All tracks are worked on at once, one group number per note (numpy's cost per call adds up over
    many small tracks)."""
    groups: dict[int, list] = {}
    for tr in score.tracks:  # dict order = order of first appearance
        groups.setdefault(-1 if tr.is_drum else int(tr.program), []).append(tr)
    # a program the config leaves out: its track is dropped (spec 3.5.2)
    groups = {key: group for key, group in groups.items() if key in tok.program_id}
    arrays = [tr.notes.numpy() for group in groups.values() for tr in group]
    if not arrays:
        return []
    n = {k: np.concatenate([a[k] for a in arrays]).astype(np.int64) for k in ("time", "duration", "pitch", "velocity")}
    sizes = [sum(len(tr.notes) for tr in group) for group in groups.values()]
    gid = np.repeat(np.arange(len(groups)), sizes)
    if tl.factor is not None:
        n["time"] = tl.resample(n["time"])
        n["duration"] = np.maximum(tl.resample(n["duration"]), 1)
    merged = np.array([len(group) > 1 for group in groups.values()])
    if merged.any():  # merged tracks: notes sorted by time, duration, pitch, velocity; others as they are
        m = merged[gid]
        keys = [np.where(m, n[k], 0) for k in ("velocity", "pitch", "duration", "time")]
        order = np.lexsort([np.where(m, 0, np.arange(len(gid))), *keys, gid])
        n, gid = {k: v[order] for k, v in n.items()}, gid[order]
    ranges = np.array([tok.config.drums_pitch_range if key == -1 else tok.config.pitch_range for key in groups])
    keep = (n["pitch"] >= ranges[gid, 0]) & (n["pitch"] <= ranges[gid, 1])
    n, gid = {k: v[keep] for k, v in n.items()}, gid[keep]
    t = tl.snap(n["time"])
    tpb = tl.tpb_at(t)
    dur_idx = np.empty(len(t), dtype=np.int64)
    dur = np.empty(len(t), dtype=np.int64)
    for b in np.unique(tpb).tolist():
        m = tpb == b
        bins = tok.duration_ticks(b)
        dur_idx[m] = _closest(bins, n["duration"][m])
        dur[m] = bins[dur_idx[m]]
    cols = dict(time=t, end=t + dur, pitch=n["pitch"], vel_idx=_closest(tok.velocities, n["velocity"]),
                dur_idx=dur_idx, tpb=tpb)
    cuts = np.searchsorted(gid, np.arange(len(groups) + 1)).tolist()
    return [dict(program=key, **{k: v[a:b] for k, v in cols.items()})
            for key, a, b in zip(groups, cuts[:-1], cuts[1:]) if b > a]


def _tempos(tok, score: symusic.Score, tl: "_Timeline") -> tuple[np.ndarray, np.ndarray]:
    """remi-spec §3.7: (ticks, tempo bin indices); nearest bin in microseconds per quarter, ties slower."""
    if not tok.config.use_tempos:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    te = score.tempos.numpy()
    if len(te["time"]) == 0:
        return np.array([0]), np.array([tok.default_tempo_idx])
    tt = te["time"].astype(np.int64)
    if tl.factor is not None:
        tt = tl.resample(tt)
    tt = tl.snap(tt)
    mspq_bins = 60e6 / tok.tempos[::-1]  # ascending
    idx = len(tok.tempos) - 1 - _closest(mspq_bins, te["mspq"].astype(np.float64))
    last = np.append(tt[1:] != tt[:-1], True)  # among tempos at one tick, keep the last
    tempo_times, tempo_idx = tt[last], idx[last]
    if tempo_times[0] != 0:
        tempo_times = np.insert(tempo_times, 0, 0)
        tempo_idx = np.insert(tempo_idx, 0, tok.default_tempo_idx)
    return tempo_times, tempo_idx


def _clean_time_signatures(ts: list, tpq: int) -> list:
    """remi-spec §3.3: drop repeats, delay changes to the next bar line, the later of two at one tick wins."""
    ts = [list(x) for x in ts]
    bar = lambda x: x[1] * tpq * 4 // x[2]  # noqa: E731
    i, cur_bar, prev = 0, bar(ts[0]), 0
    while i < len(ts):
        if i >= 1 and ts[i][1:] == ts[i - 1][1:]:
            del ts[i]
            continue
        if i >= 1 and ts[i][0] < ts[i - 1][0]:
            ts[i][0] = ts[i - 1][0]
        q, r = divmod(ts[i][0] - prev, cur_bar)
        if r > 0:
            ts[i][0] = prev + (q + 1) * cur_bar
        cur_bar, prev = bar(ts[i]), ts[i][0]
        if i >= 1 and ts[i][0] == ts[i - 1][0]:
            del ts[i - 1]
            if i >= 2 and ts[i - 1][1:] == ts[i - 2][1:]:
                del ts[i - 1]
                cur_bar, prev = bar(ts[i - 2]), ts[i - 2][0]
                i -= 1
            continue
        i += 1
    if ts[0][0] != 0:
        ts.insert(0, [0, 4, 4])
    return [tuple(x) for x in ts]
