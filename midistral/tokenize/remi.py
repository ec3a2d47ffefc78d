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

The work is done in ids with numpy; strings are made only by `tokens()`. The preprocessing of a Score
is preprocess.py, the decoder decode.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import symusic

from midistral.errors import CheckpointError, MidiError
from midistral.io import atomic_write_json, read_tokenizer_json
from midistral.tokenize.bpe import BPE
from midistral.tokenize.chords import detect_chords, quality_table
from midistral.tokenize.clock import EncoderClock, bar_lines
from midistral.tokenize.config import DEFAULT_PARAMS, REMIConfig
from midistral.tokenize.decode import Decoder
from midistral.tokenize.family import FAMILY_OF_PREFIX, Family
from midistral.tokenize.midi_io import load_score, midi_label
from midistral.tokenize.extra import ExtraVocab
from midistral.tokenize.miditok_json import read_miditok
from midistral.tokenize.parallel import EncodeResult, encode_many
from midistral.tokenize.preprocess import preprocess
from midistral.tokenize.training import train_bpe


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
    bar_ticks: np.ndarray       # the bar lines' ticks (the encoder's bars, empty ones included)


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
        self.family = np.array([FAMILY_OF_PREFIX.get(t.split("_", 1)[0], Family.SPECIAL) for t in tokens],
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
    # encoding (remi-spec §4, §5; the preprocessing of §3 is preprocess.py)

    def _encode(self, midi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Base ids, the tick each token belongs to, and the bar-line ticks (for splitting per bar)."""
        score = load_score(midi)
        if score.ticks_per_quarter <= 0:
            raise MidiError(f"{midi_label(midi)}: invalid ticks per quarter ({score.ticks_per_quarter})")
        tpq, ts_list, tracks, tempo_times, tempo_idx = preprocess(self, score)
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
        tpq, ts_list, tracks, _, _ = preprocess(self, score)
        ids, ticks, bars = self._encode(score)
        onsets = np.concatenate([tr["time"] for tr in tracks]) if tracks else np.zeros(0, dtype=np.int64)
        ends = np.concatenate([tr["end"] for tr in tracks]) if tracks else np.zeros(0, dtype=np.int64)
        return TimedEncoding(ids, ticks, tpq, ts_list, onsets, ends, bars)

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
        score, n = Decoder(self, ids[~bad]).run()
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
