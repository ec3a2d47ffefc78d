"""midistral.music: failure modes on hand-computed scores, piano-roll PNGs decoded by Pillow, MIDI files
read back by mido (an independent reader) and written atomically."""

import io

import numpy as np
import pytest
import symusic
from PIL import Image

from midistral import music


def score_of(tracks, ts=(4, 4), tpq=480):
    """A Score from {(program, is_drum): [(time, duration, pitch), ...]}."""
    s = symusic.Score(tpq)
    s.time_signatures.append(symusic.TimeSignature(0, *ts))
    for (program, is_drum), notes in tracks.items():
        t = symusic.Track("", program, is_drum)
        for time, dur, pitch in notes:
            t.notes.append(symusic.Note(time, dur, pitch, 80))
        s.tracks.append(t)
    return s


BAR = 1920


def test_loop_score_counts_bars_repeating_one_of_the_previous_two():
    # bars: A B A B C C D (7 bars): bar 2 = bar 0, bar 3 = bar 1, bar 5 = bar 4 -> 3 of 7
    pattern = {"A": [60, 64], "B": [62, 65], "C": [67], "D": [69, 72]}
    notes = [(b * BAR + i * 480, 480, p) for b, name in enumerate("ABABCCD")
             for i, p in enumerate(pattern[name])]
    s = score_of({(0, False): notes})
    assert music.failure_modes(s)["loop_score"] == pytest.approx(3 / 7)
    # from bar 4 on: bars 4, 5, 6 are the continuation; bar 5 repeats bar 4 -> 1 of 3
    assert music.failure_modes(s, start_tick=4 * BAR)["loop_score"] == pytest.approx(1 / 3)


def test_loop_ignores_empty_bars_and_sees_durations():
    notes = [(0, 480, 60), (3 * BAR, 480, 60), (4 * BAR, 960, 60)]  # bars 1-2 silent; bar 4 longer note
    assert music.failure_modes(score_of({(0, False): notes}))["loop_score"] == 0.0


def test_silent_share_counts_sustained_notes_as_sounding():
    piano = [(b * BAR, 480, 60 + b) for b in range(4)]
    bass = [(0, 480, 40), (BAR, 2 * BAR, 41)]  # plays in bar 0, then holds through bars 1-2, silent in bar 3
    s = score_of({(0, False): piano, (33, False): bass})
    modes = music.failure_modes(s, start_tick=BAR // 2, prompt_programs=[0, 33])
    # continuation bars 1, 2, 3 (bar lines at or after start_tick): only bar 3 has the bass silent
    assert modes["silent_share"] == pytest.approx(1 / 3)
    # default prompt instruments: those with a note before start_tick (both here)
    assert music.failure_modes(s, start_tick=BAR // 2) == modes
    # an instrument of the prompt that has no track at all is silent everywhere
    assert music.failure_modes(s, BAR // 2, prompt_programs=[-1])["silent_share"] == 1.0
    assert music.failure_modes(s, BAR // 2, prompt_programs=[])["silent_share"] == 0.0


def test_out_of_key_uses_best_scale_and_skips_drums():
    d_major = [62, 64, 66, 67, 69, 71, 73, 74]
    notes = [(i * 480, 480, p) for i, p in enumerate(d_major + [65, 72])]  # F and C are outside D major
    drums = [(i * 480, 120, 37) for i in range(40)]
    s = score_of({(0, False): notes, (0, True): drums})
    assert music.failure_modes(s)["out_of_key"] == pytest.approx(2 / 10)
    assert music.out_of_key_fraction(np.array([], dtype=np.int64)) == 0.0


def test_failure_modes_of_an_empty_score():
    s = symusic.Score(480)
    assert music.failure_modes(s) == {"silent_share": 0.0, "loop_score": 0.0, "out_of_key": 0.0}
    assert music.n_bars(s) == 0


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


def test_first_bars_follows_meter_changes():
    s = score_of({(0, False): [(i * 480, 480, 60) for i in range(14)]}, ts=(3, 4))
    s.time_signatures.append(symusic.TimeSignature(3 * 480, 2, 4))  # bar 0 in 3/4, then 2/4
    cut = music.first_bars(s, 3)  # 3 + 2 + 2 beats
    assert [n.time // 480 for n in cut.tracks[0].notes] == list(range(7))
