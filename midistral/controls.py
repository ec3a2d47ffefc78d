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
from midistral.generate import NoRepeatNGram, sample_next
from midistral.model import RollingKVCache, prepare_for_decode
from midistral.model.cache import model_config
from midistral.sampling import SAMPLING
from midistral.tokenize import GM_NAMES, load_score
from midistral.tokenize.bpe import CHR_OFFSET, METASPACE
from midistral.tokenize.grammar import expansions
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
    return expansions(tok)


def _expansion_matrix(tok) -> tuple[np.ndarray, np.ndarray]:
    """(ids x max_len) base ids padded with -1, and each id's length: the expansions, vectorised."""
    exp = id_expansions(tok)
    lens = np.array([len(e) for e in exp], dtype=np.int64)
    mat = np.full((len(exp), max(int(lens.max()), 1)), -1, dtype=np.int64)
    for i, e in enumerate(exp):
        mat[i, :len(e)] = e
    return mat, lens


def _family_matrix(tok, mat: np.ndarray) -> np.ndarray:
    return np.where(mat >= 0, tok.family[np.maximum(mat, 0)], -1)


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
        self.fam = tok.family.tolist()
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
        c = _Clock.__new__(_Clock)
        c.__dict__.update(self.__dict__)
        return c

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
    starts in the n-th. A piece must open with [Bar] TimeSig and a TimeSig must follow a Bar (as in
    every encoded piece: a meter change mid-bar would move notes already written). Meters with a
    larger denominator than the prompt's (a /8 after /4 only) are masked: they would change the decoder's
    time resolution for the whole piece. Pass it after the grammar constraint: when it forces EOS it
    overrides the other masks.
    """

    def __init__(self, tok, n_bars: int):
        if int(n_bars) < 1:
            raise MidistralError(f"bars: {n_bars} must be >= 1")
        self.tok, self.n = tok, int(n_bars)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        fam = tok.family.tolist()
        fams = [[fam[x] for x in e] for e in self.exp]
        meter = {i: ts for ts, i in tok.ts_id.items()}
        self._den = np.array([max([meter[x][1] for x in e if x in meter] or [0]) for e in self.exp])
        # per id, for a cheap bound on the bar lines it can cross: Bar tokens, rest length in beats, meters
        rest_beats = [(b * r + p) / r for b, p, r in tok.rests]
        self._nbar = np.array([f.count(BAR) for f in fams])
        self._rest_beats = np.array([sum(rest_beats[x - tok.rest0] for x in e if fam[x] == REST) for e in self.exp])
        self._has_ts = np.array([TIMESIG in f for f in fams])
        self._clockwise = np.array([any(x in (POSITION, PITCH, DRUM, VELOCITY, DURATION) for x in f) for f in fams])
        self._early = [np.array([_early_ok(f, had_bar) for f in fams]) for had_bar in (False, True)]
        # a TimeSig only right after a Bar (a meter change mid-bar would move notes already written)
        self._ts_inside_bad = torch.tensor([any(f[j] == TIMESIG and f[j - 1] != BAR for j in range(1, len(f)))
                                            for f in fams])
        self._ts_first = torch.tensor([len(f) > 0 and f[0] == TIMESIG for f in fams])
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
            return np.where(self._early[clock.cur_bar >= 0], OK, FORBIDDEN).astype(np.int8)  # a Bar was read
        key = clock.key() + (self.n - entered,)
        if key in row["cache"]:
            return row["cache"][key]
        ahead = max(clock.prev_end, clock.cur_tick) - clock.tick_bar
        bar_len = np.where(self._has_ts, row["min_bar"], clock.bar_len)
        rests = np.where(self._rest_beats > 0, (ahead + self._rest_beats * clock.tpb) // bar_len + 1, 0)
        cand = entered + self._nbar + rests + self._has_ts >= self.n + 1
        if clock.cur_bar == -1:  # a Position or a note enters bar 0 too
            cand |= self._clockwise
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
            clock = row["clock"]
            bad = row["banned"] | torch.from_numpy(self._status(row) == FORBIDDEN)
            if clock.seen_ts or clock.seen_note:
                bad |= self._ts_inside_bad | (self._ts_first if clock.fam1 != BAR else False)
            logits[r].masked_fill_(bad.to(logits.device), float("-inf"))
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


# ----------------------------------------------------------------------------------------------------
# Accompaniment: add (or rewrite) one instrument's track over an existing piece


def parse_bar_range(spec) -> tuple[int, int | None]:
    """"5:12" -> (5, 12): bars 5 to 12, counted from 1, both included; "5:" to the end, ":12" from the start."""
    if isinstance(spec, (tuple, list)):
        a, b = spec
    else:
        m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", str(spec))
        if not m or not (m.group(1) or m.group(2)):
            raise MidistralError(f"bars: {spec!r} is not a bar range such as 5:12, 5: or :12")
        a, b = (int(m.group(1)) if m.group(1) else 1), (int(m.group(2)) if m.group(2) else None)
    if a is None:
        a = 1
    if int(a) < 1 or (b is not None and int(b) < int(a)):
        raise MidistralError(f"bars: {spec!r} is not a range of bars counted from 1 (first <= last)")
    return int(a), None if b is None else int(b)


def accompany(model, tok, score_or_path, program, *, bars=None, replace=False, temperature=SAMPLING.temperature,
              top_k=SAMPLING.top_k, no_repeat_ngram_size=SAMPLING.no_repeat_ngram_size, seed=None,
              grammar=SAMPLING.grammar, precision="fp32",
              max_notes_per_tick=6) -> symusic.Score:
    """The piece with its notes unchanged plus one new track for `program` (a number or a name), written by
    the model over the whole piece or over `bars` (a:b, counted from 1). replace=True first drops the
    notes of that program and writes new ones in their place.

    The model walks the piece's token stream in time: the existing tokens are forced (fed to the model
    in chunks through one rolling KV cache), and after each tick of the piece it may write notes of the
    new program at that tick, or at a new tick before the next existing one (new ticks lie on the piece's
    own rhythmic grid: the coarsest of eighths, triplets, sixteenths, ... that holds 90% of its onsets;
    at most one bar ahead), or go on. The new track is last in track order, so at each tick its notes
    follow the others'. Time tokens (rests, bar lines, positions) are recomputed as the encoder writes
    them for the piece with its new notes, so the stream the model reads stays an exact encoding. The
    walk offers only ids that keep the stream valid, so every id decodes: `grammar` is accepted for the
    common signature and changes nothing. At most `max_notes_per_tick` new notes start together.
    `precision` is the decode path's, as in generate() (midistral.model.precision).
    """
    score = load_score(score_or_path)
    label = str(score_or_path) if not isinstance(score_or_path, symusic.Score) else "the piece"
    program = parse_program(program, "replace-track" if replace else "add-track")
    if score.note_num() == 0:
        raise MidiError(f"{label}: has no notes to accompany")
    playing = {-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)}
    if program in playing and not replace:
        raise MidistralError(f"add-track: {program_name(program)} (program {program}) already plays in {label}; "
                             f"use --replace-track {program} to rewrite it")
    keep = [t for t in score.tracks if not ((-1 if t.is_drum else t.program) == program)]
    context = symusic.Score(score.tpq)
    context.tempos, context.time_signatures = score.tempos, score.time_signatures
    for t in keep:
        context.tracks.append(t.copy())
    if context.note_num() == 0:
        raise MidiError(f"{label}: has no notes besides {program_name(program)}'s to accompany")
    walk = _Walk(model, tok, context, program, parse_bar_range(bars) if bars is not None else None,
                 temperature, top_k, no_repeat_ngram_size, seed, max_notes_per_tick, precision)
    new = walk.run()
    out = score.copy()
    if replace:
        out.tracks = [t.copy() for t in keep]
    out.tracks.append(_new_track(tok, new, program, score.tpq))
    return out


def _new_track(tok, base_ids: list[int], program: int, tpq: int) -> symusic.Track:
    """The notes of `program` in the walked stream, as a named track at the piece's resolution."""
    decoded = tok.decode(np.array(base_ids, dtype=np.int64))
    track = symusic.Track(name=program_name(program), program=max(program, 0), is_drum=program == -1)
    for t in decoded.tracks:
        if (-1 if t.is_drum else t.program) == program:
            n = t.notes.numpy()
            f = tpq / decoded.tpq
            track.notes = symusic.Note.from_numpy(
                np.round(n["time"] * f).astype(np.int32), np.maximum(np.round(n["duration"] * f), 1).astype(np.int32),
                n["pitch"], n["velocity"], "tick")
    return track


