"""Tests for midistral/tokenize/clock.py, the bar clock of the encoder, the decoder and the controls.

Oracles: symusic's own downbeats of a piece (bar lines through meter changes), and hand-worked clocks.
The encoder and decoder running on it are checked against MidiTok in tests/test_tokenize_remi.py.
"""

import ast
from pathlib import Path

import numpy as np
import symusic

from midistral.tokenize import REMI
from midistral.tokenize.clock import BarClock, EncoderClock, bar_lines


def test_bar_lines_are_symusics_downbeats(dev_midi_files):
    tok, checked = REMI(), 0
    for path in dev_midi_files:
        try:
            enc = tok.encode_with_times(path)
        except Exception:  # files the tokenizer refuses (no notes in range) are tested elsewhere
            continue
        last = int(enc.ends.max())
        score = symusic.Score(enc.tpq)
        for t, n, d in enc.time_signatures:
            score.time_signatures.append(symusic.TimeSignature(t, n, d))
        track = symusic.Track("x", 0, False)
        track.notes.append(symusic.Note(0, last, 60, 80))
        score.tracks.append(track)
        down = np.asarray(score.get_downbeats())
        lines = bar_lines(enc.time_signatures, enc.tpq, last)
        n = min(len(down), len(lines))
        assert n > 0 and np.array_equal(lines[:n], down[:n]), path.name
        checked += len(enc.time_signatures) > 1
    assert checked >= 2  # pieces with meter changes among them


def test_rests_cross_bar_lines_and_positions_stay_in_the_bar():
    c = BarClock(tpq=12, max_res=12)  # 4/4: 48 ticks a bar, 1 tick a position
    assert c.cur_bar == -1
    c.bar()
    assert (c.cur_bar, c.tick_bar, c.cur_tick) == (0, 0, 0)
    assert c.position(10) and c.cur_tick == 10
    c.note(30)  # a note to tick 40
    c.rest(60)  # from 40: tick 100, in bar 2 (96..143), no Bar token
    assert (c.cur_bar, c.tick_bar, c.cur_tick) == (2, 96, 100)
    assert not c.position(48) and c.cur_tick == 100  # past the bar's end: ignored
    c.bar()
    assert c.meter(3, 4) and (c.tick_at_ts, c.bar_at_ts, c.bar_len) == (144, 3, 36)
    assert not c.meter(3, 4)  # a recall
    c.bar()
    assert (c.cur_bar, c.tick_bar) == (4, 180)


def test_encoder_clock_writes_rests_bars_and_positions():
    tok = REMI()
    c = EncoderClock(tok, 12, (0, 4, 4))
    toks, ticks = [], []
    c.advance(0, 0, False, toks, ticks)  # the first bar and the first position
    c.advance(110, 20, False, toks, ticks)  # rests from 20 cross into bar 2, then the position at 110
    names = [tok.id_to_token[i] for i in toks]
    assert names[:3] == ["Bar_None", "TimeSig_4/4", "Position_0"]
    assert all(n.startswith("Rest_") for n in names[3:-1]) and names[-1] == "Position_14"
    assert (c.cur_bar, c.tick_bar) == (2, 96) and ticks[-1] == 110


def test_the_clock_needs_only_numpy():
    """The clock is tokenizer arithmetic: no torch, nothing of midistral above it."""
    import midistral.tokenize.clock as clock

    tree = ast.parse(Path(clock.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "bisect", "numpy"}
