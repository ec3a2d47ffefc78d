"""Controls for generation: which instruments play, how many bars, and adding a track to a piece.

    programs = parse_programs("piano,bass,drums")              # [0, 33, -1]
    cons = [ProgramsConstraint(tok, programs), BarsConstraint(tok, 8)]
    ids = generate(model, prompt, max_new_tokens=bars_token_budget(model, prompt.shape[1]),
                   eos_id=tok.eos_id, constraints=cons)           # stops at the bar line after 8 new bars
    score = accompany(model, tok, "song.mid", program=33)       # song.mid unchanged + a new bass track

Constraints follow generate's protocol (start / mask / push, see midistral.generate) and work on BPE ids:
each id stands for a fixed sequence of base tokens (its expansion), precomputed once per tokenizer.
"""

from __future__ import annotations

import copy
import difflib
import re

import numpy as np
import symusic
import torch

from midistral.errors import MidistralError, MidiError
from midistral.generate import NoRepeatNGram, RollingKVCache, model_config, sample_next
from midistral.tokenize import GM_NAMES, load_score
from midistral.tokenize.remi import _TimeState

# token families (midistral.tokenize.remi._FAMILIES)
BAR, POSITION, PITCH, DRUM, VELOCITY, DURATION, PROGRAM, TEMPO, TIMESIG, REST, CHORD = range(1, 12)

# ----------------------------------------------------------------------------------------------------
# Instruments by number or name

SHORT_NAMES = {
    "piano": 0, "grand piano": 0, "bright piano": 1, "electric piano": 4, "epiano": 4, "harpsichord": 6,
    "celesta": 8, "glockenspiel": 9, "music box": 10, "vibraphone": 11, "vibes": 11, "marimba": 12,
    "xylophone": 13, "bells": 14, "organ": 19, "church organ": 19, "drawbar organ": 16, "rock organ": 18,
    "accordion": 21, "harmonica": 22, "guitar": 24, "nylon guitar": 24, "classical guitar": 24,
    "acoustic guitar": 25, "steel guitar": 25, "electric guitar": 27, "jazz guitar": 26, "clean guitar": 27,
    "overdriven guitar": 29, "distortion guitar": 30, "bass": 33, "electric bass": 33, "acoustic bass": 32,
    "upright bass": 32, "fretless bass": 35, "slap bass": 36, "synth bass": 38, "violin": 40, "viola": 41,
    "cello": 42, "contrabass": 43, "double bass": 43, "strings": 48, "string ensemble": 48,
    "pizzicato": 45, "harp": 46, "timpani": 47, "synth strings": 50, "choir": 52, "voice": 53, "voices": 53,
    "trumpet": 56, "trombone": 57, "tuba": 58, "horn": 60, "french horn": 60, "brass": 61, "sax": 65,
    "saxophone": 65, "soprano sax": 64, "alto sax": 65, "tenor sax": 66, "baritone sax": 67, "oboe": 68,
    "english horn": 69, "bassoon": 70, "clarinet": 71, "piccolo": 72, "flute": 73, "recorder": 74,
    "pan flute": 75, "whistle": 78, "ocarina": 79, "lead": 80, "synth lead": 80, "synth": 80, "pad": 88,
    "synth pad": 88, "sitar": 104, "banjo": 105, "koto": 107, "kalimba": 108, "bagpipe": 109, "fiddle": 110,
    "steel drums": 114, "drums": -1, "drum": -1, "drum kit": -1, "percussion": -1,
}


def _norm(name: str) -> str:
    return " ".join(re.sub(r"[()_\-+]", " ", name.lower()).split())


_NAMES = {**{_norm(n): i for i, n in enumerate(GM_NAMES)}, **{_norm(n): p for n, p in SHORT_NAMES.items()}}


def program_name(program: int) -> str:
    """The track name midistral gives a program: its General MIDI name, 'Drums' for -1."""
    return "Drums" if program == -1 else GM_NAMES[program]


