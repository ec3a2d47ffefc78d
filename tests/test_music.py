"""midistral.music: piano-roll PNGs decoded by Pillow, MIDI files read back by mido (an independent reader)
and written atomically, prompt tempo/meter kept, bars cut."""

import io

import numpy as np
import pytest
import symusic
from PIL import Image

from conftest import score_of
from midistral import music




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


def test_first_bars_follows_meter_changes():
    s = score_of({(0, False): [(i * 480, 480, 60) for i in range(14)]}, ts=(3, 4))
    s.time_signatures.append(symusic.TimeSignature(3 * 480, 2, 4))  # bar 0 in 3/4, then 2/4
    cut = music.first_bars(s, 3)  # 3 + 2 + 2 beats
    assert [n.time // 480 for n in cut.tracks[0].notes] == list(range(7))
