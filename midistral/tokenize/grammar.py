"""The REMIPlus grammar as a state machine: what may come next, and a sampling constraint built on it.

The state is the kind of the last base token (Program split by instrument kind), plus two numbers: the
last Position of the current bar (the next must be larger) and the current meter's numerator (a
Position must fall inside the bar). What may follow each state (docs/grammar.md has it as a table):

    START (nothing, BOS, PAD)  -> Bar
    Bar                        -> TimeSig
    TimeSig                    -> Position | Bar | Rest | EOS
    Position                   -> Program | Tempo
    Tempo                      -> Program | Position | Bar | Rest | EOS
    Program (pitched)          -> Pitch | Chord
    Program_-1 (drums)         -> PitchDrum
    Chord                      -> Program
    Pitch, PitchDrum           -> Velocity
    Velocity                   -> Duration
    Duration                   -> Program | Position | Bar | Rest | EOS
    Rest                       -> Rest | Bar | Position | TimeSig | EOS
    END (after EOS)            -> anything (the generator pads the row)

Bar and Rest reset the last Position (a Rest may cross bar lines without a Bar token: MidiTok's
`tokens_errors` does not check the Position after a Rest either). EOS may come wherever a Bar may: after
a complete event. This is the language our encoder writes (every real file passes, tests/test_grammar.py),
and everything in it decodes with nothing skipped and no MidiTok `tokens_errors`.

Extra tokens (tokenize/extra.py) add kinds and three modes. Style comes first; the track attributes
(four, in MidiTok's order) after it; the bar attributes (three) right before a Bar. Fill-in-the-middle:
`Infill_Bar` (a hole, k in a row) where a Bar may come, the prefix-and-suffix context then closes with
`FillBar_Start` where a Bar may come, the middle must start with a Bar (or its attributes) and ends with
`FillBar_End` where EOS could. The mode (plain, context after a hole, middle after FillBar_Start) is
part of the state's first number (mode x number of kinds + kind): a plain piece never opens a hole
(the caller builds the FIM prompt), a context never ends with EOS, a middle only with FillBar_End.

BPE: each id expands to a fixed base sequence (`expansions`). An id is legal in a state iff its first
base token may follow the state, its own inner transitions are legal, its first Position (before any
Bar or Rest) is above the state's last Position, and its Positions before any TimeSig fit the state's
meter. Everything but the two numbers is precomputed as a (states x vocabulary) boolean table; the mask
of a full state is then one table row and two comparisons over the vocabulary (no Python loop over it),
built the first time the state is met and kept, so a sampling step is a lookup and one masked_fill.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from midistral.tokenize.remi import REMI, Family


class State(IntEnum):
    """The kind of the last base token: the grammar's state (with the bar's last Position and the meter)."""

    START = 0
    BAR = 1
    TIME_SIG = 2
    POSITION = 3
    TEMPO = 4
    PROGRAM = 5
    PROGRAM_DRUMS = 6
    CHORD = 7
    PITCH = 8  # Pitch or PitchDrum
    VELOCITY = 9
    DURATION = 10
    REST = 11
    END = 12  # EOS (or FillBar_End) was emitted
    STYLE = 13
    TRACK_AC0 = 14  # the four track attributes, in order
    TRACK_AC1 = 15
    TRACK_AC2 = 16
    TRACK_AC3 = 17
    BAR_AC0 = 18  # the three bar attributes, in order, before a Bar
    BAR_AC1 = 19
    BAR_AC2 = 20
    HOLE = 21  # Infill_Bar
    FILL_START = 22  # FillBar_Start


class Mode(IntEnum):
    """Where a fill-in-the-middle sequence is: the state's first number is mode * len(State) + kind."""

    PLAIN = 0
    CONTEXT = 1  # after a hole: prefix, holes, suffix
    MIDDLE = 2  # after FillBar_Start


