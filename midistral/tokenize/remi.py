"""REMIPlus: the vocabulary and the token grammar (encode and decode), MidiTok 3.1-compatible.

One token stream for all instruments. A piece reads, bar by bar:

    Bar  TimeSig_n/d                       a bar line (the TimeSig token recalls the current meter)
    Position_p  [Tempo_t]                  a tick inside the bar, in 1/12 of the denominator's beat
    Program_p Chord_q                      a chord detected in that program's notes (informative)
    Program_p Pitch_x Velocity_v Duration_d   one note (PitchDrum_x for drums, Program_-1)
    Rest_b.p.r                             silence; the bars it crosses get no Bar token

Encoding follows MidiTok 3.1 rule by rule, so our token strings equal
MidiTok's. Decoding follows *our* encoder, so decode then encode gives back the same tokens; where
MidiTok's decoder disagrees with its own encoder we differ (README: "Differences from MidiTok").

The work is done in ids with numpy; strings are made only by `tokens()`.
"""

from __future__ import annotations

import json
import os
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

import numpy as np
import symusic

from midistral.errors import CheckpointError, MidiError
from midistral.general_midi import program_name
from midistral.io import atomic_write_json, read_tokenizer_json
from midistral.tokenize.bpe import BPE
from midistral.tokenize.chords import detect_chords, quality_table
from midistral.tokenize.clock import BarClock, EncoderClock, bar_lines
from midistral.tokenize.config import DEFAULT_PARAMS, REMIConfig
from midistral.tokenize.midi_io import load_score, midi_label
from midistral.tokenize.extra import ExtraVocab
from midistral.tokenize.miditok_json import read_miditok
from midistral.tokenize.parallel import EncodeResult, encode_many
from midistral.tokenize.training import train_bpe


class Family(IntEnum):
    """Token families (the part of a token string before "_"); SPECIAL covers PAD, BOS, EOS and MASK."""

    SPECIAL = 0
    BAR = 1
    POSITION = 2
    PITCH = 3
    PITCH_DRUM = 4
    VELOCITY = 5
    DURATION = 6
    PROGRAM = 7
    TEMPO = 8
    TIME_SIG = 9
    REST = 10
    CHORD = 11


_FAMILY_OF_PREFIX = {"Bar": Family.BAR, "Position": Family.POSITION, "Pitch": Family.PITCH,
                     "PitchDrum": Family.PITCH_DRUM, "Velocity": Family.VELOCITY, "Duration": Family.DURATION,
                     "Program": Family.PROGRAM, "Tempo": Family.TEMPO, "TimeSig": Family.TIME_SIG,
                     "Rest": Family.REST, "Chord": Family.CHORD}

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


def _time_tuples(res: dict[tuple[int, int], int]) -> list[tuple[int, int, int]]:
    """(beat, pos, res) values of Duration or Rest tokens, in MidiTok's order (the 0 value removed)."""
    out = [(b, p, r) for (b0, b1), r in res.items() for b in range(b0, b1) for p in range(r)]
    last = max(res)
    out.append((max(last), 0, res[last]))
    return out[1:]


class TimedEncoding(NamedTuple):
    """A piece's base ids and its time frame (REMI.encode_with_times)."""

    ids: np.ndarray             # base ids
    ticks: np.ndarray           # the tick each token belongs to
    tpq: int                    # the encoder's ticks per quarter
    time_signatures: list       # (tick, numerator, denominator), the first at tick 0
    onsets: np.ndarray          # every note's start tick, track by track
    ends: np.ndarray            # and its end tick (duration as the Duration token rounds it)