DRAFT_IDS = 48  # longest draft the walk hands the model in one call (see _Feeder)
DRAFT_GAIN, DRAFT_MIN = 2.0, 4  # a draft: this many times the ids the walk tends to follow, plus this


class _Feeder:
    """Runs the model over the ids of the walk with one rolling KV cache, speculatively.

    A call may carry a draft after the ids it must read: the ids the walk will read next if the piece goes
    on without a new note for a few ticks. Their logits are kept; while the ids the walk asks about are the
    draft's next ones, the answer comes from there without a model call. When the walk leaves the draft
    (it writes a note), the ring slots the rest of the draft overwrote are put back, so the cache holds the
    walk's own stream only. Past the model's positions it re-reads the last window at position 0."""

    def __init__(self, model, precision: str = "fp32"):
        self.model = prepare_for_decode(model, precision)  # the decode path generate() uses, built once
        self.max_pos = model_config(model).max_position_embeddings
        self.cache = RollingKVCache.for_model(self.model, 1)
        self.window = self.cache.window
        self.history: list[int] = []
        self.pos = 0
        self.draft: list[int] = []  # ids read speculatively after self.pos, and the logits after each
        self.draft_logits = self.last = None
        self.saved = None  # (first draft position, ring keys, values and positions of its slots before)
        self.followed = 4.0  # draft ids the walk followed, running mean: sizes the next draft
        self.calls = 0

    def feed(self, ids: list[int], draft=lambda limit: []) -> torch.Tensor:
        """Logits (V,) after the last of `ids`; `draft(limit)` gives up to `limit` ids expected next (called
        on a miss). Drafts are about twice as long as the walk tends to follow them: each id in a call costs
        a little, a call saved costs a lot."""
        n = len(ids)
        if n == 0:
            return self.last
        if ids == self.draft[:n]:  # the walk follows the draft: no model call
            self.last = self.draft_logits[n - 1]
            self.draft, self.draft_logits = self.draft[n:], self.draft_logits[n:]
            self._commit(ids)
            return self.last
        self._rollback()
        if self.pos + n > self.max_pos:  # restart the positions with the last window re-read
            tail = self.history[-(self.window - 1):] if self.window > 1 else []
            self.cache = RollingKVCache.for_model(self.model, 1)
            self.history, self.pos = [], 0
            ids, n = tail + ids, len(tail) + n
        # the draft shares the call's one chunk, so its slots are none of the slots the call's own ids fill
        room = min(self.window - n, self.max_pos - self.pos - n, DRAFT_IDS)
        spec = draft(min(int(DRAFT_GAIN * self.followed) + DRAFT_MIN, room))[:room] if room > 0 else []
        if spec:
            self._save(self.pos + n, len(spec))
        ids_all = ids + spec
        for s in range(0, len(ids_all), self.window):
            chunk = torch.tensor([ids_all[s:s + self.window]])
            logits = self.model(chunk, cache=self.cache, start_pos=self.pos + s)[0]
            self.calls += 1
        self.last = logits[len(logits) - len(spec) - 1]
        self.draft, self.draft_logits = spec, logits[len(logits) - len(spec):]
        self._commit(ids)
        return self.last

    def _commit(self, ids: list[int]) -> None:
        self.pos += len(ids)
        self.history += ids
        if len(self.history) > 4 * self.window:
            del self.history[:-self.window]

    def _save(self, first: int, n: int) -> None:
        slots = torch.arange(first, first + n) % self.window
        c = self.cache
        self.saved = (first, slots, c.k[:, :, :, slots].clone(), c.v[:, :, :, slots].clone(), c.pos[:, slots].clone())

    def _rollback(self) -> None:
        """Put back the ring slots of the draft positions the walk did not follow."""
        if self.saved is not None:
            first, slots, k, v, pos = self.saved
            c, keep = self.cache, self.pos - first
            self.followed = 0.8 * self.followed + 0.2 * keep
            if keep < len(slots):
                c.k[:, :, :, slots[keep:]] = k[:, :, :, keep:]
                c.v[:, :, :, slots[keep:]] = v[:, :, :, keep:]
                c.pos[:, slots[keep:]] = pos[:, keep:]
            c.n_seen = [self.pos] * len(c.n_seen)
        self.saved, self.draft, self.draft_logits = None, [], None


