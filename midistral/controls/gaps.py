"""`GaplessConstraint`: no beat in which every instrument is silent, once the music has started.

    cons = [GrammarConstraint(tok), BarsConstraint(tok, 16), GaplessConstraint(tok)]

Ensemble styles sound all the time: in the music21 corpus not one beat of a Bach chorale or of the
Renaissance pieces' openings is silent (muspy's empty-beat rate is 0). A small model drops all its voices at
once now and then (it writes the next Position, Bar or Rest after every note has ended), which a listener
hears as the piece stopping. With this constraint an id that would move the time past the end of every
sounding note so far, far enough that a whole beat (of the bar's beat grid) lies in the silence, is masked;
the model then starts a note before that beat instead. Shorter breaths (an eighth's silence between two
phrases) stay allowed. Where no bar may start, what only leads to one (a lone BPE "▁", the bar attributes) is
masked too. Before the first note, and on the row where the masks would leave nothing, it does
nothing. It follows generate's protocol (start / mask / push) on BPE ids, on the decoder's bar clock.
"""

from __future__ import annotations

import numpy as np
import torch

from midistral.controls.constraints import (BAR, DURATION, POSITION, REST, TIMESIG, StreamClock, TickTables,
                                            id_expansions, stream_clock)
from midistral.controls.masks import ban_unless_nothing_left

NONE = -(1 << 40)  # "no note" / "no move" in the tables: below any tick (relative ticks may be negative)