# The kind of token that may come next, per state; a token's kind is the State it leads to, plus EOS
# and FILL_END (both lead to END).
EOS = len(State)
FILL_END = len(State) + 1
_BAR_NEXT = {State.BAR, State.BAR_AC0, State.HOLE, State.FILL_START}  # where a bar may start
FOLLOWS = {
    State.START: {State.BAR, State.STYLE, State.TRACK_AC0, State.BAR_AC0, State.HOLE},
    State.STYLE: {State.BAR, State.TRACK_AC0, State.BAR_AC0, State.HOLE},
    State.TRACK_AC0: {State.TRACK_AC1}, State.TRACK_AC1: {State.TRACK_AC2}, State.TRACK_AC2: {State.TRACK_AC3},
    State.TRACK_AC3: {State.BAR, State.BAR_AC0, State.HOLE},
    State.BAR_AC0: {State.BAR_AC1}, State.BAR_AC1: {State.BAR_AC2}, State.BAR_AC2: {State.BAR},
    State.HOLE: {State.HOLE, State.BAR, State.BAR_AC0, State.FILL_START},
    State.FILL_START: {State.BAR, State.BAR_AC0},
    State.BAR: {State.TIME_SIG},
    State.TIME_SIG: {State.POSITION, *_BAR_NEXT, State.REST, EOS, FILL_END},
    State.POSITION: {State.PROGRAM, State.PROGRAM_DRUMS, State.TEMPO},
    State.TEMPO: {State.PROGRAM, State.PROGRAM_DRUMS, State.POSITION, *_BAR_NEXT, State.REST, EOS, FILL_END},
    State.PROGRAM: {State.PITCH, State.CHORD},
    State.PROGRAM_DRUMS: {State.PITCH},
    State.CHORD: {State.PROGRAM, State.PROGRAM_DRUMS},
    State.PITCH: {State.VELOCITY},
    State.VELOCITY: {State.DURATION},
    State.DURATION: {State.PROGRAM, State.PROGRAM_DRUMS, State.POSITION, *_BAR_NEXT, State.REST, EOS, FILL_END},
    State.REST: {State.REST, *_BAR_NEXT, State.POSITION, State.TIME_SIG, EOS, FILL_END},
}
# What each mode forbids (kinds of tokens); a hole may only follow a hole once the context has begun.
MODE_FORBIDS = {
    Mode.PLAIN: {State.HOLE, State.FILL_START, FILL_END},
    Mode.CONTEXT: {EOS, FILL_END, State.STYLE, State.TRACK_AC0, State.HOLE},  # (a hole may follow a hole)
    Mode.MIDDLE: {EOS, State.HOLE, State.FILL_START, State.STYLE, State.TRACK_AC0},
}
_EXTRA_KIND = {"Style": State.STYLE, "Infill_Bar": State.HOLE, "FillBar_Start": State.FILL_START,
               "FillBar_End": FILL_END,
               "ACTrackNoteDensityMin": State.TRACK_AC0, "ACTrackNoteDensityMax": State.TRACK_AC1,
               "ACTrackOnsetPolyphonyMin": State.TRACK_AC2, "ACTrackOnsetPolyphonyMax": State.TRACK_AC3,
               "ACBarNoteDensity": State.BAR_AC0, "ACBarOnsetPolyphonyMin": State.BAR_AC1,
               "ACBarOnsetPolyphonyMax": State.BAR_AC2}
NK = len(State)
# States where the piece is complete (every note closed): EOS may come, and a cut there skips nothing.
COMPLETE = {s for s, nxt in FOLLOWS.items() if EOS in nxt} | {State.END}

NO_POSITION = -2  # the last Position of the bar is unknown/unchanged ...
FREE = 1 << 30  # ... or an id has no Position that the state constrains

_STATE_OF_FAMILY = {Family.BAR: State.BAR, Family.TIME_SIG: State.TIME_SIG, Family.POSITION: State.POSITION,
                    Family.TEMPO: State.TEMPO, Family.PROGRAM: State.PROGRAM, Family.CHORD: State.CHORD,
                    Family.PITCH: State.PITCH, Family.PITCH_DRUM: State.PITCH, Family.VELOCITY: State.VELOCITY,
                    Family.DURATION: State.DURATION, Family.REST: State.REST}