class _Node:
    __slots__ = ("kids", "leaf")

    def __init__(self):
        self.kids: dict[int, _Node] = {}
        self.leaf = None  # ("note", tick) after time tokens + Program, ("group",), ("end",)


class _Walk:
    """The accompaniment walk: existing groups of tokens (one per tick) forced, new notes sampled between."""

    def __init__(self, model, tok, context, program, bar_range, temperature, top_k, ngram, seed, max_per_tick,
                 precision="fp32"):
        self.model, self.tok, self.program, self.precision = model, tok, program, precision
        self.temperature, self.top_k, self.max_per_tick = temperature, top_k, max_per_tick
        self.fam = tok.family.tolist()
        self.prog_tok = tok.program_id[program]
        self.pitch_fam = DRUM if program == -1 else PITCH
        tpq, ts_list, tracks, _, _ = tok._preprocess(context)
        ids, ticks, _ = tok._encode(context)
        self.tpq, self.ts_list = tpq, ts_list
        self.groups = self._groups(ids.tolist(), ticks.tolist(), tracks)
        max_end = max(g[3] for g in self.groups)
        lines = tok._bar_ticks(ts_list, tpq, max_end + 16 * tpq * 4)
        self.t_end = int(lines[np.searchsorted(lines, max_end, side="left")])
        lo, hi = 0, self.t_end
        if bar_range is not None:
            a, b = bar_range
            lo = int(lines[a - 1]) if a - 1 < len(lines) else self.t_end
            hi = min(int(lines[b]) if b is not None and b < len(lines) else self.t_end, self.t_end)
        if lo >= self.t_end:
            n_bars = int(np.searchsorted(lines, self.t_end, side="left"))
            raise MidistralError(f"bars: {a}:{'' if b is None else b} starts after the piece's last bar ({n_bars})")
        self.lo, self.hi = lo, hi
        self.grid = _piece_grid([g[0] for g in self.groups if any(self.fam[x] == PROGRAM for x in g[2])], tpq)
        self.exp = [e.tolist() for e in id_expansions(tok)]
        by_first: dict[int, list[int]] = {}
        for i, e in enumerate(self.exp):
            if e:
                by_first.setdefault(e[0], []).append(i)
        self.by_first = by_first
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
        self.ngram_size = ngram

    def _groups(self, ids, ticks, tracks):
        """(tick, TimeSig change id or None, item ids, max end) per tick of the encoded piece, in order."""
        fam = self.fam
        change_ticks = {t for t, _, _ in self.ts_list}
        ends: dict[int, int] = {}
        for tr in tracks:
            for t, e in zip(tr["time"].tolist(), tr["end"].tolist()):
                ends[t] = max(ends.get(t, t), e)
        groups, cur = [], None
        for x, t in zip(ids, ticks):
            f = fam[x]
            if f in (BAR, POSITION, REST) or (f == TIMESIG and t not in change_ticks):
                continue
            if cur is None or cur[0] != t:
                cur = [t, None, [], max(ends.get(t, t), t)]
                groups.append(cur)
            if f == TIMESIG:
                cur[1] = x
            else:
                cur[2].append(x)
        return groups

    # -- the encoder's time tokens, on a copy of its clock

    def _group_tokens(self, st, g, prev_end: int) -> list[int]:
        """The tokens the encoder writes for group g (time tokens, meter change, items) after notes that
        sound until `prev_end`; advances `st`."""
        t, ts_tok, items, _ = g
        toks: list[int] = []
        if ts_tok is not None:
            st.advance(t, prev_end, True, toks, [])
            toks.append(ts_tok)
            n, d = self.tok.id_to_token[ts_tok].split("_")[1].split("/")
            st.change_ts(t, (t, int(n), int(d)))
            prev_end = max(prev_end, t)
        if items:
            st.advance(t, prev_end, False, toks, [])
            toks += items
        return toks

    def _trie(self) -> _Node | None:
        """The options (below), behind the tokens held back from the last forced run: the model may then pick
        an id that spans the end of the existing tokens and the start of its choice, as BPE does in training."""
        root, held, self.held = self._options(), self.held, []
        if root is None:
            self.base += held
            return None
        for x in reversed(held):
            node = _Node()
            node.kids[x] = root
            root = node
        return root

    def _options(self) -> _Node | None:
        """Every way on from the current tick: a note here, a note at a later tick before the next existing
        group (its time tokens, then Program), or the next group itself; None when the walk is over."""
        root = _Node()
        t, nxt = self.t_cur, self.gi + 1
        t_next = self.groups[nxt][0] if nxt < len(self.groups) else self.t_end
        if self.lo <= t < self.hi and len(self.here) < self.max_per_tick:
            self._add(root, [self.prog_tok], ("note", t))
        stop = min(t_next, self.hi, t + self.st.bar_len + 1)
        step = max(self.grid, self.st.tpp)
        for t2 in range(-(-max(t + 1, self.lo) // step) * step, stop, step):
            st = copy.copy(self.st)
            toks: list[int] = []
            st.advance(t2, self.prev_end, False, toks, [])
            self._add(root, toks + [self.prog_tok], ("note", t2))
        if nxt < len(self.groups):
            if t_next >= self.hi and not root.kids:
                return None
            toks = self._group_tokens(copy.copy(self.st), self.groups[nxt], self.prev_end)
            self._add(root, toks, ("group",) if t_next < self.hi else ("stop",))
        elif self.tok.eos_id is not None and root.kids:
            self._add(root, [self.tok.eos_id], ("end",))
        else:
            return None
        return root

    @staticmethod
    def _add(root: _Node, toks: list[int], leaf) -> None:
        node = root
        for x in toks:
            node = node.kids.setdefault(x, _Node())
        node.leaf = leaf

    # -- ids the model may choose, and what they do

    def _consume(self, node: _Node, k: int, expansion: list[int]):
        """Follow `expansion` from a trie node (k = -1) or from inside a note (k = 0 Pitch, 1 Velocity,
        2 Duration): (node, k, leaf passed, note finished), or None if the id does not fit."""
        leaf, fam = None, self.fam
        for x in expansion:
            if k < 0:
                if node.leaf is not None:  # nothing follows a group, the end, or a stop inside one id
                    return None
                node = node.kids.get(x)
                if node is None:
                    return None
                if node.leaf is not None:
                    leaf = node.leaf
                    if leaf[0] == "note":
                        k = 0
            elif k == 3:
                return None
            else:
                want = (self.pitch_fam, VELOCITY, DURATION)[k]
                if fam[x] != want or (k == 0 and x in self.here):
                    return None
                k += 1
        return node, k, leaf

    def _allowed(self, node: _Node, k: int) -> list[int]:
        if k >= 0:  # inside a note the answer depends only on k and the pitches already at this tick
            key = (k, frozenset(self.here) if k == 0 else None)
            if key not in self.note_allowed:
                self.note_allowed[key] = [i for f in self.first_of[k] for i in self.by_first.get(f, ())
                                          if self._consume(node, k, self.exp[i]) is not None]
            return self.note_allowed[key]
        return [i for f in node.kids for i in self.by_first.get(f, ())
                if self._consume(node, k, self.exp[i]) is not None]

    def _forced_ids(self, toks: list[int]) -> list[int]:
        """BPE ids for forced base tokens: split at bar lines (a bar starts a BPE word, with its "▁")."""
        if self.tok.bpe is None or not toks:
            return list(toks)
        cuts = [i for i, x in enumerate(toks) if self.fam[x] == BAR or self.fam[x] == 0] + [len(toks)]
        cuts = sorted(set([0] + cuts))
        out: list[int] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = toks[a:b]
            if self.fam[seg[0]] == 0:  # special tokens are never merged
                out.append(seg[0])
                seg = seg[1:]
                if not seg:
                    continue
            s = "".join(chr(x + CHR_OFFSET) for x in seg)
            if self.fam[seg[0]] == BAR:
                s = METASPACE + s
            out += [t.id for t in self.tok.bpe.hf.model.tokenize(s)]
        return out

    # -- the walk

    @torch.inference_mode()
    def run(self) -> list[int]:
        """Walk the piece; returns the base ids of the whole stream (existing and new notes)."""
        tok = self.tok
        fam_ids = {f: [i for i in range(len(tok.vocab)) if self.fam[i] == f] for f in (self.pitch_fam, VELOCITY, DURATION)}
        self.first_of = [fam_ids[self.pitch_fam], fam_ids[VELOCITY], fam_ids[DURATION]]
        self.st = _TimeState(tok, self.tpq, self.ts_list[0])
        self.prev_end, self.gi, self.here = 0, 0, set()
        bos = [tok.bos_id] if tok.bos_id is not None else []
        first = self._group_tokens(self.st, self.groups[0], self.prev_end)
        self.prev_end = max(self.prev_end, self.groups[0][3])
        self.t_cur = self.groups[0][0]
        self.base, self.pending, self.held = [], [], []
        self._force(bos + first, hold=True)
        self.feeder = _Feeder(self.model, self.precision)
        self.ngram = NoRepeatNGram(self.ngram_size, torch.tensor([[0]])) if self.ngram_size else None
        self.n_sampled = 0
        self.note_allowed: dict = {}
        node = self._trie()
        while node is not None:
            node = self._advance(node)
        return self.base

    def _advance(self, node: _Node) -> _Node | None:
        """From the start of a decision (a fresh trie), sample until its leaf is reached and a note (if any)
        is complete; returns the next trie or None at the end."""
        k, leaf = -1, None
        while True:
            if k < 0 and leaf is None and _n_leaves(node) == 1:  # one way on: force it
                toks, leaf = _only_path(node)
                self._force(toks, hold=leaf[0] == "group")
                if leaf[0] == "note":
                    k = 0
                node = None
            else:
                i = self._sample(node, k)
                node, k, passed = self._consume(node, k, self.exp[i])
                self.base += self.exp[i]
                self.pending.append(i)
                leaf = leaf or passed
            if leaf is not None and leaf[0] == "note" and leaf[1] != self.t_cur:
                self.st.advance(leaf[1], self.prev_end, False, [], [])
                self.t_cur, self.here = leaf[1], set()
                leaf = ("note", self.t_cur)
            if leaf is not None and leaf[0] != "note":
                return self._after(leaf)
            if k == 3:
                return self._note_done()

    def _sample(self, node: _Node, k: int) -> int:
        """One of the ids the walk allows here, drawn from the model's logits over just those (the n-gram
        ban applies unless it would leave none), with the walk's temperature and top-k."""
        logits = self._logits(node, k)
        allowed = self._allowed(node, k)
        if self.ngram is not None:
            banned = set(self.ngram.banned()[1])
            allowed = [i for i in allowed if i not in banned] or allowed
        choice = sample_next(logits[allowed][None].float(), self.temperature, self.top_k, None, self.generator)
        self.n_sampled += 1
        return allowed[int(choice[0])]

    def _force(self, toks: list[int], hold: bool) -> None:
        """Forced base tokens: to the stream as BPE ids; with `hold`, the last id's tokens wait for the next
        choice (so the model may continue them with an id merged across the boundary)."""
        ids = self._forced_ids(toks)
        if hold and ids and self.fam[self.exp[ids[-1]][0]] != 0:
            self.held = self.exp[ids[-1]]
            ids, toks = ids[:-1], toks[:len(toks) - len(self.held)]
        self.base += toks
        self.pending += ids

    def _logits(self, node: _Node, k: int) -> torch.Tensor:
        ids, self.pending = self.pending, []
        if self.ngram is not None:
            for x in ids:
                self.ngram.push([x])
        return self.feeder.feed(ids, lambda limit: self._draft(node, limit) if k < 0 else [])

    def _draft(self, node: _Node, limit: int) -> list[int]:
        """The ids the walk reads next if the piece goes on without a new note for a few ticks (whole ticks,
        at least one, up to about `limit` ids): from `node` the way to the next group, then the groups
        after it, segmented as the walk segments forced runs (the last id of each held back for the next
        choice: the walk asks the model at the end of each tick)."""
        path = _group_path(node)
        if path is None:
            return []
        st, prev_end, out, j = copy.copy(self.st), self.prev_end, [], self.gi + 1
        while True:
            ids = self._forced_ids(path)
            if out and len(out) + len(ids) - 1 > limit:
                return out
            out += ids[:-1]
            g = self.groups[j]
            self._group_tokens(st, g, prev_end)
            prev_end, j = max(prev_end, g[3]), j + 1
            if j >= len(self.groups) or self.groups[j][0] >= self.hi:
                return out
            path = self.exp[ids[-1]] + self._group_tokens(copy.copy(st), self.groups[j], prev_end)

    def _after(self, leaf) -> _Node | None:
        if leaf[0] != "group":
            return None
        self.gi += 1
        g = self.groups[self.gi]
        self._group_tokens(self.st, g, self.prev_end)
        self.prev_end = max(self.prev_end, g[3])
        self.t_cur, self.here = g[0], set()
        return self._trie()

    def _note_done(self) -> _Node | None:
        """The note just written (Pitch, Velocity, Duration at the end of the stream) joins the piece."""
        pitch, dur = self.base[-3], self.base[-1]
        self.here.add(pitch)
        ticks = self.tok._duration_ticks(self.st.tpb)[dur - self.tok.dur0]
        self.prev_end = max(self.prev_end, self.t_cur + int(ticks))
        return self._trie()


def _piece_grid(onsets: list[int], tpq: int, share: float = 0.9) -> int:
    """The coarsest rhythmic grid (in ticks: eighths, triplet eighths, sixteenths, ...) that holds `share`
    of the piece's onsets: new notes start on it, so the new part moves in the piece's own rhythm."""
    ons = np.asarray(onsets, dtype=np.int64)
    for step in (tpq // 2, tpq // 3, tpq // 4, tpq // 6, tpq // 8, tpq // 12):
        if step >= 1 and len(ons) and np.mean(ons % step == 0) >= share:
            return int(step)
    return 1


def _group_path(node: _Node) -> list[int] | None:
    """The tokens from `node` to the next existing group, None if that is not a way on from here."""
    for x, kid in node.kids.items():
        if kid.leaf is not None:
            if kid.leaf[0] == "group":
                return [x]
        else:
            rest = _group_path(kid)
            if rest is not None:
                return [x] + rest
    return None


def _n_leaves(node: _Node) -> int:
    return (node.leaf is not None) + sum(_n_leaves(c) for c in node.kids.values())


def _only_path(node: _Node):
    toks = []
    while node.leaf is None:
        (x, node), = node.kids.items()
        toks.append(x)
    return toks, node.leaf