class REMI:
    """The REMIPlus tokenizer. `REMI(REMIConfig(**params))`; see the module docstring for the grammar."""

    def __init__(self, config: REMIConfig | dict | None = None):
        if config is None:
            config = REMIConfig(**DEFAULT_PARAMS)
        elif isinstance(config, dict):
            config = REMIConfig(**config)
        self.config = c = config
        self.bpe = None
        self.extra = None  # ExtraVocab (tokenize/extra.py): infilling, style and attribute tokens after the vocabulary
        self.max_res = c.max_num_pos_per_beat
        self.durations = _time_tuples(c.beat_res)
        self.rests = _time_tuples(c.beat_res_rest)
        self._tick_tables: dict[tuple[int, int], np.ndarray] = {}
        self.velocities = np.linspace(0, 127, c.num_velocities + 1, dtype=np.intc)[1:].astype(np.int64)
        self.tempos = np.linspace(*c.tempo_range, c.num_tempos).round(2)
        self.default_tempo_idx = int(np.argmin(np.abs(self.tempos - 120)))
        self.time_sigs = [(num, den) for den, nums in c.time_signature_range.items() for num in nums]
        self.programs = list(set(c.programs))  # CPython's set order, as MidiTok iterates it
        self.id_to_token = tokens = self._base_tokens()
        self.vocab = {t: i for i, t in enumerate(tokens)}

        v = self.vocab
        special = {t: v.get(f"{t}_None") for t in ("PAD", "BOS", "EOS", "MASK")}
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (special[k] for k in ("PAD", "BOS", "EOS", "MASK"))
        self.special_ids = [v[f"{t}_None"] for t in c.special_tokens]
        self.bar0 = v["Bar_None"] if c.max_bar_embedding is None else v["Bar_0"]
        self.pitch0 = v[f"Pitch_{c.pitch_range[0]}"]
        self.drum0 = v[f"PitchDrum_{c.drums_pitch_range[0]}"]
        self.vel0 = v[f"Velocity_{self.velocities[0]}"]
        self.dur0 = v["Duration_{}.{}.{}".format(*self.durations[0])]
        self.pos0 = v["Position_0"]
        self.rest0 = v["Rest_{}.{}.{}".format(*self.rests[0])]
        self.tempo0 = v[f"Tempo_{float(self.tempos[0])}"] if c.use_tempos else None
        self.chord0 = v[f"Chord_{next(iter(c.chord_maps))}"] if c.use_chords else None
        self.program_id = {p: v[f"Program_{p}"] for p in self.programs}
        self.program_of = {i: p for p, i in self.program_id.items()}
        self.ts_id = {ts: v[f"TimeSig_{ts[0]}/{ts[1]}"] for ts in self.time_sigs}
        self.chord_qualities = {tuple(m): i for i, m in reversed(list(enumerate(c.chord_maps.values())))}
        self.chord_table = quality_table(self.chord_qualities)
        # the family of each base id (Family values)
        self.family = np.array([_FAMILY_OF_PREFIX.get(t.split("_", 1)[0], Family.SPECIAL) for t in tokens],
                               dtype=np.int8)

    def _base_tokens(self) -> list[str]:
        """The base vocabulary in MidiTok's order (remi-spec §1)."""
        c = self.config
        max_num = max(num for num, _ in self.time_sigs)
        tokens = [f"{t}_None" for t in c.special_tokens]
        if c.max_bar_embedding is None:
            tokens.append("Bar_None")
        else:
            tokens += [f"Bar_{i}" for i in range(c.max_bar_embedding)]
        tokens += [f"Pitch_{p}" for p in range(c.pitch_range[0], c.pitch_range[1] + 1)]
        tokens += [f"Velocity_{v}" for v in self.velocities]
        tokens += ["Duration_{}.{}.{}".format(*d) for d in self.durations]
        tokens += [f"Position_{i}" for i in range(self.max_res * max_num)]
        tokens += [f"PitchDrum_{p}" for p in range(c.drums_pitch_range[0], c.drums_pitch_range[1] + 1)]
        if c.use_chords:
            tokens += [f"Chord_{q}" for q in c.chord_maps]
        tokens += ["Rest_{}.{}.{}".format(*r) for r in self.rests]
        if c.use_tempos:
            tokens += [f"Tempo_{float(t)}" for t in self.tempos]
        tokens += [f"Program_{p}" for p in self.programs]
        tokens += [f"TimeSig_{n}/{d}" for n, d in self.time_sigs]
        return tokens

    # ------------------------------------------------------------------------------------------------
    # time units

    def _tpb(self, tpq: int, den: int) -> int:
        return tpq * 4 // den

    def duration_ticks(self, tpb: int) -> np.ndarray:
        """The ticks of each Duration token at `tpb` ticks per beat (read-only, built once per tpb)."""
        return self._ticks_of(self.durations, tpb)

    def rest_ticks(self, tpb: int) -> np.ndarray:
        """The ticks of each Rest token at `tpb` ticks per beat (read-only, built once per tpb)."""
        return self._ticks_of(self.rests, tpb)

    def _ticks_of(self, values: list, tpb: int) -> np.ndarray:
        key = (id(values), tpb)
        table = self._tick_tables.get(key)
        if table is None:
            table = np.array([(b * r + p) * tpb // r for b, p, r in values], dtype=np.int64)
            table.setflags(write=False)
            self._tick_tables[key] = table
        return table

    def __len__(self) -> int:
        return self.music_size + (len(self.extra) if self.extra is not None else 0)

    @property
    def music_size(self) -> int:
        """Ids that stand for music (base or BPE); extra tokens come after them."""
        return len(self.bpe) if self.bpe is not None else len(self.vocab)

    # ------------------------------------------------------------------------------------------------
    # preprocessing (remi-spec §3)

    def _preprocess(self, score: symusic.Score):
        """(tpq, time signatures, tracks as dicts of arrays, tempo ticks, tempo bin indices)."""
        tl = self._timeline(score)
        return tl.tpq, tl.ts_list, self._preprocess_tracks(score, tl), *self._preprocess_tempos(score, tl)

    def _timeline(self, score: symusic.Score) -> "_Timeline":
        """remi-spec §3.1-3.4: supported time signatures, the new resolution, the grid of multi-meter pieces."""
        supported = set(self.time_sigs)
        ts = score.time_signatures.numpy()
        ts_list = [(int(t), int(n), int(d)) for t, n, d in zip(ts["time"], ts["numerator"], ts["denominator"])
                   if (int(n), int(d)) in supported]
        if not ts_list or ts_list[0][0] != 0:
            ts_list.insert(0, (0, 4, 4))
        tpq = int(self.max_res * max(d for _, _, d in ts_list) / 4)
        factor = tpq / score.ticks_per_quarter
        resample = score.ticks_per_quarter != tpq
        if resample:
            ts_list = [(int(t * factor), n, d) for t, n, d in ts_list]
        ts_list = self._clean_time_signatures(ts_list, tpq)
        tl = _Timeline(tpq, factor if resample else None, ts_list,
                       np.array([t for t, _, _ in ts_list], dtype=np.int64),
                       np.array([self._tpb(tpq, d) for _, _, d in ts_list], dtype=np.int64))
        # grid: only when several denominators (then /4 sections are snapped to tpq // 12 steps)
        if len({d for _, _, d in ts_list}) > 1:
            steps = [tpq // (self.max_res * d // 4) for _, _, d in ts_list]
            starts, prev = [], None
            for i, step in enumerate(steps):
                starts.append(tl.ts_times[i] if step != prev else starts[-1])
                prev = step
            tl.grid = (np.array(steps, dtype=np.int64), np.array(starts, dtype=np.int64))
        return tl

    def _preprocess_tracks(self, score: symusic.Score, tl: "_Timeline") -> list[dict]:
        """remi-spec §3.5: merge same-program tracks (drums together), drop empty ones, filter pitches, bin.
        All tracks are worked on at once, one group number per note (numpy's cost per call adds up over
        many small tracks)."""
        groups: dict[int, list] = {}
        for tr in score.tracks:  # dict order = order of first appearance
            groups.setdefault(-1 if tr.is_drum else int(tr.program), []).append(tr)
        # a program the config leaves out: its track is dropped (spec 3.5.2)
        groups = {key: group for key, group in groups.items() if key in self.program_id}
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
        ranges = np.array([self.config.drums_pitch_range if key == -1 else self.config.pitch_range for key in groups])
        keep = (n["pitch"] >= ranges[gid, 0]) & (n["pitch"] <= ranges[gid, 1])
        n, gid = {k: v[keep] for k, v in n.items()}, gid[keep]
        t = tl.snap(n["time"])
        tpb = tl.tpb_at(t)
        dur_idx = np.empty(len(t), dtype=np.int64)
        dur = np.empty(len(t), dtype=np.int64)
        for b in np.unique(tpb).tolist():
            m = tpb == b
            bins = self.duration_ticks(b)
            dur_idx[m] = _closest(bins, n["duration"][m])
            dur[m] = bins[dur_idx[m]]
        cols = dict(time=t, end=t + dur, pitch=n["pitch"], vel_idx=_closest(self.velocities, n["velocity"]),
                    dur_idx=dur_idx, tpb=tpb)
        cuts = np.searchsorted(gid, np.arange(len(groups) + 1)).tolist()
        return [dict(program=key, **{k: v[a:b] for k, v in cols.items()})
                for key, a, b in zip(groups, cuts[:-1], cuts[1:]) if b > a]

    def _preprocess_tempos(self, score: symusic.Score, tl: "_Timeline") -> tuple[np.ndarray, np.ndarray]:
        """remi-spec §3.7: (ticks, tempo bin indices); nearest bin in microseconds per quarter, ties slower."""
        if not self.config.use_tempos:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        te = score.tempos.numpy()
        if len(te["time"]) == 0:
            return np.array([0]), np.array([self.default_tempo_idx])
        tt = te["time"].astype(np.int64)
        if tl.factor is not None:
            tt = tl.resample(tt)
        tt = tl.snap(tt)
        mspq_bins = 60e6 / self.tempos[::-1]  # ascending
        idx = len(self.tempos) - 1 - _closest(mspq_bins, te["mspq"].astype(np.float64))
        last = np.append(tt[1:] != tt[:-1], True)  # among tempos at one tick, keep the last
        tempo_times, tempo_idx = tt[last], idx[last]
        if tempo_times[0] != 0:
            tempo_times = np.insert(tempo_times, 0, 0)
            tempo_idx = np.insert(tempo_idx, 0, self.default_tempo_idx)
        return tempo_times, tempo_idx

    def _clean_time_signatures(self, ts: list, tpq: int) -> list:
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

    # ------------------------------------------------------------------------------------------------
    # encoding (remi-spec §4, §5)

    def _encode(self, midi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Base ids, the tick each token belongs to, and the bar-line ticks (for splitting per bar)."""
        score = load_score(midi)
        if score.ticks_per_quarter <= 0:
            raise MidiError(f"{midi_label(midi)}: invalid ticks per quarter ({score.ticks_per_quarter})")
        tpq, ts_list, tracks, tempo_times, tempo_idx = self._preprocess(score)
        if not tracks:
            raise MidiError(f"{midi_label(midi)}: no notes (within the tokenizer's pitch ranges)")
        events = self._events(ts_list, tracks, tempo_times, tempo_idx)
        ids, ticks, overflow = self._with_time_tokens(tpq, ts_list, *events)
        if overflow >= 0:
            raise MidiError(
                f"{midi_label(midi)}: the piece needs Bar_{overflow} but the vocabulary stops at "
                f"Bar_{self.config.max_bar_embedding - 1} (max_bar_embedding={self.config.max_bar_embedding})"
            )
        return ids, ticks, bar_lines(ts_list, tpq, int(ticks.max()) if len(ticks) else 0)

    def _events(self, ts_list, tracks, tempo_times, tempo_idx):
        """remi-spec §4: the events sorted by time (stably), as arrays (time, end, kind, ids row of 4, -1 padded).

        kind is the event's rank within a tick: 0 time signature, 1 tempo, 2 chord, 3 note; events of one
        tick keep the order time signatures, tempos, then track by track (chords before notes)."""
        times, ends, kinds, id_rows = [], [], [], []

        def add(t, end, kind, *cols):
            cols = cols + (-np.ones_like(t),) * (4 - len(cols))
            times.append(t), ends.append(end), kinds.append(np.full(len(t), kind, np.int8))
            id_rows.append(np.stack(cols, 1))

        ts_t = np.array([t for t, _, _ in ts_list], dtype=np.int64)
        add(ts_t, ts_t, 0, np.array([self.ts_id[(n, d)] for _, n, d in ts_list], dtype=np.int64))
        if len(tempo_times):
            add(tempo_times, tempo_times, 1, self.tempo0 + tempo_idx)
        chords = self._chords(tracks)
        for k, tr in enumerate(tracks):
            prog = self.program_id[tr["program"]]
            if k in chords:
                ct, cq = chords[k]
                add(ct, ct, 2, np.full_like(ct, prog), self.chord0 + cq)
            if tr["program"] == -1:
                base = self.drum0 - self.config.drums_pitch_range[0]
            else:
                base = self.pitch0 - self.config.pitch_range[0]
            add(tr["time"], tr["end"], 3, np.full(len(tr["time"]), prog), base + tr["pitch"],
                self.vel0 + tr["vel_idx"], self.dur0 + tr["dur_idx"])
        times = np.concatenate(times)
        order = np.argsort(times, kind="stable")
        return times[order], np.concatenate(ends)[order], np.concatenate(kinds)[order], np.concatenate(id_rows)[order]

    def _chords(self, tracks) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{track index: (chord times, quality indices)} of the tracks that have chords (not drums)."""
        which = [k for k, tr in enumerate(tracks) if tr["program"] != -1] if self.config.use_chords else []
        if not which:
            return {}
        cols = [np.concatenate([tracks[k][c] for k in which]) for c in ("time", "end", "pitch", "tpb")]
        track = np.repeat(np.arange(len(which)), [len(tracks[k]["time"]) for k in which])
        times, quals, of = detect_chords(*cols, self.max_res, self.chord_table, track)
        cuts = np.searchsorted(of, np.arange(len(which) + 1))
        return {k: (times[a:b], quals[a:b]) for k, a, b in zip(which, cuts[:-1].tolist(), cuts[1:].tolist()) if b > a}

    def _with_time_tokens(self, tpq, ts_list, times, ends, kinds, rows):
        """remi-spec §5: the event ids with Rest, Bar, TimeSig recall and Position tokens before each tick;
        (ids, tick of each token, highest Bar_<n> past the vocabulary or -1).

        A tick inside the bar of the tick before, after no silence, needs one Position token: those are
        made with numpy. The clock runs at the other ticks (bar lines, rests, meter changes) and writes
        only time tokens; the event ids are then put after the time tokens that precede them."""
        starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
        tick = times[starts]
        end_before = np.r_[0, np.maximum.accumulate(np.maximum.reduceat(ends, starts))[:-1]]
        ts_opens = kinds[starts] == 0  # a time signature change opens the tick
        simple, position = self._positions_inside_bars(tpq, ts_list, tick, end_before, ts_opens)
        ts_at = {t: ts for t, *ts in ts_list}
        clock_ids: list[int] = []
        clock_ticks: list[int] = []
        # per clock entry: (first event after its time tokens, how many it wrote); a meter change adds one
        first_event, n_written = [], []
        st = EncoderClock(self, tpq, ts_list[0])
        clocked = np.flatnonzero(~simple)
        after_position = np.r_[False, simple[:-1]][clocked].tolist()
        tick_before = np.r_[-1, tick[:-1]][clocked].tolist()
        for a, t, prev_end, opens, skipped, last in zip(starts[clocked].tolist(), tick[clocked].tolist(),
                                                        end_before[clocked].tolist(), ts_opens[clocked].tolist(),
                                                        after_position, tick_before):
            if skipped:
                st.prev_tick = last  # the last tick, as if the clock had run there
            n0 = len(clock_ids)
            if opens:
                st.advance(t, prev_end, True, clock_ids, clock_ticks)
                first_event.append(a)
                n_written.append(len(clock_ids) - n0)
                n0 = len(clock_ids)
                st.change_ts(t, (t, *ts_at[t]))
                a += 1
                prev_end = max(prev_end, t)
                if a == len(times) or times[a] != t:
                    continue
            st.advance(t, prev_end, False, clock_ids, clock_ticks)
            first_event.append(a)
            n_written.append(len(clock_ids) - n0)
        # the Position tokens of the other ticks, merged in event order with the clock's tokens
        first = np.r_[np.asarray(first_event, dtype=np.int64), starts[simple]]
        order = np.argsort(first, kind="stable")
        count = np.r_[np.asarray(n_written, dtype=np.int64), np.ones(int(simple.sum()), dtype=np.int64)][order]
        n_before = np.cumsum(count)
        is_position = np.zeros(int(n_before[-1]) if len(n_before) else 0, dtype=bool)
        is_position[(n_before - count)[order >= len(first_event)]] = True
        time_ids = np.empty(len(is_position), dtype=np.int64)
        time_ticks = np.empty(len(is_position), dtype=np.int64)
        time_ids[is_position], time_ticks[is_position] = position[simple], tick[simple]
        time_ids[~is_position], time_ticks[~is_position] = clock_ids, clock_ticks
        ids, ticks = self._interleave(rows, times, time_ids, time_ticks, first[order], n_before)
        return ids, ticks, st.overflow

    def _positions_inside_bars(self, tpq, ts_list, tick, end_before, ts_opens):
        """(ticks whose only time token is a Position, the Position id of every tick): the clock's bar
        numbering (remi-spec §5.1) in numpy. After the clock runs at a tick, its bar is that tick's bar;
        a later tick in the same bar with no rest before it and no meter change needs only its Position."""
        sec_t = np.array([t for t, _, _ in ts_list], dtype=np.int64)
        tpb = np.array([tpq * 4 // d for _, _, d in ts_list], dtype=np.int64)
        bar_len = np.array([n for _, n, _ in ts_list], dtype=np.int64) * tpb
        first_bar = np.r_[0, np.cumsum(np.diff(sec_t) // bar_len[:-1])]  # the clock's bar_at_ts per section
        min_rest = np.array([self.rest_ticks(int(b))[0] for b in tpb.tolist()], dtype=np.int64)
        sec = np.searchsorted(sec_t, tick, side="right") - 1
        bar = first_bar[sec] + (tick - sec_t[sec]) // bar_len[sec]
        simple = ~ts_opens & (tick - end_before < min_rest[sec]) & (bar == np.r_[-2, bar[:-1]])
        bar_line = sec_t[sec] + (bar - first_bar[sec]) * bar_len[sec]
        return simple, self.pos0 + (tick - bar_line) // (tpb[sec] // self.max_res)

    @staticmethod
    def _interleave(rows, times, clock_ids, clock_ticks, first_event, n_before):
        """The event ids (rows, -1 padded) placed after the `n_before[k]` first time tokens from event
        `first_event[k]` on; the time tokens fill the rest, in order."""
        used = rows >= 0
        lens = used.sum(1)
        event_ids = rows[used]
        # time tokens before each event, spread to each of its ids
        before = np.zeros(len(rows), dtype=np.int64)
        before[np.asarray(first_event, dtype=np.int64)] = np.diff(np.r_[0, n_before])
        before = np.repeat(np.cumsum(before), lens)
        n = len(event_ids) + len(clock_ids)
        at = np.arange(len(event_ids)) + before
        is_event = np.zeros(n, dtype=bool)
        is_event[at] = True
        ids = np.empty(n, dtype=np.int64)
        ticks = np.empty(n, dtype=np.int64)
        ids[at], ticks[at] = event_ids, np.repeat(times, lens)
        ids[~is_event], ticks[~is_event] = clock_ids, clock_ticks
        return ids, ticks


    def encode_with_times(self, midi) -> "TimedEncoding":
        """Base ids with the time frame the encoder gave them: for walks that write new notes between a
        piece's own and must write the time tokens exactly as the encoder would (controls.accompany)."""
        score = load_score(midi)
        tpq, ts_list, tracks, _, _ = self._preprocess(score)
        ids, ticks, _ = self._encode(score)
        onsets = np.concatenate([tr["time"] for tr in tracks]) if tracks else np.zeros(0, dtype=np.int64)
        ends = np.concatenate([tr["end"] for tr in tracks]) if tracks else np.zeros(0, dtype=np.int64)
        return TimedEncoding(ids, ticks, tpq, ts_list, onsets, ends)

    def encode_base(self, midi) -> np.ndarray:
        """Base (pre-BPE) token ids of a MIDI path, bytes or symusic.Score."""
        return self._encode(midi)[0]

    def tokens(self, midi) -> list[str]:
        """Base token strings, as MidiTok's `encode(...).tokens`."""
        return [self.id_to_token[i] for i in self.encode_base(midi).tolist()]

    def base_ids_by_bar(self, midi) -> list[np.ndarray]:
        """Base ids split per bar (empty bars included), as MidiTok splits them for BPE (remi-spec §8.3)."""
        ids, ticks, bars = self._encode(midi)
        if len(ids) == 0:
            return []
        bar_of = np.searchsorted(bars, ticks, side="right") - 1
        n = int(bar_of[-1]) + 1
        cuts = np.searchsorted(bar_of, np.arange(1, n), side="left")
        return np.split(ids, cuts)

    def encode(self, midi) -> np.ndarray:
        """Token ids of a MIDI path, bytes or symusic.Score (BPE ids once BPE is trained)."""
        if self.bpe is not None:
            return self.bpe.encode_bars(self.base_ids_by_bar(midi))
        return self.encode_base(midi)

    # ------------------------------------------------------------------------------------------------
    # decoding

    def decode(self, ids_or_tokens) -> symusic.Score:
        """A Score (tpq 24) from ids (base or BPE) or token strings. Never raises on bad sequences."""
        return self.decode_with_report(ids_or_tokens)[0]

    def decode_with_report(self, ids_or_tokens) -> tuple[symusic.Score, int]:
        """(Score, number of tokens skipped because they did not fit the grammar)."""
        seq = list(ids_or_tokens) if not isinstance(ids_or_tokens, np.ndarray) else ids_or_tokens
        skipped = 0
        if len(seq) and isinstance(seq[0], str):
            ids = []
            for t in seq:
                i = self.vocab.get(t)
                if i is None and self.extra is not None and t in self.extra.id:
                    continue  # an infilling, style or attribute token: no notes
                if i is None:
                    skipped += 1
                else:
                    ids.append(i)
            ids = np.array(ids, dtype=np.int64)
        else:
            ids = np.asarray(seq, dtype=np.int64).reshape(-1)
            if self.extra is not None:  # infilling, style and attribute tokens carry no notes
                ids = ids[~self.extra.is_extra(ids)]
            if self.bpe is not None and len(ids) and (ids >= len(self.vocab)).any():
                bad = (ids < 0) | (ids >= len(self.bpe))
                skipped += int(bad.sum())
                ids = self.bpe.decode(ids[~bad])
        bad = (ids < 0) | (ids >= len(self.vocab))
        skipped += int(bad.sum())
        score, n = _Decoder(self, ids[~bad]).run()
        return score, skipped + n

    # ------------------------------------------------------------------------------------------------
    # files

    def to_dict(self) -> dict:
        d = {"tokenizer": "midistral.REMI", "version": 1, "config": self.config.to_dict()}
        if self.bpe is not None:
            d["bpe"] = self.bpe.to_dict()
        if self.extra is not None:
            d["extra"] = self.extra.to_dict()
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer") -> "REMI":
        tok = cls(REMIConfig(**d.get("config", {})))
        if d.get("bpe"):
            tok.bpe = BPE.from_dict(d["bpe"], source)
        if d.get("extra"):
            tok.extra = ExtraVocab.from_dict(d["extra"], source)
            if tok.extra.start != tok.music_size:
                raise CheckpointError(f"{source}: extra tokens start at {tok.extra.start}, after {tok.music_size} music ids")
        return tok

    @classmethod
    def from_dict_cached(cls, d: dict) -> "REMI":
        """from_dict, built once per process (worker processes get the same dict many times)."""
        key = json.dumps(d, sort_keys=True)
        if key not in _CACHE:
            _CACHE[key] = cls.from_dict(d)
        return _CACHE[key]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "REMI":
        """Our tokenizer JSON (`save`) or MidiTok's (`from_miditok`)."""
        path = Path(path)
        d = read_tokenizer_json(path)
        if "miditok_version" in d:
            return cls.from_miditok(path)
        if d.get("tokenizer") != "midistral.REMI":
            raise CheckpointError(f"{path}: field 'tokenizer' is {d.get('tokenizer')!r}, expected 'midistral.REMI'")
        return cls.from_dict(d, str(path))

    @classmethod
    def from_miditok(cls, path) -> "REMI":
        """A REMI tokenizer from a MidiTok 3.1 tokenizer JSON (`tokenizer.save`), with its BPE model if trained."""
        config, vocab_base, hf = read_miditok(path)
        tok = cls(config)
        if vocab_base is not None and vocab_base != tok.vocab:
            raise CheckpointError(f"{path}: field '_vocab_base' differs from the vocabulary its config gives")
        if hf is not None:
            tok.bpe = BPE(hf, len(tok.vocab))
        return tok

    # ------------------------------------------------------------------------------------------------
    # BPE and many files (training.py, parallel.py)

    def train_bpe(self, files_or_token_lists, vocab_size: int, workers: int | None = None):
        """Learn BPE merges on MIDI files or token lists (replacing any); returns the (item, error) skipped."""
        return train_bpe(self, files_or_token_lists, vocab_size, workers=workers)

    def base_ids(self, ids) -> np.ndarray:
        """Base ids of model ids (the BPE expansion; base ids unchanged without BPE)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.bpe is not None:
            return self.bpe.decode(ids)
        return ids if self.extra is None else ids[~self.extra.is_extra(ids)]

    def encode_many(self, paths, workers: int | None = None) -> list[EncodeResult]:
        """Encode many files in parallel processes; each file's failure is reported, not raised."""
        return encode_many(self, paths, workers=workers)


_CACHE: dict[str, "REMI"] = {}

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



class _Decoder:
    """Reads base ids back into a Score, mirroring the encoder's clock so decode∘encode is the identity.

    Only the time tokens (Bar, Rest, Position, TimeSig, Tempo) walk the clock in a Python loop; notes
    between two time tokens share one tick, so they are found, timed and gathered with numpy.
    """

    TIME_FAMILIES = (Family.BAR, Family.POSITION, Family.TEMPO, Family.TIME_SIG, Family.REST)

    def __init__(self, tok: REMI, ids: np.ndarray):
        self.tok, self.ids = tok, ids
        self.fam = fam = tok.family[ids]
        # the encoder's resolution: 12 ticks per quarter, 24 if any /8 meter appears; output is tpq 24
        max_den = max([self._meter(i)[1] for i in np.unique(ids[fam == Family.TIME_SIG]).tolist()] or [4])
        self.tpq = int(tok.max_res * max_den / 4)
        self.time_events = np.flatnonzero(np.isin(fam, self.TIME_FAMILIES))
        self.dur_tables: dict[int, np.ndarray] = {}
        self.rest_tables: dict[int, list] = {}
        self.seg_max: dict[int, list] = {}

    def _meter(self, ts_id: int) -> tuple[int, int]:
        num, den = self.tok.id_to_token[ts_id].split("_")[1].split("/")
        return int(num), int(den)

    def run(self) -> tuple[symusic.Score, int]:
        note_idx, skipped = self._find_notes()
        self.note_idx = note_idx
        self.dur_idx = self.ids[note_idx + 2] - self.tok.dur0
        self.seg = np.searchsorted(self.time_events, note_idx)  # notes after time event k-1 form segment k
        seg_tick, seg_tpb, time_sigs, tempos, bad_positions = self._walk_clock()
        start = np.asarray(seg_tick, dtype=np.int64)[self.seg]
        n_tpb = np.asarray(seg_tpb, dtype=np.int64)[self.seg]
        dur = np.zeros(len(note_idx), dtype=np.int64)
        for b, table in self.dur_tables.items():
            m = n_tpb == b
            dur[m] = table[self.dur_idx[m]]
        return self._score(start, dur, time_sigs, tempos), skipped + bad_positions

    def _find_notes(self) -> tuple[np.ndarray, int]:
        """Positions of Pitch|PitchDrum followed by Velocity and Duration; other note-family tokens are skipped."""
        fam, n = self.fam, len(self.fam)
        padded = np.concatenate([fam, np.zeros(2, dtype=fam.dtype)])
        f1, f2 = padded[1:n + 1], padded[2:n + 2]
        is_pitch = (fam == Family.PITCH) | (fam == Family.PITCH_DRUM)
        note_idx = np.flatnonzero(is_pitch & (f1 == Family.VELOCITY) & (f2 == Family.DURATION))
        used = np.zeros(n, bool)
        used[note_idx] = used[note_idx + 1] = used[note_idx + 2] = True
        note_family = (fam >= Family.PITCH) & (fam <= Family.DURATION)
        return note_idx, int((note_family & ~used).sum())

    def _tables(self, tpb: int) -> None:
        """Duration and rest ticks at `tpb` ticks per beat, and each segment's longest note, on first use."""
        if tpb not in self.dur_tables:
            self.dur_tables[tpb] = self.tok.duration_ticks(tpb)
            self.rest_tables[tpb] = self.tok.rest_ticks(tpb).tolist()
            m = np.full(len(self.time_events) + 1, -1, dtype=np.int64)
            np.maximum.at(m, self.seg, self.dur_tables[tpb][self.dur_idx])
            self.seg_max[tpb] = m.tolist()  # the longest note of each segment, at this tpb

    def _first_meter(self) -> tuple[int, int]:
        """The first TimeSig if it comes before any note-family token, else 4/4."""
        first_ts = np.flatnonzero(self.fam == Family.TIME_SIG)
        note_family = np.flatnonzero((self.fam >= Family.PITCH) & (self.fam <= Family.DURATION))
        if len(first_ts) and (not len(note_family) or first_ts[0] < note_family[0]):
            return self._meter(int(self.ids[first_ts[0]]))
        return 4, 4

    def _walk_clock(self):
        """The tick of each segment (notes between two time tokens) and the meter and tempo changes."""
        tok = self.tok
        clock = BarClock(self.tpq, tok.max_res, self._first_meter())
        self._tables(clock.tpb)
        time_sigs, tempos, bad_positions = [(0, clock.num, clock.den)], [], 0
        seg_tick = [0] * (len(self.time_events) + 1)
        seg_tpb = [clock.tpb] * (len(self.time_events) + 1)
        events = zip(self.fam[self.time_events].tolist(), self.ids[self.time_events].tolist())
        for k, (f, tid) in enumerate(events):
            longest = self.seg_max[clock.tpb][k]
            if longest >= 0:  # the notes just before this token end by then
                clock.note(longest)
            if f == Family.BAR:
                clock.bar()
            elif f == Family.REST:
                clock.rest(self.rest_tables[clock.tpb][tid - tok.rest0])
            elif f == Family.POSITION:
                bad_positions += not clock.position(tid - tok.pos0)
            elif f == Family.TEMPO:
                tempos.append((clock.cur_tick, float(tok.id_to_token[tid].split("_")[1])))
                clock.tempo()
            elif clock.meter(*self._meter(tid)):  # TimeSig: a change of meter (a recall changes nothing)
                time_sigs.append((clock.tick_bar, clock.num, clock.den))
                self._tables(clock.tpb)
            seg_tick[k + 1], seg_tpb[k + 1] = clock.cur_tick, clock.tpb
        return seg_tick, seg_tpb, time_sigs, tempos, bad_positions

    def _score(self, start, dur, time_sigs, tempos) -> symusic.Score:
        tok, c, ids, note_idx = self.tok, self.tok.config, self.ids, self.note_idx
        is_drum_tok = self.fam[note_idx] == Family.PITCH_DRUM
        pitch = np.where(is_drum_tok, ids[note_idx] - tok.drum0 + c.drums_pitch_range[0],
                         ids[note_idx] - tok.pitch0 + c.pitch_range[0])
        vel = tok.velocities[ids[note_idx + 1] - tok.vel0]
        prog_pos = np.flatnonzero(self.fam == Family.PROGRAM)
        prog_val = np.array([tok.program_of[i] for i in ids[prog_pos].tolist()], dtype=np.int64)
        k = np.searchsorted(prog_pos, note_idx) - 1
        program = np.where(k >= 0, prog_val[np.maximum(k, 0)] if len(prog_val) else 0, 0)

        # track order: the order programs take within each tick (the encoder's track order)
        _, first = np.unique(program, return_index=True)
        first_seen = program[np.sort(first)].tolist()
        same = (start[1:] == start[:-1]) & (program[1:] != program[:-1])
        prec = set(zip(program[:-1][same].tolist(), program[1:][same].tolist()))

        scale = 24 / self.tpq
        score = symusic.Score(24)
        merged_ts = {int(round(t * scale)): (nn, dd) for t, nn, dd in time_sigs}  # the later of one tick wins
        for t, (nn, dd) in sorted(merged_ts.items()):
            score.time_signatures.append(symusic.TimeSignature(t, nn, dd))
        if not tempos or tempos[0][0] != 0:
            tempos.insert(0, (0, float(tok.tempos[tok.default_tempo_idx])))
        for t, q in tempos:
            score.tempos.append(symusic.Tempo(int(round(t * scale)), q))
        for p in _track_order(first_seen, prec):
            m = program == p
            tr = symusic.Track(name=program_name(p), program=0 if p == -1 else p, is_drum=p == -1)
            tr.notes = symusic.Note.from_numpy(
                np.round(start[m] * scale).astype(np.int32), np.round(dur[m] * scale).astype(np.int32),
                pitch[m].astype(np.int8), vel[m].astype(np.int8), "tick")
            score.tracks.append(tr)
        return score


def _track_order(first_seen: list[int], prec: set[tuple[int, int]]) -> list[int]:
    """Programs ordered so that, at every tick, they come in the order the stream lists them
    (a topological order of `prec`), ties broken by first appearance; a cycle falls back to it."""
    remaining = list(first_seen)
    out = []
    while remaining:
        for p in remaining:
            if not any((q, p) in prec for q in remaining if q != p):
                out.append(p)
                remaining.remove(p)
                break
        else:
            return out + remaining
    return out
