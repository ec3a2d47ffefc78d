"""midistral.music: piano-roll PNGs decoded by Pillow, MIDI files read back by mido (an independent reader)
and written atomically, prompt tempo/meter kept, bars cut; bar lines against symusic's get_downbeats, and
scores past midistral.limits refused before any analysis."""

import io
import random
import struct

import numpy as np
import pytest
import symusic
from PIL import Image

from conftest import score_of
from midistral import music
from midistral.errors import MidiError
from midistral.limits import MAX_BARS, MAX_BEATS
from midistral.tokenize import load_score




BAR = 1920


def test_piano_roll_png_decodes_and_highlight_changes_it():
    s = score_of({(0, False): [(i * 480, 480, 60 + i % 12) for i in range(16)],
                  (33, False): [(i * 960, 960, 40) for i in range(8)]})
    music.name_tracks(s)
    plain = music.piano_roll_png(s, "plain", start_tick=BAR)
    lit = music.piano_roll_png(s, "plain", start_tick=BAR, highlight=1)
    for png in (plain, lit):
        img = Image.open(io.BytesIO(png))
        img.load()
        assert img.format == "PNG" and img.size == (1400, 500)
    assert np.asarray(Image.open(io.BytesIO(plain))).shape == np.asarray(Image.open(io.BytesIO(lit))).shape
    assert plain != lit
    empty = Image.open(io.BytesIO(music.piano_roll_png(symusic.Score(480), "empty")))
    assert empty.size == (1400, 500)


