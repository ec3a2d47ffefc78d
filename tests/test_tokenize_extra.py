"""Extra tokens (midistral/tokenize/extra.py): ids after the vocabulary, saved with the tokenizer, and
attribute values equal to MidiTok 3.1's attribute controls (the oracle) on the real files in tests/data."""

import json

import numpy as np
import pytest
import symusic
from miditok.attribute_controls import BarNoteDensity, BarOnsetPolyphony, TrackNoteDensity, TrackOnsetPolyphony
from miditok.utils import get_bars_ticks

from midistral.errors import MidiError
from midistral.tokenize import REMI
from midistral.tokenize.extra import BarStats, ExtraVocab, bar_values, track_values
from midistral.tokenize.remi import Family


@pytest.fixture(scope="module")
def bpe_tok(dev_midi_files):
    tok = REMI()
    tok.train_bpe(dev_midi_files[:16], 1000, workers=1)
    return tok


def _encodable(files, tok):
    out = []
    for f in files:
        try:
            out.append((f, tok.encode_base(f)))
        except MidiError:
            pass
    return out


def test_extra_ids_follow_the_vocabulary_and_round_trip(tmp_path, bpe_tok, dev_midi_files):
    tok = REMI.from_dict(bpe_tok.to_dict())
    plain = tok.encode(dev_midi_files[0])
    n = len(tok)
    tok.extra = ExtraVocab(n, styles=["bach", "folk"])
    assert len(tok) == n + len(tok.extra) and tok.music_size == n
    assert tok.extra.id["Infill_Bar"] == n and tok.extra.id["Style_folk"] == n + 4
    assert (tok.encode(dev_midi_files[0]) == plain).all()  # plain sequences keep their ids
    tok.save(tmp_path / "t.json")
    back = REMI.load(tmp_path / "t.json")
    assert back.extra.tokens == tok.extra.tokens and len(back) == len(tok)
    # an older file without extra tokens still loads, with none
    d = json.loads((tmp_path / "t.json").read_text())
    del d["extra"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert REMI.load(tmp_path / "old.json").extra is None
    # decoding ignores the extra tokens: nothing skipped
    e = tok.extra
    mixed = np.r_[e.id["Style_bach"], e.bar_ids(3, 1, 2), plain[:40], e.hole_id, plain[40:], e.fill_end_id]
    score, skipped = tok.decode_with_report(mixed)
    assert skipped == 0 and score.note_num() == tok.decode(plain).note_num()


def test_miditok_names_and_order():
    e = ExtraVocab(0)
    want = (BarNoteDensity(18).tokens + BarOnsetPolyphony(1, 6).tokens + TrackNoteDensity(0, 18).tokens
            + TrackOnsetPolyphony(1, 6).tokens)
    assert e.tokens[3:] == list(want)


def _merged(score: symusic.Score) -> symusic.Track:
    """One track holding every note of the score, by onset (REMI+ writes all tracks in one stream)."""
    arrays = [t.notes.numpy() for t in score.tracks]
    n = {k: np.concatenate([a[k] for a in arrays]) for k in ("time", "duration", "pitch", "velocity")}
    order = np.argsort(n["time"], kind="stable")
    tr = symusic.Track()
    tr.notes = symusic.Note.from_numpy(*(n[k][order] for k in ("time", "duration", "pitch", "velocity")), "tick")
    return tr


@pytest.mark.parametrize("kind", ["base", "bpe"])
def test_attribute_values_equal_miditoks(kind, bpe_tok, dev_midi_files):
    tok = REMI() if kind == "base" else bpe_tok
    stats = BarStats(tok)
    bars_compared = tracks_compared = 0
    for f, base in _encodable(dev_midi_files, REMI()):
        ids = tok.encode(f)
        starts = stats.bar_starts(ids)
        dens, pmin, pmax = stats.per_bar(ids, starts)
        score = tok.decode(ids)
        track = _merged(score)
        ticks_bars = get_bars_ticks(score, only_notes_onsets=True)
        # the tick of each of our bars (from the encoder's clock, at the decoded resolution) and whether
        # the bar holds a Rest (a Rest crossing bar lines makes one segment of several bars)
        timed = tok.encode_with_times(f)
        enc_ids, enc_ticks = timed.ids, timed.ticks
        scale = 24 // timed.tpq
        bar_tick = enc_ticks[tok.family[enc_ids] == Family.BAR] * scale
        assert len(bar_tick) == len(starts)
        rest_in = np.zeros(len(starts), bool)
        seg_of_base = np.cumsum(tok.family[enc_ids] == Family.BAR) - 1
        rest_in[np.unique(seg_of_base[(tok.family[enc_ids] == Family.REST) & (seg_of_base >= 0)])] = True
        ours = {int(t): (d, a, b) for t, d, a, b, r in zip(bar_tick, dens, pmin, pmax, rest_in) if not r}
        for ac in (BarNoteDensity(18), BarOnsetPolyphony(1, 6)):
            events = ac.compute(track, score.ticks_per_quarter, ticks_bars, [], list(range(len(ticks_bars))))
            for ev in events:
                if ev.time not in ours:
                    continue
                d, a, b = ours[ev.time]
                want = dict(zip(("ACBarNoteDensity", "ACBarOnsetPolyphonyMin", "ACBarOnsetPolyphonyMax"),
                                bar_values(d, a, b)))
                assert f"{ev.type_}_{ev.value}" == f"{ev.type_}_{want[ev.type_]}", (f.name, ev.time)
                bars_compared += 1
        if not rest_in.any() and len(starts) == len(ticks_bars):  # our bars are MidiTok's bars
            theirs = [f"{e.type_}_{e.value}" for ac in (TrackNoteDensity(0, 18), TrackOnsetPolyphony(1, 6))
                      for e in ac.compute(track, 24, ticks_bars, [], [])]
            names = ("ACTrackNoteDensityMin", "ACTrackNoteDensityMax", "ACTrackOnsetPolyphonyMin",
                     "ACTrackOnsetPolyphonyMax")
            poly_min = int(pmin[dens > 0].min()) if (dens > 0).any() else 0
            vals = track_values(dens, poly_min, int(pmax.max()))
            assert theirs == [f"{n}_{v}" for n, v in zip(names, vals)], f.name
            tracks_compared += 1
    assert bars_compared > 200 and tracks_compared >= 3, (bars_compared, tracks_compared)


def test_bpe_never_crosses_a_bar(bpe_tok, dev_midi_files):
    """Every Bar token is the first base token of its BPE id, so bars start at id boundaries."""
    stats = BarStats(bpe_tok)
    for f, base in _encodable(dev_midi_files[:8], REMI()):
        ids = bpe_tok.encode(f)
        exps = bpe_tok.bpe.expansions()
        for i in ids.tolist():
            bars = np.flatnonzero(bpe_tok.family[exps[i]] == Family.BAR)
            assert len(bars) == 0 or bars.tolist() == [0]
        starts = stats.bar_starts(ids)
        assert len(starts) == int((bpe_tok.family[base] == Family.BAR).sum())
        cut = [bpe_tok.bpe.decode(ids[a:b]) for a, b in zip(starts, np.r_[starts[1:], len(ids)])]
        assert all(bpe_tok.family[c[0]] == Family.BAR for c in cut)
        assert (np.concatenate([bpe_tok.bpe.decode(ids[:starts[0]])] + cut) == base).all()


def test_track_tokens_of_a_chunk_without_onsets_are_in_the_vocabulary():
    from midistral.tokenize import REMI
    from midistral.tokenize.extra import ExtraVocab

    tok = REMI()
    extra = ExtraVocab(len(tok.vocab))
    ids = extra.track_ids(np.zeros(3, dtype=np.int64), 1, 0)  # three silent bars: no onset at all
    assert len(ids) == 4 and all(extra.start <= i < extra.stop for i in ids)