def expansions(tok: REMI) -> list[np.ndarray]:
    """The base-token ids each model id stands for (itself without BPE; a lone BPE "▁" stands for none;
    the extra tokens after the vocabulary stand for no base token)."""
    if tok.bpe is None:
        exps = [np.array([i], dtype=np.int64) for i in range(len(tok.vocab))]
    else:
        exps = tok.bpe.expansions()
    return exps + [np.zeros(0, dtype=np.int64)] * (len(tok) - tok.music_size)


def _extended_expansions(tok: REMI) -> list[np.ndarray]:
    """As `expansions`, but extra token j stands for the pseudo base token len(tok.vocab) + j."""
    exps = expansions(tok)[:tok.music_size]
    nb = len(tok.vocab)
    return exps + [np.array([nb + j], dtype=np.int64) for j in range(len(tok) - tok.music_size)]


class Grammar:
    """The state machine's tables for one tokenizer (base tokens, then every model id through its expansion)."""

    def __init__(self, tok: REMI, holes: bool = False):
        """`holes`: a plain piece may open a hole (Infill_Bar); off, only a prompt the caller builds does."""
        self.tok, self.holes = tok, holes
        self.eos_id = tok.eos_id
        self.fill_end_id = tok.extra.fill_end_id if tok.extra is not None else None
        self._base_tables(tok)
        self._id_tables(_extended_expansions(tok))

    def _base_tables(self, tok: REMI) -> None:
        nb = len(tok.vocab)
        extras = tok.extra.tokens if tok.extra is not None else []
        n = nb + len(extras)  # base tokens, then one pseudo base token per extra token
        fam = np.r_[tok.family, np.full(len(extras), Family.SPECIAL, dtype=tok.family.dtype)]
        kind = np.full(n, -1, dtype=np.int64)  # what a base token is, in FOLLOWS' terms (-1: never legal)
        after = np.full(n, State.START, dtype=np.int64)  # the state after it
        for f, s in _STATE_OF_FAMILY.items():
            kind[fam == f] = s
            after[fam == f] = s
        drums = tok.program_id.get(-1)
        if drums is not None:
            kind[drums] = after[drums] = State.PROGRAM_DRUMS
        if self.eos_id is not None:
            kind[self.eos_id], after[self.eos_id] = EOS, State.END
        for j, t in enumerate(extras):
            k = _EXTRA_KIND.get(t.split("_", 1)[0] if t.split("_", 1)[0] in _EXTRA_KIND else t, -1)
            kind[nb + j] = k
            after[nb + j] = State.END if k == FILL_END else max(k, State.START)
        self.base_fam, self.base_kind = fam, kind
        self.base_after = after
        self.base_position = np.where(fam == Family.POSITION, np.arange(n) - tok.pos0, -1)
        self.base_numerator = np.zeros(n, dtype=np.int64)
        for (num, _), i in tok.ts_id.items():
            self.base_numerator[i] = num
        # follows[s, b]: base token b may come in state s
        follows = np.zeros((len(State), n), dtype=bool)
        for s, nxt in FOLLOWS.items():
            follows[s] = np.isin(kind, list(nxt))
        # a Pitch only under a pitched Program, a PitchDrum only under Program_-1; chords are never for drums
        follows[State.PROGRAM] &= (fam == Family.PITCH) | (fam == Family.CHORD)
        follows[State.PROGRAM_DRUMS] &= fam == Family.PITCH_DRUM
        follows[State.END] = True
        self.base_follows = follows
        self.positions_per_beat = tok.max_res

    def _id_tables(self, exps: list[np.ndarray]) -> None:
        """Run every id's expansion through the machine at once (a loop over expansion positions only)."""
        V = len(exps)
        lens = np.array([len(e) for e in exps], dtype=np.int64)
        E = np.full((V, max(int(lens.max()), 1)), -1, dtype=np.int64)
        E[np.arange(V).repeat(lens), np.concatenate([np.arange(k) for k in lens])] = np.concatenate(exps)
        state = np.full(V, -1, dtype=np.int64)  # state after the tokens so far (-1: none yet)
        ok = np.ones(V, dtype=bool)
        last_pos = np.full(V, NO_POSITION, dtype=np.int64)  # last Position since a reset, within the id
        first_pos = np.full(V, FREE, dtype=np.int64)  # first Position before any Bar/Rest
        pre_meter_pos = np.full(V, -1, dtype=np.int64)  # largest Position before any TimeSig
        numerator = np.zeros(V, dtype=np.int64)  # the last TimeSig's numerator (0: none)
        fam = self.base_fam
        for j in range(E.shape[1]):
            b = E[:, j]
            live = b >= 0
            bb = np.maximum(b, 0)
            inner = live & (state >= 0)
            ok &= ~inner | self.base_follows[np.maximum(state, 0), bb]
            pos = np.where(live, self.base_position[bb], -1)
            is_pos = pos >= 0
            ok &= ~(is_pos & (last_pos > NO_POSITION)) | (pos > last_pos)
            ok &= ~(is_pos & (numerator > 0)) | (pos < numerator * self.positions_per_beat)
            first_pos = np.where(is_pos & (last_pos == NO_POSITION), pos, first_pos)
            pre_meter_pos = np.where(is_pos & (numerator == 0), np.maximum(pre_meter_pos, pos), pre_meter_pos)
            reset = live & ((fam[bb] == Family.BAR) | (fam[bb] == Family.REST))
            last_pos = np.where(is_pos, pos, np.where(reset, -1, last_pos))
            numerator = np.where(live & (self.base_numerator[bb] > 0), self.base_numerator[bb], numerator)
            state = np.where(live, self.base_after[bb], state)
        first = np.where(lens > 0, E[:, 0], -1)
        table = np.where(first >= 0, self.base_follows[:, np.maximum(first, 0)], True) & ok
        table[State.END] = True
        self.table = self._with_modes(table, np.where(first >= 0, self.base_kind[np.maximum(first, 0)], -1))
        self.first_pos, self.pre_meter_pos = first_pos, pre_meter_pos
        self.end_state, self.end_last_pos, self.end_numerator = state, last_pos, numerator
        dist = self._steps_to_complete()
        self.max_steps_to_complete = int(dist[dist < FREE].max())
        self.to_complete = np.where(state >= 0, dist[np.maximum(state, 0)], FREE)  # an empty id brings no end

    def _with_modes(self, table: np.ndarray, id_kind: np.ndarray) -> np.ndarray:
        """(modes x kinds, V): each mode's copy of the kinds' table without what the mode forbids."""
        rows = []
        for mode in Mode:
            forbids = MODE_FORBIDS[mode] - ({State.HOLE} if self.holes and mode == Mode.PLAIN else set())
            t = table & ~np.isin(id_kind, list(forbids))[None, :]
            if mode == Mode.CONTEXT:  # holes come in one run: after a hole, another may come
                t[State.HOLE] |= table[State.HOLE] & (id_kind == State.HOLE)
            t[State.END] = True
            rows.append(t)
        return np.concatenate(rows)  # (states, V): legal by kinds (and inner positions)

    def _steps_to_complete(self) -> np.ndarray:
        """Fewest base tokens from each state to a complete one (COMPLETE)."""
        dist = np.full(len(State), FREE, dtype=np.int64)
        dist[list(COMPLETE)] = 0
        for _ in range(len(State)):
            via = np.where(self.base_follows, dist[self.base_after][None, :] + 1, FREE).min(1)
            dist = np.minimum(dist, via)
        return dist

    def step(self, state: tuple[int, int, int], token: int) -> tuple[int, int, int]:
        """(state, last Position, numerator) after model id `token`; the state's first number is
        mode * len(State) + kind."""
        s, last_pos, num = state
        mode, kind = divmod(s, NK)
        if kind == State.END:
            return state
        if token == self.eos_id or token == self.fill_end_id:
            return State.END, NO_POSITION, num
        if not 0 <= token < len(self.end_state):
            return s, last_pos, num
        end = int(self.end_state[token])
        if end < 0:  # an empty id changes nothing
            return state
        if end == State.HOLE:
            mode = max(mode, Mode.CONTEXT)
        elif end == State.FILL_START:
            mode = Mode.MIDDLE
        new_pos = int(self.end_last_pos[token])
        new_num = int(self.end_numerator[token])
        return mode * NK + end, new_pos if new_pos != NO_POSITION else last_pos, new_num or num

    def run(self, ids) -> tuple[int, int, int]:
        state = (State.START, -1, 4)
        for t in ids:
            state = self.step(state, int(t))
        return state

    def legal(self, state: tuple[int, int, int], token: int) -> bool:
        """Whether model id `token` may come in `state` (one entry of `allowed`)."""
        s, last_pos, num = state
        if not 0 <= token < self.table.shape[1] or not self.table[s, token]:
            return False
        return s % NK == State.END or bool(self.first_pos[token] > last_pos
                                           and self.pre_meter_pos[token] < num * self.positions_per_beat)

    def allowed(self, state: tuple[int, int, int]) -> np.ndarray:
        """Boolean mask over model ids legal in `state` (numpy; the constraint does this in torch per batch)."""
        s, last_pos, num = state
        m = self.table[s].copy()
        if s % NK != State.END:
            m &= (self.first_pos > last_pos) & (self.pre_meter_pos < num * self.positions_per_beat)
        return m