def parse_program(value, what: str = "program") -> int:
    """One program: an int -1..127 (-1 = drums) or an instrument name; MidistralError naming the value."""
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        p = int(text)
        if not -1 <= p <= 127:
            raise MidistralError(f"{what}: {text} is outside -1..127 (General MIDI programs 0..127, -1 = drums)")
        return p
    p = _NAMES.get(_norm(text))
    if p is None:
        close = difflib.get_close_matches(_norm(text), list(_NAMES), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (a number -1..127 or a name: piano, bass, drums, ...)"
        raise MidistralError(f"{what}: unknown instrument {text!r}{hint}")
    return p


def parse_programs(spec) -> list[int]:
    """"0,33,-1" or "piano,bass,drums" (or a list of those) -> [0, 33, -1], duplicates dropped, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [x for x in items if str(x).strip()]
    if not items:
        raise MidistralError(f"programs: {spec!r} names no instrument")
    return list(dict.fromkeys(parse_program(x, "programs") for x in items))


# ----------------------------------------------------------------------------------------------------
# Base-token expansion of every id


def id_expansions(tok) -> list[np.ndarray]:
    """For each id of `tok` (BPE ids once BPE is trained), the base ids it stands for."""
    if tok.bpe is None:
        return [np.array([i], dtype=np.int64) for i in range(len(tok))]
    return [tok.bpe.decode([i]) for i in range(len(tok))]


def _expansion_matrix(tok) -> tuple[np.ndarray, np.ndarray]:
    """(ids x max_len) base ids padded with -1, and each id's length: the expansions, vectorised."""
    exp = id_expansions(tok)
    lens = np.array([len(e) for e in exp], dtype=np.int64)
    mat = np.full((len(exp), max(int(lens.max()), 1)), -1, dtype=np.int64)
    for i, e in enumerate(exp):
        mat[i, :len(e)] = e
    return mat, lens


def _family_matrix(tok, mat: np.ndarray) -> np.ndarray:
    return np.where(mat >= 0, tok._family[np.maximum(mat, 0)], -1)


def _row_finished(tokens: list[int], done: list[bool], eos_id) -> None:
    for r, t in enumerate(tokens):
        if eos_id is not None and t == eos_id:
            done[r] = True


# ----------------------------------------------------------------------------------------------------
# Instruments


class ProgramsConstraint:
    """No note of a program outside `programs` in the continuation.

    Masks every id whose expansion holds a Program token outside the allowed set, and (for sequences
    that break the grammar) a Pitch that would fall under a forbidden program because no Program token
    precedes it. With a prompt, `keep_prompt=True` also allows the prompt's own programs, except those
    in `exclude`: `ProgramsConstraint(tok, [33], exclude=[0])` keeps the prompt's instruments but the
    piano, and adds a bass.
    """

    def __init__(self, tok, programs, *, keep_prompt: bool = True, exclude=()):
        self.tok = tok
        self.programs = {parse_program(p, "programs") for p in programs}
        self.exclude = {parse_program(p, "exclude") for p in exclude}
        self.keep_prompt = keep_prompt
        mat, _ = _expansion_matrix(tok)
        fam = _family_matrix(tok, mat)
        prog_of = np.full(len(tok.vocab), -99, dtype=np.int64)
        for i, p in tok.program_of.items():
            prog_of[i] = p
        self._prog = np.where(fam == PROGRAM, prog_of[np.maximum(mat, 0)], -99)  # program per slot, -99 none
        has_prog = fam == PROGRAM
        # a Pitch/PitchDrum before any Program token in the id: it falls under the current program
        first_prog = np.where(has_prog.any(1), has_prog.argmax(1), mat.shape[1])
        first_pitch = np.where(((fam == PITCH) | (fam == DRUM)).any(1), ((fam == PITCH) | (fam == DRUM)).argmax(1),
                               mat.shape[1])
        self._orphan_pitch = torch.from_numpy(first_pitch < first_prog)
        last = np.where(has_prog.any(1), mat.shape[1] - 1 - has_prog[:, ::-1].argmax(1), -1)
        self._last_prog = np.where(last >= 0, self._prog[np.arange(len(mat)), np.maximum(last, 0)], -99)
        self._eos = tok.eos_id

    def _forbidden(self, allowed: set[int]) -> torch.Tensor:
        bad = (self._prog != -99) & ~np.isin(self._prog, list(allowed))
        return torch.from_numpy(bad.any(1))

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.allowed, self.current, self.done = [], [], []
        forbidden = []
        for row in prompt_ids.tolist():
            base = self.tok.base_ids(row)
            progs = [self.tok.program_of[i] for i in base.tolist() if i in self.tok.program_of]
            allowed = set(self.programs)
            if self.keep_prompt:
                allowed |= set(progs) - self.exclude
            self.allowed.append(allowed)
            forbidden.append(self._forbidden(allowed))
            self.current.append(progs[-1] if progs else 0)  # the decoder's program for a note with none
            self.done.append(False)
        self.forbidden = torch.stack(forbidden)

    def mask(self, logits: torch.Tensor) -> None:
        bad = self.forbidden.clone()
        for r, cur in enumerate(self.current):
            if cur not in self.allowed[r]:
                bad[r] |= self._orphan_pitch
        logits.masked_fill_(bad.to(logits.device), float("-inf"))

    def push(self, tokens: torch.Tensor) -> None:
        toks = tokens.tolist()
        _row_finished(toks, self.done, self._eos)
        for r, t in enumerate(toks):
            if 0 <= t < len(self._last_prog) and self._last_prog[t] != -99:
                self.current[r] = int(self._last_prog[t])


# ----------------------------------------------------------------------------------------------------
# Length in bars


class _Tables:
    """Per tokenizer and time resolution: token families, meters of TimeSig ids, tick tables per beat length."""

    def __init__(self, tok, tpq: int):
        self.tok, self.tpq = tok, tpq
        self.fam = tok._family.tolist()
        self.meter = {i: ts for ts, i in tok.ts_id.items()}
        self.dur0, self.rest0, self.pos0 = tok.dur0, tok.rest0, tok.pos0
        self.durs: dict[int, list[int]] = {}
        self.rests: dict[int, list[int]] = {}

    def units(self, num: int, den: int):
        tpb = self.tpq * 4 // den
        if tpb not in self.durs:
            self.durs[tpb] = self.tok._duration_ticks(tpb).tolist()
            self.rests[tpb] = self.tok._rest_ticks(tpb).tolist()
        return tpb, num * tpb, max(tpb // self.tok.max_res, 1)


class _Clock:
    """The decoder's clock (midistral.tokenize.remi._Decoder.run) fed one base token at a time, so that a
    constraint knows which bar the decoded piece is in: Bar tokens, rests that cross bar lines, meter changes."""

    def __init__(self, tables: _Tables, meter=(4, 4)):
        self.t = tables
        self.num, self.den = meter
        self.tpb, self.bar_len, self.tpp = tables.units(*meter)
        self.cur_tick = self.tick_at_ts = self.tick_bar = self.bar_at_ts = self.prev_end = 0
        self.cur_bar = -1
        self.fam1 = self.fam2 = 0  # families of the two previous tokens (a note is Pitch Velocity Duration)
        self.note_in_bar = False
        self.seen_ts = self.seen_note = False
        self.history: tuple = ()  # base tokens before the first TimeSig (it may set the initial meter)

    def copy(self) -> "_Clock":
        return copy.copy(self)

    def _enter(self) -> None:
        if self.cur_bar == -1:
            self.cur_bar = 0

    def feed(self, t: int) -> bool:
        """Advance by one base token; True when it completes a note."""
        f = self.t.fam[t]
        if not self.seen_ts and not self.seen_note:
            self.history += (t,)
        note = f == DURATION and self.fam1 == VELOCITY and self.fam2 in (PITCH, DRUM)
        self.fam2, self.fam1 = self.fam1, f
        if PITCH <= f <= DURATION:
            self.seen_note = True
        if note:
            self.prev_end = max(self.prev_end, self.cur_tick + self.t.durs[self.tpb][t - self.t.dur0])
            self.note_in_bar = True
        elif f == BAR:
            self.cur_bar += 1
            self.tick_bar = self.tick_at_ts + (self.cur_bar - self.bar_at_ts) * self.bar_len
            self.cur_tick, self.note_in_bar = self.tick_bar, False
        elif f == REST:
            self.cur_tick = max(self.prev_end, self.cur_tick) + self.t.rests[self.tpb][t - self.t.rest0]
            real_bar = self.bar_at_ts + (self.cur_tick - self.tick_at_ts) // self.bar_len
            if real_bar > self.cur_bar:
                self._enter()
                self.tick_bar += (real_bar - self.cur_bar) * self.bar_len
                self.cur_bar, self.note_in_bar = real_bar, False
        elif f == POSITION:
            self._enter()
            pos = t - self.t.pos0
            if pos * self.tpp < self.bar_len:
                self.cur_tick = self.tick_bar + pos * self.tpp
        elif f == TEMPO:
            self.prev_end = max(self.prev_end, self.cur_tick)
        elif f == TIMESIG:
            self._timesig(t)
        return note

    def _timesig(self, t: int) -> None:
        meter = self.t.meter[t]
        if not self.seen_ts and not self.seen_note:  # the decoder's initial meter: replay with it
            fresh = _Clock(self.t, meter)
            for x in self.history[:-1]:
                fresh.feed(x)
            self.__dict__.update(fresh.__dict__)
        elif meter != (self.num, self.den):
            self._enter()
            self.num, self.den = meter
            self.tick_at_ts, self.bar_at_ts = self.tick_bar, self.cur_bar
            self.tpb, self.bar_len, self.tpp = self.t.units(*meter)
        self.seen_ts = True

    def key(self):
        """The state that decides how the next tokens move through bars (for caching)."""
        if self.cur_bar == -1:  # before the first bar the clock sits at tick 0
            return (-1, self.prev_end, self.num, self.den, self.fam1, self.fam2)
        return (self.cur_tick - self.tick_bar, max(self.prev_end, self.cur_tick) - self.tick_bar, self.num,
                self.den, self.fam1, self.fam2, self.note_in_bar)


OK, CLOSES, FORBIDDEN = 0, 1, 2


class BarsConstraint:
    """Exactly `n_bars` new bars: EOS is masked until the n-th new bar holds a note, and the token that
    reaches the bar line after it (a Bar, or a rest crossing it) is the last one: EOS is forced next.

    Bars are counted as the decoder counts them: Bar tokens and bar lines crossed by Rest tokens (which get
    no Bar token), through meter changes, inside BPE ids. A new bar is one the clock enters after the
    prompt (the bar the prompt ends in is not new). An id that would skip the last bar, leave it empty,
    or put a note past it is masked, so the decoded continuation spans exactly n_bars bars: its last note
    starts in the n-th. A piece must open with [Bar] TimeSig (as every encoded piece does). Meters with a
    larger denominator than the prompt's (a /8 after /4 only) are masked: they would change the decoder's
    time resolution for the whole piece. Pass it after the grammar constraint: when it forces EOS it
    overrides the other masks.
    """

    def __init__(self, tok, n_bars: int):
        if int(n_bars) < 1:
            raise MidistralError(f"bars: {n_bars} must be >= 1")
        self.tok, self.n = tok, int(n_bars)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        fam = tok._family.tolist()
        fams = [[fam[x] for x in e] for e in self.exp]
        meter = {i: ts for ts, i in tok.ts_id.items()}
        self._den = np.array([max([meter[x][1] for x in e if x in meter] or [0]) for e in self.exp])
        # per id, for a cheap bound on the bar lines it can cross: Bar tokens, rest length in beats, meters
        rest_beats = [(b * r + p) / r for b, p, r in tok.rests]
        self._nbar = np.array([f.count(BAR) for f in fams])
        self._rest_beats = np.array([sum(rest_beats[x - tok.rest0] for x in e if fam[x] == REST) for e in self.exp])
        self._has_ts = np.array([TIMESIG in f for f in fams])
        self._has_note = np.array([any(PITCH <= x <= DURATION for x in f) for f in fams])
        self._early = [np.array([_early_ok(f, had_bar) for f in fams]) for had_bar in (False, True)]
        self._eos = tok.eos_id

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.rows = []
        for row in prompt_ids.tolist():
            base = self.tok.base_ids(row).tolist()
            present = set(base)
            max_den = max([d for (_, d), i in self.tok.ts_id.items() if i in present] or [4])
            tables = _Tables(self.tok, self.tok.max_res * max_den // 4)
            clock = _Clock(tables)
            for x in base:
                clock.feed(x)
            min_bar = min(tables.units(n, d)[1] for n, d in self.tok.time_sigs if d <= max_den)
            banned = torch.from_numpy(self._den > max_den)
            self.rows.append(dict(clock=clock, start=clock.cur_bar, banned=banned, done=False, finished=False,
                                  cache={}, min_bar=min_bar))

    @property
    def complete(self) -> list[bool]:
        """Per row: the n bars were written (False where max_new_tokens ran out first)."""
        return [r["done"] or (r["clock"].cur_bar - r["start"] == self.n and r["clock"].note_in_bar)
                for r in self.rows]

    def _status(self, row) -> np.ndarray:
        """Per id: OK, CLOSES (reaches the bar line after the last bar, properly) or FORBIDDEN."""
        clock, entered = row["clock"], row["clock"].cur_bar - row["start"]
        if not clock.seen_ts and not clock.seen_note:  # the stream must open with [Bar] TimeSig
            return np.where(self._early[len(clock.history) > 0], OK, FORBIDDEN).astype(np.int8)
        key = clock.key() + (self.n - entered,)
        if key in row["cache"]:
            return row["cache"][key]
        ahead = max(clock.prev_end, clock.cur_tick) - clock.tick_bar
        bar_len = np.where(self._has_ts, row["min_bar"], clock.bar_len)
        bound = self._nbar + (ahead + self._rest_beats * clock.tpb) // bar_len + 2
        cand = entered + bound >= self.n + 1
        if clock.cur_bar == -1:
            cand |= self._has_note
        status = np.zeros(len(self.exp), dtype=np.int8)
        for i in np.flatnonzero(cand).tolist():
            status[i] = self._simulate(clock, self.exp[i], row["start"])
        row["cache"][key] = status
        return status

    def _simulate(self, clock: _Clock, expansion: list[int], start: int) -> int:
        c = clock.copy()
        for x in expansion:
            before, had_note = c.cur_bar - start, c.note_in_bar
            note = c.feed(x)
            after = c.cur_bar - start
            if after > self.n + 1 or (after == self.n + 1 and (before != self.n or not had_note)):
                return FORBIDDEN
            if note and (after > self.n or c.cur_bar == -1):
                return FORBIDDEN
        return CLOSES if c.cur_bar - start == self.n + 1 else OK

    def mask(self, logits: torch.Tensor) -> None:
        for r, row in enumerate(self.rows):
            if row["finished"]:
                continue
            if row["done"]:
                logits[r] = float("-inf")
                if self._eos is not None:
                    logits[r, self._eos] = 0.0
                continue
            bad = row["banned"] | torch.from_numpy(self._status(row) == FORBIDDEN)
            logits[r].masked_fill_(bad.to(logits.device), float("-inf"))
            clock = row["clock"]
            if self._eos is not None and not (clock.cur_bar - row["start"] == self.n and clock.note_in_bar):
                logits[r, self._eos] = float("-inf")

    def push(self, tokens: torch.Tensor) -> None:
        for row, t in zip(self.rows, tokens.tolist()):
            if row["finished"] or row["done"] or t == self._eos:
                row["finished"] = row["finished"] or t == self._eos
                continue
            if 0 <= t < len(self.exp):
                for x in self.exp[t]:
                    row["clock"].feed(x)
            row["done"] = row["clock"].cur_bar - row["start"] > self.n


def _early_ok(fams: list[int], had_bar: bool) -> bool:
    """Before the first TimeSig: at most one Bar, then the TimeSig (as the encoder opens every piece)."""
    for f in fams:
        if f == TIMESIG:
            return True
        if f == BAR and not had_bar:
            had_bar = True
        elif f != 0:
            return False
    return True


def bars_token_budget(model, prompt_len: int) -> int:
    """max_new_tokens for a BarsConstraint run: all the room the model's positions leave after the prompt.
    Generation ends when the constraint forces EOS; `BarsConstraint.complete` says if the room ran out."""
    return max(model_config(model).max_position_embeddings - int(prompt_len), 1)
