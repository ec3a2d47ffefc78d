"""sample.py end to end: a tiny random checkpoint built here, a synthetic two-track prompt, the files it
writes read back by symusic, mido and pretty_midi (independent MIDI readers), and bad input."""

import subprocess
import sys

import pytest
import symusic

from conftest import ROOT


def run_sample(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    """4 bars of 3/4 at 100 bpm: a piano melody over chords and a drum beat."""
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, 100.0))
    s.time_signatures.append(symusic.TimeSignature(0, 3, 4))
    piano = symusic.Track("x", 0, False)
    drums = symusic.Track("y", 0, True)
    for beat in range(12):
        piano.notes.append(symusic.Note(beat * 480, 480, 60 + [0, 2, 4, 5, 7, 9][beat % 6], 80))
        piano.notes.append(symusic.Note(beat * 480, 240, 48 + [0, 5, 7][beat // 4 % 3], 70))
        drums.notes.append(symusic.Note(beat * 480, 120, 36 if beat % 3 == 0 else 42, 90))
    s.tracks.extend([piano, drums])
    path = tmp_path_factory.mktemp("prompt") / "tune.mid"
    s.dump_midi(path)
    return path


def symusic_notes(path):
    s = symusic.Score(str(path))
    return sorted((n.time, n.pitch, n.duration) for t in s.tracks for n in t.notes), s


def mido_notes(path):
    """Notes from raw MIDI messages (note_on/note_off pairing by channel and pitch), in ticks."""
    import mido

    mid = mido.MidiFile(str(path))
    notes = []
    for track in mid.tracks:
        t, open_ = 0, {}
        for msg in track:
            t += msg.time
            if msg.type == "note_on" and msg.velocity > 0:
                open_.setdefault((msg.channel, msg.note), []).append(t)
            elif msg.type in ("note_off", "note_on") and open_.get((msg.channel, msg.note)):
                start = open_[(msg.channel, msg.note)].pop(0)
                notes.append((start, msg.note, t - start))
    return sorted(notes), mid


@pytest.mark.slow
def test_sample_writes_midi_and_png(ckpt, prompt, tmp_path):
    out = tmp_path / "out"
    r = run_sample(prompt, "--ckpt", ckpt, "--out", out, "--num-samples", 2, "--max-new-tokens", 60,
                   "--seed", 0)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.endswith(".png)")]
    assert len(lines) == 2 and all("skipped" in l and "bars" in l and "notes" in l for l in lines)
    for i in range(2):
        midi, png = out / f"tune_{i}.mid", out / f"tune_{i}.png"
        assert midi.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ours, score = symusic_notes(midi)
        theirs, mid = mido_notes(midi)
        assert ours == theirs and len(ours) > 0
        import pretty_midi

        pm = pretty_midi.PrettyMIDI(str(midi))
        pm_notes = sorted((round(n.start, 3), n.pitch) for inst in pm.instruments for n in inst.notes)
        sec = score.to("second")
        sy_notes = sorted((round(n.time, 3), n.pitch) for t in sec.tracks for n in t.notes)
        assert pm_notes == sy_notes
        # the prompt's tempo, time signature and instruments survive, tracks named by GM instrument
        assert abs(score.tempos[0].qpm - 100) < 1
        assert (score.time_signatures[0].numerator, score.time_signatures[0].denominator) == (3, 4)
        names = {t.name for t in score.tracks}
        assert {"Acoustic Grand Piano", "Drums"} <= names
        # the prompt (4 bars, 36 notes) is at the start of every sample: all of its notes, and before its
        # last onset nothing else (the continuation may add notes at that onset: a chord)
        notes = sorted((n.time * 480 // score.tpq, n.pitch) for t in score.tracks for n in t.notes)
        want = sorted((t, p) for t, p, _ in symusic_notes(prompt)[0])
        assert len(want) == 36 and set(want) <= set(notes)
        assert [x for x in notes if x[0] < want[-1][0]] == [x for x in want if x[0] < want[-1][0]]


@pytest.mark.slow
def test_sample_same_seed_same_file(ckpt, prompt, tmp_path):
    a = run_sample(prompt, "--ckpt", ckpt, "--out", tmp_path / "a", "--max-new-tokens", 40, "--seed", 3)
    b = run_sample(prompt, "--ckpt", ckpt / "best", "--out", tmp_path / "b", "--max-new-tokens", 40,
                   "--seed", 3)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (tmp_path / "a" / "tune.mid").read_bytes() == (tmp_path / "b" / "tune.mid").read_bytes()


@pytest.mark.slow
def test_no_prompt_long_prompt_and_prompt_bars(ckpt, prompt, tmp_path):
    r = run_sample("--ckpt", ckpt, "--out", tmp_path, "--max-new-tokens", 30, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sample.mid").is_file()
    # longer than the context (256): the start is dropped, with a note
    r = run_sample(prompt, "--ckpt", ckpt, "--out", tmp_path, "--max-new-tokens", 200, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert "keeping its last" in r.stderr


def test_first_bars():
    from midistral.music import first_bars

    s = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 3, 4))
    t = symusic.Track("p", 0, False)
    for beat in range(12):
        t.notes.append(symusic.Note(beat * 480, 480, 60, 80))
    s.tracks.append(t)
    cut = first_bars(s, 2)
    assert [n.time for n in cut.tracks[0].notes] == [i * 480 for i in range(6)]
    assert first_bars(s, 10).note_num() == 12


def test_continuation_report_flags_loops_and_silence():
    from midistral.metrics import failure_modes
    from midistral.sampler import continuation_report

    s = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    a, b = symusic.Track("Piano", 0, False), symusic.Track("Bass", 33, False)
    for bar in range(8):
        a.notes.append(symusic.Note(bar * 1920, 960, 61, 80))  # same bar 8 times, C#
        if bar < 2:
            b.notes.append(symusic.Note(bar * 1920, 960, 40, 80))
    s.tracks.extend([a, b])
    modes = failure_modes(s, 2 * 1920)
    # bar 2 differs from bars 0-1 (the bass stopped); bars 3-7 repeat the bar before them
    assert modes == {"silent_share": 1.0, "loop_score": 5 / 6, "out_of_key": 0.0}
    line = continuation_report(s, 2 * 1920, modes)
    assert "Piano 6" in line and "Bass 0" in line
    assert "Bass silent" in line and "loops" in line


@pytest.mark.parametrize("case", ["missing_prompt", "not_midi", "ckpt_missing_weights", "no_ckpt"])
def test_bad_input_one_line_exit_1(case, ckpt, prompt, tmp_path):
    args = [prompt, "--ckpt", ckpt, "--out", tmp_path / "o"]
    if case == "missing_prompt":
        args[0] = tmp_path / "nope.mid"
    elif case == "not_midi":
        args[0] = tmp_path / "text.mid"
        args[0].write_text("this is not a MIDI file\n")
    elif case == "ckpt_missing_weights":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text((ckpt / "best" / "config.json").read_text())
        args[2] = bad
    elif case == "no_ckpt":
        args[2] = tmp_path / "no_such_run"
    r = run_sample(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_empty_prompt_falls_back_to_bos(ckpt, tmp_path):
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, 90.0))
    s.tracks.append(symusic.Track("empty", 0, False))
    path = tmp_path / "empty.mid"
    s.dump_midi(path)
    r = run_sample(path, "--ckpt", ckpt, "--out", tmp_path / "o", "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr
    assert "has no notes" in r.stderr and "generating from BOS" in r.stderr
    assert (tmp_path / "o" / "empty.mid").is_file()
    r = run_sample(path, "--ckpt", ckpt, "--out", tmp_path / "o", "--max-new-tokens", 20, "--prompt-bars", 2)
    assert "has no notes; generating from BOS" in r.stderr, r.stderr  # not "in its first 2 bars": none at all


def test_broken_and_empty_midi_files_one_line_or_sample(ckpt, broken_midi_files, tmp_path, capsys):
    """Every broken file from the collection either samples or fails with one `error:` line (no traceback)."""
    from midistral import sample

    empty = tmp_path / "zero.mid"
    empty.write_bytes(b"")
    for path in [*broken_midi_files, empty]:
        code = sample.main([str(path), "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--max-new-tokens", "4"])
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert code in (0, 1) and len(err) == (code == 1), (path, err)
        if code == 1:
            assert path.name in err[0]
    assert sample.main([str(empty), "--ckpt", str(ckpt), "--out", str(tmp_path / "o")]) == 1


@pytest.mark.parametrize("what", ["weights", "config", "tokenizer"])
def test_corrupt_checkpoint_one_line(ckpt, tmp_path, capsys, what):
    import shutil

    from midistral import sample

    bad = tmp_path / "run"
    shutil.copytree(ckpt, bad)
    name = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}[what]
    path = bad / "best" / name
    path.write_bytes(path.read_bytes()[:40])
    assert sample.main(["--ckpt", str(bad), "--out", str(tmp_path / "o"), "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and name in err[-1]


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples=0: expected an integer >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens=-5: expected an integer >= 1"),
    (["--temperature", "nan"], "--temperature=nan: expected a number >= 0"),
    (["--temperature", "inf"], "--temperature=inf: expected a number >= 0"),
    (["--top-k", "-1"], "--top-k=-1: expected an integer >= 0"),
    (["--top-p", "0"], "--top-p=0.0: expected a number in (0, 1]"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--prompt-bars", "0"], "--prompt-bars=0: expected an integer >= 1"),
    (["--precision", "fp8"], "argument --precision: 'fp8': expected one of fp32, fp16, bf16, int8"),
    (["--bars", "0"], "argument --bars: '0': expected a number of bars >= 1"),
    (["--bars", "x"], "argument --bars: 'x'"),
    (["--bars", "3:2"], "argument --bars: bars: '3:2' is not a range of bars counted from 1"),
    (["--bars", "a:b"], "argument --bars: bars: 'a:b' is not a bar range"),
    (["--bars", "2:5"], "--bars A:B (a span of the piece) is for --add-track"),
    (["--add-track", "200", "p.mid"], "argument --add-track: program: 200 is outside -1..127"),
    (["--add-track", "33"], "--add-track needs a prompt"),
    (["--add-track", "33", "--replace-track", "0", "p.mid"], "do not go together"),
    (["--add-track", "33", "--bars", "4", "p.mid"], "--bars A:B"),
    (["--add-track", "33", "--programs", "0", "p.mid"], "--programs does not apply"),
    (["--programs", "piano,banjoo"], "unknown instrument 'banjoo'"),
    (["--reject-tries", "0"], "--reject-tries=0: expected an integer >= 1"),
    (["--max-loop-score", "1.5"], "--max-loop-score=1.5: expected a number in [0, 1]"),
    (["--infill", "2-3"], "--infill needs a piece"),
    (["--infill", "3-2", "p.mid"], "argument --infill: '3-2': the first bar is after the last"),
    (["--infill", "0-2", "p.mid"], "argument --infill: '0-2': expected bars A-B, counted from 1"),
    (["--infill", "x", "p.mid"], "argument --infill: 'x': expected bars A-B"),
    (["--infill", "2-3", "--add-track", "33", "p.mid"], "--add-track does not apply"),
    (["--infill", "2-3", "--replace-track", "0", "p.mid"], "--replace-track does not apply"),
    (["--infill", "2-3", "--bars", "4", "p.mid"], "--bars does not apply"),
    (["--infill", "2-3", "--bars", "2:3", "p.mid"], "--bars does not apply"),
    (["--infill", "2-3", "--programs", "0", "p.mid"], "--programs does not apply (--tracks chooses"),
    (["--tracks", "piano", "p.mid"], "--tracks chooses the instruments --infill regenerates"),
    (["--infill", "2-3", "--tracks", "banjoo", "p.mid"], "unknown instrument 'banjoo'"),
])
def test_bad_flags_one_line_exit_1(args, message, capsys):
    from midistral import sample

    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--ckpt", "run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_second_run_keeps_the_first_files_unless_force(ckpt, prompt, tmp_path, capsys):
    from midistral import sample

    out = tmp_path / "o"
    args = [str(prompt), "--ckpt", str(ckpt), "--out", str(out), "--max-new-tokens", "8", "--seed", "1"]
    assert sample.main(args) == 0
    first = (out / "tune.mid").read_bytes()
    assert sample.main(args + ["--temperature", "1.5"]) == 0
    assert (out / "tune.mid").read_bytes() == first and (out / "tune-2.mid").is_file() and (out / "tune-2.png").is_file()
    assert "tune-2.mid" in capsys.readouterr().out  # the printed line names the file written
    assert sample.main(args + ["--num-samples", "2"]) == 0  # other names (tune_0, tune_1): nothing to keep
    assert (out / "tune_0.mid").is_file() and not (out / "tune-2_0.mid").exists()
    assert sample.main(args + ["--force"]) == 0
    assert (out / "tune.mid").read_bytes() == first and not (out / "tune-3.mid").exists()


def test_a_missing_run_says_how_to_train_it(tmp_path, capsys):
    from midistral import sample

    assert sample.main(["--ckpt", "runs/chorales-nowhere"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: runs/chorales-nowhere: no such checkpoint or run folder; train first: "
                   "python train.py --config configs/chorales.toml out_dir=runs/chorales-nowhere")
    assert sample.main(["--ckpt", str(tmp_path / "tiny")]) == 1
    assert f"train first: python train.py --config configs/tiny.toml out_dir={tmp_path / 'tiny'}" in capsys.readouterr().err


def test_bars_progress_and_messages_say_what_happens(ckpt, prompt, tmp_path, capsys):
    from midistral import sample

    assert sample.main([str(prompt), "--ckpt", str(ckpt), "--out", str(tmp_path), "--bars", "1", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "generating 1 bar (at most" in err and "generating at most" not in err and "must fit" not in err


# ----------------------------------------------------------------------------------------------------
# --infill A-B [--tracks NAMES]

@pytest.fixture(scope="module")
def fim_ckpt(tmp_path_factory):
    """A random tiny model whose tokenizer has the fill-in-the-middle tokens (as data.infill > 0 makes it)."""
    import torch

    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI
    from midistral.tokenize.extra import ExtraVocab

    torch.manual_seed(0)
    tok = REMI()
    tok.extra = ExtraVocab(len(tok))
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=1024)
    d = tmp_path_factory.mktemp("fim")
    save_checkpoint(d / "best", Transformer(cfg), tok)
    return d


def seconds_notes(path):
    """(program, drum, onset, duration, pitch, velocity) of every note, times in seconds (rounded to 1 us)."""
    s = symusic.Score(str(path)).to("second")
    return sorted((t.program, t.is_drum, round(n.time, 6), round(n.duration, 6), n.pitch, n.velocity)
                  for t in s.tracks for n in t.notes)


BAR = 3 * 0.6  # the prompt's bars: 3/4 at 100 bpm
SPAN = (BAR, 3 * BAR)  # bars 2-3


@pytest.mark.parametrize("tracks", [None, "drums"])
def test_infill_keeps_the_notes_outside_the_span(fim_ckpt, prompt, tmp_path, capsys, tracks):
    from midistral import sample

    out = tmp_path / "o"
    args = [str(prompt), "--ckpt", str(fim_ckpt), "--out", str(out), "--infill", "2-3", "--num-samples", "2",
            "--seed", "0", "--temperature", "1.0", "--top-k", "0", "--max-new-tokens", "200"]
    assert sample.main(args + (["--tracks", tracks] if tracks else [])) == 0
    printed = capsys.readouterr().out
    assert printed.count("infill bars 2-3: ") == 2
    outside = lambda n: not SPAN[0] - 1e-6 <= n[2] < SPAN[1] - 1e-6  # noqa: E731
    before = seconds_notes(prompt)
    new_total = 0
    for i in range(2):
        after = seconds_notes(out / f"tune_{i}.mid")
        assert [n for n in after if outside(n)] == [n for n in before if outside(n)]  # kept exactly, in seconds
        new = [n for n in after if not outside(n) and n not in before]
        assert all(SPAN[0] - 1e-6 <= n[2] < SPAN[1] - 1e-6 for n in new)  # every new note starts in the span
        if tracks:  # the piano is kept exactly, its span's notes included
            assert [n for n in after if not n[1]] == [n for n in before if not n[1]]
        new_total += len([n for n in after if not outside(n)])
    assert new_total > 0


def test_infill_one_line_errors(fim_ckpt, ckpt, prompt, tmp_path, capsys):
    from midistral import sample

    base = [str(prompt), "--out", str(tmp_path / "o")]
    assert sample.main(base + ["--ckpt", str(fim_ckpt), "--infill", "3-9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {prompt}: bars 3-9: the piece has bars 1-4"
    assert sample.main(base + ["--ckpt", str(fim_ckpt), "--infill", "2-3", "--tracks", "bass"]) == 1
    assert "tracks Electric Bass (finger): not in the piece" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sample.main(base + ["--ckpt", str(ckpt), "--infill", "2-3"]) == 1  # trained without data.infill
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this model was not trained for infilling") and "data.infill = 0.3" in err[-1]
    assert not list((tmp_path / "o").glob("*.mid"))