def kind_of(state: tuple[int, int, int]) -> State:
    """The kind of the last token (the State without the mode)."""
    return State(state[0] % NK)


def mode_of(state: tuple[int, int, int]) -> Mode:
    return Mode(state[0] // NK)


class GrammarConstraint:
    """A `generate` constraint: only ids that keep the REMIPlus grammar (see the module docstring).

        ids = generate(model, prompt, 512, eos_id=tok.eos_id, constraints=[GrammarConstraint(tok, 512)])

    With `max_new_tokens` the last steps also close the open note, so a piece cut by the token budget
    decodes with nothing skipped too. Rows that emitted EOS are finished: every id is allowed there.
    The mask of each state met is built once (vectorised over the vocabulary) and kept: a step looks
    up one boolean row per batch row and fills the logits with one `masked_fill_`.
    """

    CACHE_SIZE = 4096  # states kept (a piece meets a few hundred: kinds x positions x meters)

    def __init__(self, tok: REMI, max_new_tokens: int | None = None, grammar: Grammar | None = None):
        self.grammar = grammar or Grammar(tok)
        self.max_new_tokens = max_new_tokens
        self.states: list[tuple[int, int, int]] = []
        self.n_new = 0
        self.device = torch.device("cpu")
        self._forbidden: dict[tuple[int, int, int], torch.Tensor] = {}
        self._closing = torch.from_numpy(self.grammar.to_complete)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.states = [self.grammar.run(row) for row in prompt_ids.tolist()]
        self.n_new = 0
        if prompt_ids.device != self.device:
            self.device = prompt_ids.device
            self._forbidden.clear()

    def _forbidden_in(self, state: tuple[int, int, int]) -> torch.Tensor:
        f = self._forbidden.get(state)
        if f is None:
            if len(self._forbidden) >= self.CACHE_SIZE:
                self._forbidden.clear()
            f = self._forbidden[state] = torch.from_numpy(~self.grammar.allowed(state)).to(self.device)
        return f

    def forbidden(self) -> torch.Tensor:
        """(B, V) boolean: the ids each row may not take next."""
        rows = [self._forbidden_in(s) for s in self.states]
        if self.max_new_tokens is not None:
            left = self.max_new_tokens - self.n_new - 1  # tokens after this one
            if left < self.grammar.max_steps_to_complete:  # the last steps: close the open note
                too_far = (self._closing > left).to(self.device)
                rows = [f | too_far if not bool((f | too_far).all()) else f for f in rows]
        return rows[0][None] if len(rows) == 1 else torch.stack(rows)

    def allowed(self) -> torch.Tensor:
        """(B, V) boolean: the ids each row may take next."""
        return ~self.forbidden()

    def mask(self, logits: torch.Tensor) -> None:
        forbidden = self.forbidden()
        V = forbidden.shape[1]
        logits[:, :V].masked_fill_(forbidden, float("-inf"))
        if logits.shape[1] > V:
            logits[:, V:] = float("-inf")  # ids the tokenizer does not have

    def push(self, tokens: torch.Tensor) -> None:
        self.states = [self.grammar.step(s, t) for s, t in zip(self.states, tokens.tolist())]
        self.n_new += 1
