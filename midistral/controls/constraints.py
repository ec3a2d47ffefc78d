"""Constraints for generate(): which instruments play (`ProgramsConstraint`), that each of them plays in
every bar (`EveryBarConstraint`) and how many bars (`BarsConstraint`).

    cons = [GrammarConstraint(tok), ProgramsConstraint(tok, [0, 33, -1]), BarsConstraint(tok, 8)]
    ids = generate(model, prompt, max_new_tokens=bars_token_budget(model, prompt.shape[1]),
                   eos_id=tok.eos_id, constraints=cons)           # stops at the bar line after 8 new bars

They follow generate's protocol (start / mask / push, see midistral.generate) and work on BPE ids: each id
stands for a fixed sequence of base tokens (its expansion), precomputed once per tokenizer.
"""

from __future__ import annotations

import numpy as np
import torch

from midistral.errors import MidistralError
from midistral.controls.masks import ban_unless_nothing_left
from midistral.general_midi import parse_program
from midistral.model.cache import model_config
from midistral.tokenize.clock import BarClock
from midistral.tokenize.grammar import expansions
from midistral.tokenize.remi import Family

# the token families as plain ints (cheaper to compare in the per-token loops)
SPECIAL, BAR, POSITION, PITCH, DRUM, VELOCITY, DURATION, PROGRAM, TEMPO, TIMESIG, REST = (int(f) for f in (
    Family.SPECIAL, Family.BAR, Family.POSITION, Family.PITCH, Family.PITCH_DRUM, Family.VELOCITY, Family.DURATION,
    Family.PROGRAM, Family.TEMPO, Family.TIME_SIG, Family.REST))

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
        prog_of[list(tok.program_of)] = list(tok.program_of.values())
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


class TickTables:
    """Per tokenizer and time resolution: token families, meters of TimeSig ids, tick tables per beat length."""

    def __init__(self, tok, tpq: int):
        self.tok, self.tpq = tok, tpq
        self.fam = tok.family.tolist()
        self.meter = {i: ts for ts, i in tok.ts_id.items()}
        self.dur0, self.rest0, self.pos0 = tok.dur0, tok.rest0, tok.pos0
        self.durs: dict[int, list[int]] = {}
        self.rests: dict[int, list[int]] = {}

    def at(self, tpb: int) -> tuple[list[int], list[int]]:
        """Duration and Rest ticks at `tpb` ticks per beat."""
        if tpb not in self.durs:
            self.durs[tpb] = self.tok.duration_ticks(tpb).tolist()
            self.rests[tpb] = self.tok.rest_ticks(tpb).tolist()
        return self.durs[tpb], self.rests[tpb]


class StreamClock(BarClock):
    """The bar clock fed one base token at a time as the decoder reads them, so that a constraint knows
    which bar the decoded piece is in: Bar tokens, rests that cross bar lines, meter changes."""

    def __init__(self, tables: TickTables, meter=(4, 4)):
        self.t = tables
        super().__init__(tables.tpq, tables.tok.max_res, meter)
        self.fam1 = self.fam2 = 0  # families of the two previous tokens (a note is Pitch Velocity Duration)
        self.note_in_bar = False
        self.seen_ts = self.seen_note = False
        self.history: tuple = ()  # base tokens before the first TimeSig (it may set the initial meter)

    def set_meter(self, num: int, den: int) -> None:
        super().set_meter(num, den)
        self.durs, self.rests = self.t.at(self.tpb)

    def copy(self) -> "StreamClock":
        c = StreamClock.__new__(StreamClock)
        c.__dict__.update(self.__dict__)
        return c

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
            self.note(self.durs[t - self.t.dur0])
            self.note_in_bar = True
        elif f == BAR:
            self.bar()
            self.note_in_bar = False
        elif f == REST:
            before = self.cur_bar
            self.rest(self.rests[t - self.t.rest0])
            if self.cur_bar > before:
                self.note_in_bar = False
        elif f == POSITION:
            self.position(t - self.t.pos0)
        elif f == TEMPO:
            self.tempo()
        elif f == TIMESIG:
            self._timesig(t)
        return note

    def _timesig(self, t: int) -> None:
        meter = self.t.meter[t]
        if not self.seen_ts and not self.seen_note:  # the decoder's initial meter: replay with it
            fresh = StreamClock(self.t, meter)
            for x in self.history[:-1]:
                fresh.feed(x)
            self.__dict__.update(fresh.__dict__)
        else:
            self.meter(*meter)
        self.seen_ts = True

    def key(self):
        """The state that decides how the next tokens move through bars (for caching)."""
        if self.cur_bar == -1:  # before the first bar the clock sits at tick 0
            return (-1, self.prev_end, self.num, self.den, self.fam1, self.fam2)
        return (self.cur_tick - self.tick_bar, max(self.prev_end, self.cur_tick) - self.tick_bar, self.num,
                self.den, self.fam1, self.fam2, self.note_in_bar)


