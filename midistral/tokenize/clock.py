"""The bar clock: where a REMIPlus stream stands in time, in the tokenizer's ticks.

One clock for everyone who follows time tokens: the encoder (`EncoderClock`: it writes the Rest, Bar,
TimeSig-recall and Position tokens that lead to a tick), the decoder (`BarClock`: it reads them back into
ticks) and the controls (they follow a stream token by token to count its bars, or walk a piece to
write new notes between its own). Their arithmetic is the same, so it lives once, here:

- a meter section starts at a bar line (`tick_at_ts`, `bar_at_ts`); bar b of the section starts at
  tick_at_ts + (b - bar_at_ts) * bar_len;
- a Bar token moves to the next bar line; a Rest moves on from the later of the current tick and the end of
  the notes so far, and the bars it crosses get no Bar token (the clock enters them all the same);
- a Position is a tick inside the current bar, in steps of `tpp` (1/max_res of the beat);
- before any time token the clock is before bar 0 (`cur_bar == -1`).

Ticks: `tpq` ticks per quarter (max_res per beat of the piece's largest denominator). Pure Python and numpy.
"""

from __future__ import annotations

import bisect

import numpy as np


def bar_lines(time_signatures, tpq: int, last_tick: int) -> np.ndarray:
    """The tick of every bar line up to `last_tick` (inclusive) of a piece with these (tick, num, den) meters."""
    lines = []
    for i, (t, n, d) in enumerate(time_signatures):
        stop = time_signatures[i + 1][0] if i + 1 < len(time_signatures) else last_tick + 1
        lines.append(np.arange(t, max(stop, t + 1), n * tpq * 4 // d))
    return np.concatenate(lines)


class BarClock:
    """The clock a stream of time tokens drives (the decoder's reading of it).

    State: `cur_bar` (-1 before the first bar), `tick_bar` (its bar line), `cur_tick`, `prev_end` (the
    latest end of the notes so far) and the meter (`num`, `den`, with `tpb` ticks per beat, `bar_len`
    ticks per bar, `tpp` ticks per position)."""

    def __init__(self, tpq: int, max_res: int, meter: tuple[int, int] = (4, 4)):
        self.tpq, self.max_res = tpq, max_res
        self.cur_bar = -1
        self.tick_bar = self.tick_at_ts = self.bar_at_ts = self.cur_tick = self.prev_end = 0
        self.set_meter(*meter)

    def set_meter(self, num: int, den: int) -> None:
        """The units of a meter; the section's start is the caller's (`meter` or the encoder's `change_ts`)."""
        self.num, self.den = num, den
        self.tpb = self.tpq * 4 // den
        self.bar_len = num * self.tpb
        self.tpp = max(self.tpb // self.max_res, 1)

    def enter(self) -> None:
        """A token that places the stream in time (Position, Rest, meter change) enters bar 0 if none yet."""
        if self.cur_bar == -1:
            self.cur_bar = 0

    def bar(self) -> None:
        """A Bar token: the next bar line."""
        self.cur_bar += 1
        self.tick_bar = self.cur_tick = self.tick_at_ts + (self.cur_bar - self.bar_at_ts) * self.bar_len

    def reach(self, tick: int) -> None:
        """Enter the bar `tick` falls in, if it is past the current one (bar lines crossed without a Bar)."""
        real_bar = self.bar_at_ts + (tick - self.tick_at_ts) // self.bar_len
        if real_bar > self.cur_bar:
            self.tick_bar += (real_bar - self.cur_bar) * self.bar_len
            self.cur_bar = real_bar

    def rest(self, ticks: int) -> None:
        """A Rest token of `ticks`: silence after the later of the current tick and the notes' end."""
        self.enter()
        self.cur_tick = max(self.prev_end, self.cur_tick) + ticks
        self.reach(self.cur_tick)

    def position(self, pos: int) -> bool:
        """A Position token; False (the clock stays) when it lies outside the current bar."""
        self.enter()
        if pos * self.tpp >= self.bar_len:
            return False
        self.cur_tick = self.tick_bar + pos * self.tpp
        return True

    def tempo(self) -> None:
        """A Tempo token: it stands at the current tick, so a Rest after it starts there at the earliest."""
        self.prev_end = max(self.prev_end, self.cur_tick)

    def note(self, duration_ticks: int) -> None:
        """A note of `duration_ticks` at the current tick."""
        self.prev_end = max(self.prev_end, self.cur_tick + duration_ticks)

    def meter(self, num: int, den: int) -> bool:
        """A TimeSig token: a new meter section from the current bar line (True), or a recall (False)."""
        if (num, den) == (self.num, self.den):
            return False
        self.enter()
        self.tick_at_ts, self.bar_at_ts = self.tick_bar, self.cur_bar
        self.set_meter(num, den)
        return True


class EncoderClock(BarClock):
    """The encoder's side of the clock (remi-spec §5.1): `advance(t, ...)` appends the time tokens that lead
    to tick t (Rest, Bar + TimeSig recall, Position) after notes that sound until `prev_end`.

    `tok` gives the time-token ids and tables (REMI: rest0, pos0, bar0, ts_id, config.max_bar_embedding,
    rest_ticks(tpb)). `overflow` is the highest Bar_<n> needed past max_bar_embedding (-1: none)."""

    def __init__(self, tok, tpq: int, ts0):
        self.tok = tok
        self.prev_tick = -1
        self.overflow = -1
        self.rest_tables: dict[int, list[int]] = {}
        self.pos0 = tok.pos0
        super().__init__(tpq, tok.max_res, (ts0[1], ts0[2]))

    def set_meter(self, num: int, den: int) -> None:
        super().set_meter(num, den)
        if self.tpb not in self.rest_tables:
            self.rest_tables[self.tpb] = self.tok.rest_ticks(self.tpb).tolist()
        self.rest_ticks = self.rest_tables[self.tpb]
        self.ts_token = self.tok.ts_id[(num, den)]

    def bar_token(self, bar: int) -> int:
        first, limit = self.tok.bar0, self.tok.config.max_bar_embedding
        if limit is None:
            return first
        if bar >= limit:  # reported by the encoder once the piece is done
            self.overflow = max(self.overflow, bar)
        return first + min(bar, limit - 1)

    def advance(self, t: int, prev_end: int, is_ts: bool, toks: list, tks: list) -> None:
        """Append the time tokens (Rest, Bar + TimeSig recall, Position) that lead to tick t, and the tick of
        each to `tks`; with `is_ts` the last Bar's TimeSig recall and the Position are left to the caller."""
        rt = self.rest_ticks
        if t - prev_end >= rt[0]:
            self.prev_tick = max(prev_end, self.prev_tick)
            rem = t - self.prev_tick
            while rem >= rt[0]:
                k = bisect.bisect_right(rt, rem) - 1
                toks.append(self.tok.rest0 + k)
                tks.append(self.prev_tick)
                self.prev_tick += rt[k]
                rem -= rt[k]
            self.enter()
            self.reach(self.prev_tick)
        n_new = self.bar_at_ts + (t - self.tick_at_ts) // self.bar_len - self.cur_bar
        for i in range(n_new):
            self.bar()
            toks.append(self.bar_token(self.cur_bar))
            tks.append(self.tick_bar)
            if not (is_ts and i == n_new - 1):
                toks.append(self.ts_token)
                tks.append(self.tick_bar)
        if not is_ts:
            toks.append(self.pos0 + (t - self.tick_bar) // self.tpp)
            tks.append(t)
        self.prev_tick = t

    def change_ts(self, t: int, ts) -> None:
        """A meter change at tick t (a bar line): ts = (t, num, den)."""
        self.bar_at_ts += (t - self.tick_at_ts) // self.bar_len
        self.tick_at_ts = t
        self.set_meter(ts[1], ts[2])
        self.prev_tick -= 1
