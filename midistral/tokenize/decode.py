"""Decoding base ids back into a Score: the decoder mirrors the encoder's clock (tokenize/clock.py), so
decode then encode gives back the same tokens."""

from __future__ import annotations

import numpy as np
import symusic

from midistral.general_midi import program_name
from midistral.tokenize.clock import BarClock
from midistral.tokenize.family import Family


class Decoder:
    """Reads base ids back into a Score, mirroring the encoder's clock so decode∘encode is the identity.

    Only the time tokens (Bar, Rest, Position, TimeSig, Tempo) walk the clock in a Python loop; notes
    between two time tokens share one tick, so they are found, timed and gathered with numpy.
    """

    TIME_FAMILIES = (Family.BAR, Family.POSITION, Family.TEMPO, Family.TIME_SIG, Family.REST)

    def __init__(self, tok, ids: np.ndarray):
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