def test_write_midi_names_tracks_and_mido_reads_them(tmp_path):
    import mido

    s = score_of({(0, False): [(0, 480, 60)], (33, False): [(0, 480, 40)], (0, True): [(0, 120, 36)]})
    path = tmp_path / "sub" / "song.mid"
    music.write_midi(music.name_tracks(s), path)
    names = [m.name for t in mido.MidiFile(str(path)).tracks for m in t if m.type == "track_name"]
    assert {"Acoustic Grand Piano", "Electric Bass (finger)", "Drums"} <= set(names)
    assert [p.name for p in path.parent.iterdir()] == ["song.mid"]
    png = tmp_path / "song.png"
    music.write_piano_roll(s, png, "t", highlight=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_midi_is_atomic(tmp_path, monkeypatch):
    import midistral.io

    path = tmp_path / "song.mid"
    path.write_bytes(b"old")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(midistral.io.os, "fsync", fail)
    with pytest.raises(OSError):
        music.write_midi(score_of({(0, False): [(0, 480, 60)]}), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["song.mid"]  # no temporary file left behind


def test_keep_prompt_meta_copies_tempo_and_meter(tmp_path):
    prompt = score_of({(0, False): [(0, 480, 60)]}, ts=(3, 4))
    prompt.tempos.append(symusic.Tempo(0, 100.0))
    path = tmp_path / "p.mid"
    prompt.dump_midi(path)
    for src in (prompt, path, path.read_bytes()):
        s = symusic.Score(24)
        s = music.keep_prompt_meta(s, src)
        assert abs(s.tempos[0].qpm - 100) < 1e-3
        assert (s.time_signatures[0].numerator, s.time_signatures[0].denominator) == (3, 4)
    assert len(music.keep_prompt_meta(symusic.Score(24), None).tempos) == 0


def test_n_bars_counts_bars_that_start_before_the_end():
    assert music.n_bars(symusic.Score(480)) == 0
    assert music.n_bars(score_of({(0, False): [(0, 480, 60), (BAR + 10, 480, 62)]})) == 2
    assert music.n_bars(score_of({(0, False): [(0, BAR, 60)]})) == 1


def test_end_at_last_bar_ends_held_notes_at_the_line_after_the_last_onset():
    s = score_of({(0, False): [(0, 480, 60), (BAR + 480, 3 * BAR, 62)], (33, False): [(BAR, BAR + 960, 40)]})
    music.end_at_last_bar(s)  # the last onset is in bar 2: nothing rings past its end
    assert s.end() == 2 * BAR and music.n_bars(s) == 2
    assert sorted((n.time, n.duration) for t in s.tracks for n in t.notes) == [(0, 480), (BAR, BAR), (BAR + 480, BAR - 480)]
    short = score_of({(0, False): [(0, 480, 60)]})
    assert music.end_at_last_bar(short).end() == 480  # already inside its bar
    assert music.end_at_last_bar(symusic.Score(480)).note_num() == 0


def test_merge_doubled_notes_keeps_the_longest_of_the_new_music_only():
    s = score_of({(0, False): [(0, 480, 60), (0, 240, 60),                      # a prompt's doubled note: kept
                               (BAR, 240, 60), (BAR, 960, 60), (BAR, 480, 60),  # new: the longest stays
                               (BAR, 480, 64), (BAR + 480, 480, 60)],           # another pitch, another onset
                  (33, False): [(BAR, 480, 60)]})                               # another instrument
    music.merge_doubled_notes(s, start_tick=BAR)
    assert sorted((n.time, n.duration, n.pitch) for n in s.tracks[0].notes) == [
        (0, 240, 60), (0, 480, 60), (BAR, 480, 64), (BAR, 960, 60), (BAR + 480, 480, 60)]
    assert len(s.tracks[1].notes) == 1
    assert music.merge_doubled_notes(symusic.Score(480)).note_num() == 0


def test_first_bars_follows_meter_changes():
    s = score_of({(0, False): [(i * 480, 480, 60) for i in range(14)]}, ts=(3, 4))
    s.time_signatures.append(symusic.TimeSignature(3 * 480, 2, 4))  # bar 0 in 3/4, then 2/4
    cut = music.first_bars(s, 3)  # 3 + 2 + 2 beats
    assert [n.time // 480 for n in cut.tracks[0].notes] == list(range(7))


def midi_file(tpq: int, events: bytes) -> bytes:
    track = events + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 1, 1, tpq) + b"MTrk" + struct.pack(">I", len(track)) + track


NOTE = b"\x00\x90\x3c\x40\x83\x60\x80\x3c\x40"  # one quarter note at tpq 480
HOSTILE = {  # each parses; each made symusic's get_downbeats run for minutes or run out of memory
    "tpq 1, a 2^28-tick note (37 bytes)": midi_file(1, b"\x00\x90\x3c\x40\xff\xff\xff\x7f\x80\x3c\x40"),
    "tpq 480, a 2^28-tick note": midi_file(480, b"\x00\x90\x3c\x40\xff\xff\xff\x7f\x80\x3c\x40"),
    "a tempo change at tick 2^28": midi_file(480, NOTE + b"\xff\xff\xff\x7f\xff\x51\x03\x07\xa1\x20"),
    "a meter change at tick 2^28": midi_file(480, NOTE + b"\xff\xff\xff\x7f\xff\x58\x04\x03\x02\x18\x08"),
    "a controller at tick 2^28": midi_file(480, NOTE + b"\xff\xff\xff\x7f\xb0\x07\x40"),
    "tpq 0": midi_file(0, NOTE),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_timelines_are_refused_before_any_analysis(name):
    with pytest.raises(MidiError, match="quarter note"):  # every reader: sample.py, the studio, data preparation
        load_score(HOSTILE[name], name)
    score = symusic.Score.from_midi(HOSTILE[name])  # and a Score made without load_score
    for analyse in (music.n_bars, music.downbeats, lambda s: music.first_bars(s, 2),
                    lambda s: music.piano_roll_png(s, "t")):
        with pytest.raises(MidiError, match="quarter note"):
            analyse(score)
    assert len(HOSTILE["tpq 1, a 2^28-tick note (37 bytes)"]) == 37


def test_large_but_bounded_scores_are_analysed():
    # the largest tpq a header holds, 16 beats of 4/4; and a score right at the end bound
    assert music.n_bars(load_score(midi_file(32767, b"\x00\x90\x3c\x40\x9f\xff\x70\x80\x3c\x40"))) == 4
    at_bound = score_of({(0, False): [(0, MAX_BEATS * 480, 60)]})
    assert music.n_bars(at_bound) == MAX_BEATS // 4
    with pytest.raises(MidiError, match="quarter notes"):
        music.n_bars(score_of({(0, False): [(0, MAX_BEATS * 480 + 1, 60)]}))
    # 1/16 bars are a sixteenth long: the bound on bars, not on beats, refuses this one
    with pytest.raises(MidiError, match="bars"):
        music.n_bars(score_of({(0, False): [(0, (MAX_BARS // 4 + 1) * 480, 60)]}, ts=(1, 16)))


def test_downbeats_match_symusic_within_one_meter():
    """symusic's get_downbeats as the oracle where it holds: one meter, ends far below tick 2^24."""
    rng = random.Random(0)
    for _ in range(300):
        tpq = rng.choice([1, 3, 24, 96, 480, 960])
        meter = (rng.randint(1, 13), rng.choice([1, 2, 4, 8, 16]))
        s = score_of({(0, False): [(0, rng.randint(1, 60 * tpq), 60)]}, ts=meter, tpq=tpq)
        want = np.asarray(s.get_downbeats())
        assert music.downbeats(s).tolist() == want[want < s.end()].tolist(), (tpq, meter, s.end())


def test_downbeats_start_a_bar_at_every_meter_change():
    s = score_of({(0, False): [(0, 20 * 480, 60)]}, ts=(3, 4))
    s.time_signatures.append(symusic.TimeSignature(3 * 480 + 240, 2, 4))  # in the middle of bar 2
    assert (music.downbeats(s) // 240).tolist() == [0, 6, 7, 11, 15, 19, 23, 27, 31, 35, 39]
    no_meter = score_of({(0, False): [(0, 9 * 480, 60)]})
    no_meter.time_signatures = []
    assert music.downbeats(no_meter).tolist() == [0, 1920, 3840]  # 4/4 when the file names none


def test_piano_roll_draws_dollar_names_as_text():
    """A file or track name with a pair of $ is not matplotlib math (it raised a ParseFatalException)."""
    s = score_of({(0, False): [(0, 480, 60)]})
    s.tracks[0].name = "$\\frac{$"
    png = music.piano_roll_png(s, "Variation 1 of $x_\\bad{$.mid" + "x" * 500, start_tick=240, highlight=0)
    assert Image.open(io.BytesIO(png)).size == (1400, 500)