OK, CLOSES, FORBIDDEN, ENDS = 0, 1, 2, 3  # ENDS: closes the last bar, then writes past it (BarsConstraint.mask)


class BarsConstraint:
    """Exactly `n_bars` new bars: EOS is masked until the n-th new bar holds a note, and the token that reaches the
    bar line after it (a Bar, or a rest crossing it) is the last one: EOS is forced next. Bars are counted as the
    decoder counts them: Bar tokens and bar lines crossed by Rest tokens (which get no Bar token), through meter
    changes, inside BPE ids. A new bar is one the clock enters after the prompt (the bar the prompt ends in is not
    new). An id that would skip the last bar, leave it empty, or put a note past it is masked, so the decoded
    continuation spans exactly n_bars bars: its last note starts in the n-th; an id that closes the n-th bar and
    goes on past it (a BPE Bar id with the next bar's notes) gives its probability to EOS, else it went to more
    notes of the last bar (docs/controls.md). A piece must open with [Bar] TimeSig and a TimeSig must follow a Bar
    (as in every encoded piece: a meter change mid-bar would move notes already written). Meters with a larger
    denominator than the prompt's (a /8 after /4 only) are masked: they would change the decoder's time resolution
    for the whole piece. Where no bar may start (the n-th bar has no note yet), what only leads to a bar is masked
    too: the bar attribute ACBarNoteDensity (the grammar wants a Bar after the three attributes) and a lone BPE "▁";
    else the row could only write "▁" until the token budget ran out, and end on an empty n-th bar. Pass it after
    the grammar constraint (it reads the mask the grammar left): when it forces EOS it overrides the other masks.
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
        # ids that only lead to a bar: the bar attributes before it and a lone BPE word start "▁" (expansion
        # empty); the bar must be allowed once they are written, else nothing is (grammar: attributes -> Bar)
        self._starts_bar = torch.tensor([len(f) > 0 and f[0] == BAR for f in fams])
        extra = tok.extra
        leads = [len(e) == 0 and i < tok.music_size for i, e in enumerate(self.exp)]
        if extra is not None:
            for t, i in extra.id.items():
                leads[i] = t.startswith("ACBarNoteDensity")
        self._leads_to_bar = torch.tensor(leads)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.rows = []
        for row in prompt_ids.tolist():
            clock, max_den = stream_clock(self.tok, self.tok.base_ids(row).tolist())
            tables = clock.t
            min_bar = min(n * (tables.tpq * 4 // d) for n, d in self.tok.time_sigs if d <= max_den)
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

    def _simulate(self, clock: StreamClock, expansion: list[int], start: int) -> int:
        c, closed = clock.copy(), False
        for x in expansion:
            before, had_note = c.cur_bar - start, c.note_in_bar
            note = c.feed(x)
            after = c.cur_bar - start
            closed |= after == self.n + 1 and before == self.n and had_note  # the last bar closed properly
            bad = after > self.n + 1 or (after == self.n + 1 and (before != self.n or not had_note))
            if bad or (note and (after > self.n or c.cur_bar == -1)):
                return ENDS if closed else FORBIDDEN
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
            clock, status = row["clock"], self._status(row)
            ends, e = torch.from_numpy(status == ENDS).to(logits.device), self._eos
            if e is not None and bool(ends.any()) and not bool(torch.isinf(logits[r, e])):  # EOS not banned before
                logits[r, e] = torch.logsumexp(torch.cat([logits[r, e, None], logits[r, :len(ends)][ends]]), 0)
            bad = row["banned"] | torch.from_numpy(status >= FORBIDDEN)
            if clock.seen_ts or clock.seen_note:
                bad |= self._ts_inside_bad | (self._ts_first if clock.fam1 != BAR else False)
            logits[r].masked_fill_(bad.to(logits.device), float("-inf"))
            if self._eos is not None and not (clock.cur_bar - row["start"] == self.n and clock.note_in_bar):
                logits[r, self._eos] = float("-inf")
            starts = self._starts_bar.to(logits.device)
            if bool(torch.isinf(logits[r, :len(starts)][starts]).all()):  # no bar may start: nor what leads to one
                logits[r, :len(starts)].masked_fill_(self._leads_to_bar.to(logits.device), float("-inf"))

    def push(self, tokens: torch.Tensor) -> None:
        for row, t in zip(self.rows, tokens.tolist()):
            if row["finished"] or row["done"] or t == self._eos:
                row["finished"] = row["finished"] or t == self._eos
                continue
            if 0 <= t < len(self.exp):
                for x in self.exp[t]:
                    row["clock"].feed(x)
            row["done"] = row["clock"].cur_bar - row["start"] > self.n


def stream_clock(tok, base: list[int]) -> tuple[StreamClock, int]:
    """The clock after the base ids `base` (at the resolution of their largest meter denominator), and that
    denominator."""
    present = set(base)
    max_den = max([d for (_, d), i in tok.ts_id.items() if i in present] or [4])
    clock = StreamClock(TickTables(tok, tok.max_res * max_den // 4))
    for x in base:
        clock.feed(x)
    return clock, max_den


class EveryBarConstraint:
    """Each of `programs` plays in every new bar: while one has not started a note in the current bar, the bar
    may not close (ids holding a Bar token, the bar attributes that lead to one, EOS are masked), and when the
    model would close it anyway (its best id closes the bar) it may only start a note of a missing instrument or
    move on to a later Position. Rests are masked with the bar lines (one may cross a line: the decoder then
    writes no Bar token); Positions still move on, so the bar fills in time order. Ids that would skip a whole
    bar (cross two bar lines) are masked throughout. Bars are read on the decoder's clock, from the first bar
    line of the continuation (the bar the prompt ends in is the prompt's, unless it holds no note yet). Where
    these masks would leave a row nothing (another constraint forces the bar line), the row keeps the others'
    mask: the count is then reported, not forced.

    Pass it after ProgramsConstraint and BarsConstraint: it only narrows what they allow.
    """

    def __init__(self, tok, programs):
        self.required = frozenset(parse_program(p, "programs") for p in programs)
        mat, lens = _expansion_matrix(tok)
        fam = _family_matrix(tok, mat)
        closes = ((fam == BAR) | (fam == REST)).any(1)  # a bar ends at a Bar token or a rest across its line
        if tok.extra is not None:
            for t, i in tok.extra.id.items():
                closes[i] |= t.startswith("ACBar")
        self._ends = {i for i in (tok.eos_id, tok.extra and tok.extra.fill_end_id) if i is not None}  # EOS, infill end
        closes[list(self._ends)] = True
        self._closes = torch.from_numpy(closes)
        # the notes an id starts, plus one if it ends on a Position or Program (a note must follow)
        last = fam[np.arange(len(fam)), np.maximum(lens - 1, 0)]
        self._note_load = torch.from_numpy(((fam == PITCH) | (fam == DRUM)).sum(1) + np.isin(last, [POSITION, PROGRAM]))
        self._moving = np.flatnonzero(((fam == BAR) | (fam == REST)).any(1)).tolist()
        self._skip_cache: dict = {}
        prog_of = np.full(len(tok.vocab), -99, dtype=np.int64)
        prog_of[list(tok.program_of)] = list(tok.program_of.values())
        self._prog = np.where(fam == PROGRAM, prog_of[np.maximum(mat, 0)], -99)  # program per slot, -99 none
        self._prog_of = prog_of.tolist()
        self._first_fam = fam[:, 0]
        self.exp = [e.tolist() for e in id_expansions(tok)]
        self._other_programs: dict[frozenset, torch.Tensor] = {}
        self.tok = tok

    def _not_missing(self, missing: frozenset) -> torch.Tensor:
        """Ids that neither start a note of a missing instrument nor only move on to a later Position (then
        free of other instruments' notes): what a bar that the model would close may not write."""
        if missing not in self._other_programs:
            other = ((self._prog != -99) & ~np.isin(self._prog, list(missing))).any(1)
            ok = (self._first_fam == POSITION) & ~other | np.isin(self._prog[:, 0], list(missing))
            self._other_programs[missing] = torch.from_numpy(~ok)
        return self._other_programs[missing]

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.clocks, self.armed, self.played, self.done, self.program = [], [], [], [], []
        for row in prompt_ids.tolist():
            base = self.tok.base_ids(row).tolist()
            clock = stream_clock(self.tok, base)[0]
            self.program.append(next((self._prog_of[x] for x in reversed(base) if self._prog_of[x] != -99), 0))
            self.clocks.append(clock)
            self.armed.append(clock.cur_bar >= 0 and not clock.note_in_bar)  # a bar the prompt opened, empty
            self.played.append(set()), self.done.append(False)
        self.notes = [set() for _ in self.clocks]  # (tick, program, pitch) of the notes started in each row's bar

    def missing(self, r: int) -> frozenset:
        return self.required - self.played[r] if self.armed[r] and not self.done[r] else frozenset()

    @property
    def active(self) -> bool:
        return bool(self.required)

    def unfinished(self, r: int) -> bool:
        """The current bar may not close yet (subclasses add conditions)."""
        return bool(self.missing(r))

    def room(self, r: int) -> int | None:
        """The notes the current bar may still start (DensityConstraint); None: no limit."""
        return None

    def _skips_a_bar(self, clock: StreamClock) -> torch.Tensor:
        """Ids that would cross two bar lines from here (a long rest, or a note's end and a rest): the
        bar between would be empty."""
        key = clock.key()
        if key not in self._skip_cache:
            bad = torch.zeros(len(self.exp), dtype=torch.bool)
            for i in self._moving:
                c = clock.copy()
                for x in self.exp[i]:
                    c.feed(x)
                    if c.cur_bar - clock.cur_bar >= 2:
                        bad[i] = True
                        break
            self._skip_cache[key] = bad
        return self._skip_cache[key]

    def mask(self, logits: torch.Tensor) -> None:
        for r in range(logits.shape[0]):
            if self.done[r] or not self.active:
                continue
            row, missing = logits[r], self.missing(r)
            ban = self._skips_a_bar(self.clocks[r]).to(row.device)
            if self.unfinished(r):
                ban = ban | self._closes.to(row.device)
                if missing and bool(self._closes[int(row.argmax())]):  # it would close the bar: a missing one next
                    ban = ban | self._not_missing(missing).to(row.device)
            room = self.room(r)
            if room is not None:
                ban = ban | (self._note_load > room).to(row.device)
            ban_unless_nothing_left(row, ban)

    def push(self, tokens: torch.Tensor) -> None:
        for r, t in enumerate(tokens.tolist()):
            if t in self._ends:
                self.done[r] = True
            clock = self.clocks[r]
            for x in self.exp[t] if 0 <= t < len(self.exp) else ():
                bar = clock.cur_bar
                if clock.feed(x):  # a note completed: its program played (a Program token alone is no note)
                    self.played[r].add(self.program[r])
                if clock.cur_bar != bar:
                    self.armed[r], self.played[r], self.notes[r] = True, set(), set()
                if clock.fam1 in (PITCH, DRUM):  # a note doubled at its onset is one note (music.merge_doubled_notes)
                    self.notes[r].add((clock.cur_tick, self.program[r], x))
                if self._prog_of[x] != -99:
                    self.program[r] = self._prog_of[x]


def _early_ok(fams: list[int], had_bar: bool) -> bool:
    """Before the first TimeSig: at most one Bar, then the TimeSig (as the encoder opens every piece)."""
    for f in fams:
        if f == TIMESIG:
            return True
        if f == BAR and not had_bar:
            had_bar = True
        elif f != SPECIAL:
            return False
    return True


def bars_token_budget(model, prompt_len: int) -> int:
    """max_new_tokens for a BarsConstraint run: all the room the model's positions leave after the prompt.
    Generation ends when the constraint forces EOS; `BarsConstraint.complete` says if the room ran out."""
    return max(model_config(model).max_position_embeddings - int(prompt_len), 1)