def _whole_beat_between(clock: StreamClock, start: int, end: int) -> bool:
    """A whole beat of the current meter's grid (from its section's bar line) lies in [start, end)."""
    origin, tpb = clock.tick_at_ts, clock.tpb
    first = origin + -(-(start - origin) // tpb) * tpb  # the first beat line at or after `start`
    return first + tpb <= end


class GaplessConstraint:
    """Mask ids that leave a whole beat silent after the music has started (see the module's docstring)."""

    def __init__(self, tok):
        self.tok = tok
        self.exp = [e.tolist() for e in id_expansions(tok)]
        fam = tok.family.tolist()
        # only ids that move the time can open a silence
        self._moving = [i for i, e in enumerate(self.exp) if any(fam[x] in (BAR, POSITION, REST) for x in e)]
        self._fam = fam
        self._cache: dict = {}
        self._tables: dict = {}
        self._ends = {i for i in (tok.eos_id, tok.extra and tok.extra.fill_end_id) if i is not None}
        self._meter_of = {i: ts for ts, i in tok.ts_id.items()}
        # ids that only lead to a bar: a lone BPE word start "▁" (it expands to nothing) and the bar attributes;
        # masked with the bar lines, else a row whose bar may not close could write "▁" until its budget ran out
        self._opens_bar = [i for i, e in enumerate(self.exp) if e and fam[e[0]] == BAR]
        leads = [i for i, e in enumerate(self.exp) if not e and i < tok.music_size]
        if tok.extra is not None:
            leads += [i for t, i in tok.extra.id.items() if t.startswith("ACBar")]
        self._leads_to_bar = leads

    def _meter_tables(self, clock: StreamClock) -> dict:
        """Per meter, each moving id's time moves as arrays, relative to the current bar line: `moves` (ids x K)
        the tick each time move reaches (NONE past the id's last), `ends` the latest end of the id's own notes
        written after its first move and before that move (NONE: none), `pre` the longest note it writes
        before its first move (at the current tick; NONE: none). Ids with a Rest (it starts after the notes' end, which
        the state decides) or a change of meter are `exact`: simulated on the clock instead."""
        meter = (clock.num, clock.den, clock.tpq)
        if meter in self._tables:
            return self._tables[meter]
        durs = TickTables(self.tok, clock.tpq).at(clock.tpb)[0]
        fast, moves, ends, pre, exact = [], [], [], [], []
        for i in self._moving:
            bars, cur, latest, longest, row_moves, row_ends = 0, None, NONE, NONE, [], []
            for x in self.exp[i]:
                f = self._fam[x]
                if f == REST or (f == TIMESIG and self._meter_of[x] != (clock.num, clock.den)):
                    break
                if f == DURATION:
                    if cur is None:
                        longest = max(longest, durs[x - self.tok.dur0])
                    else:
                        latest = max(latest, cur + durs[x - self.tok.dur0])
                elif f == BAR or (f == POSITION and (x - self.tok.pos0) * clock.tpp < clock.bar_len):
                    bars += f == BAR  # (a Position past the bar line leaves the clock where it is)
                    cur = bars * clock.bar_len + ((x - self.tok.pos0) * clock.tpp if f == POSITION else 0)
                    row_moves.append(cur)
                    row_ends.append(latest)
            else:
                fast.append(i)
                moves.append(row_moves)
                ends.append(row_ends)
                pre.append(longest)
                continue
            exact.append(i)
        k = max(len(m) for m in moves) if moves else 1
        pad = lambda rows: np.array([r + [NONE] * (k - len(r)) for r in rows], np.int64).reshape(-1, k)  # noqa: E731
        self._tables[meter] = t = dict(fast=np.array(fast, np.int64), moves=pad(moves), ends=pad(ends),
                                       pre=np.array(pre, np.int64), exact=exact)
        return t

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.clocks = [stream_clock(self.tok, self.tok.base_ids(row).tolist())[0] for row in prompt_ids.tolist()]
        self.done = [False] * len(self.clocks)

    def _opens_silence(self, clock: StreamClock, expansion: list[int]) -> bool:
        c = clock.copy()
        for x in expansion:
            sounding_until = c.prev_end if c.seen_note else None
            c.feed(x)
            if sounding_until is not None and self._fam[x] in (BAR, POSITION, REST) \
                    and _whole_beat_between(c, sounding_until, c.cur_tick):
                return True
        return False

    def _banned(self, clock: StreamClock) -> torch.Tensor:
        key = (clock.cur_tick - clock.tick_bar, clock.prev_end - clock.tick_bar, (clock.tick_bar - clock.tick_at_ts)
               % clock.tpb, clock.num, clock.den, clock.fam1, clock.fam2, clock.seen_note, clock.seen_ts)
        if key not in self._cache:
            t = self._meter_tables(clock)
            ban = np.zeros(len(self.exp), bool)
            # sounding until: the notes so far, the id's notes at the current tick, its notes since its first move
            cur, tpb = clock.cur_tick - clock.tick_bar, clock.tpb
            beat0 = (clock.tick_bar - clock.tick_at_ts) % tpb
            until = np.maximum(np.maximum(clock.prev_end - clock.tick_bar if clock.seen_note else NONE,
                                          np.where(t["pre"] > NONE, cur + t["pre"], NONE))[:, None], t["ends"])
            first_beat = -(-(until + beat0) // tpb) * tpb - beat0  # the first beat line at or after it
            silent = (t["moves"] > NONE) & (until > NONE) & (first_beat + tpb <= t["moves"])
            ban[t["fast"][silent.any(1)]] = True
            ban[[i for i in t["exact"] if self._opens_silence(clock, self.exp[i])]] = True
            if ban[self._opens_bar].all():
                ban[self._leads_to_bar] = True
            self._cache[key] = torch.from_numpy(ban)
        return self._cache[key]

    def mask(self, logits: torch.Tensor) -> None:
        for r, clock in enumerate(self.clocks):
            if self.done[r] or not clock.seen_note:
                continue
            row = logits[r, :len(self.exp)]
            ban = self._banned(clock).to(row.device)
            ban_unless_nothing_left(row, ban)

    def push(self, tokens: torch.Tensor) -> None:
        for r, t in enumerate(tokens.tolist()):
            if t in self._ends:
                self.done[r] = True
            if not self.done[r] and 0 <= t < len(self.exp):
                for x in self.exp[t]:
                    self.clocks[r].feed(x)
