"""midistral.sampler.Sampler: one load, prompts as path / bytes / Score, same seed same output, one-line
errors for bad prompts, and rejection of failure modes (a looping sample is generated again, a good one kept)."""

import numpy as np
import pytest
import symusic
import torch

from conftest import score_of
from midistral import music, sampler as sampler_module
from midistral.errors import CheckpointError, ConfigError, MidiError, MidistralError
from midistral.metrics import failure_modes
from midistral.sampler import Sampler, rejection_reasons
from midistral.sampling import RejectionLimits
from midistral.tokenize.remi import Family

BAR = 1920


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def smp(run_dir):
    return Sampler.load(run_dir)


def piece(bar_pitches, program=0, ts=(4, 4)):
    """One track, one bar per entry of `bar_pitches`: that bar's pitches as quarter notes."""
    s = symusic.Score(480)
    s.tempos.append(symusic.Tempo(0, 100.0))
    s.time_signatures.append(symusic.TimeSignature(0, *ts))
    t = symusic.Track("", program, False)
    for b, pitches in enumerate(bar_pitches):
        for i, p in enumerate(pitches):
            t.notes.append(symusic.Note(b * BAR + i * 480, 480, p, 80))
    s.tracks.append(t)
    return s


@pytest.fixture(scope="module")
def prompt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "tune.mid"
    piece([[60, 62, 64, 65], [67, 65, 64, 62], [60, 64, 67, 72]]).dump_midi(path)
    return path


def test_load_resolves_run_folder_once(smp, run_dir):
    assert smp.ckpt == run_dir / "best" and smp.context == 256
    with pytest.raises(CheckpointError, match="no_such_run"):
        Sampler.load(run_dir / "no_such_run")


@pytest.mark.slow
def test_precision_choice(smp, run_dir, prompt_path):
    from midistral.model.precision import SMALL_MODEL_WEIGHTS, available_precisions, default_precision

    # the test run's model is small (its weights stay in cache): it samples in exact fp32 by default
    assert smp.model.config.decode_weights < SMALL_MODEL_WEIGHTS and smp.precision == "fp32"
    assert default_precision("cpu", smp.model.config.decode_weights) == "fp32"
    assert default_precision("cpu", SMALL_MODEL_WEIGHTS) == default_precision() in available_precisions()
    with pytest.raises(ConfigError, match="'fp8'") as e:
        Sampler.load(run_dir, precision="fp8")
    assert "\n" not in str(e.value)
    for precision in available_precisions():
        other = Sampler.load(run_dir, precision=precision)
        assert other.model.decode_precision == precision  # only the decode copy is kept
        a, b = (other.sample(prompt_path, max_new_tokens=16, seed=2)[0] for _ in range(2))
        assert a.midi_bytes() == b.midi_bytes() and a.skipped == 0


@pytest.mark.slow
def test_same_seed_same_output_for_path_bytes_and_score(smp, prompt_path):
    kw = dict(num_samples=2, max_new_tokens=24, seed=7)
    by_path = smp.sample(prompt_path, **kw)
    assert [s.midi_bytes() for s in by_path] == [s.midi_bytes() for s in smp.sample(prompt_path, **kw)]
    by_bytes = smp.sample(prompt_path.read_bytes(), **kw)
    by_score = smp.sample(symusic.Score(str(prompt_path)), **kw)
    for a, b, c in zip(by_path, by_bytes, by_score):
        assert a.midi_bytes() == b.midi_bytes() == c.midi_bytes()
    other = smp.sample(prompt_path, **{**kw, "seed": 8})
    assert [s.midi_bytes() for s in other] != [s.midi_bytes() for s in by_path]


def test_sample_fields(smp, prompt_path):
    steps = []
    (s,) = smp.sample(prompt_path, max_new_tokens=20, seed=1, on_progress=lambda i, n: steps.append((i, n)))
    assert s.n_tokens <= 20 and steps == [(i, 20) for i in range(1, len(steps) + 1)] and len(steps) >= s.n_tokens
    want = symusic.Score(str(prompt_path))
    # the prompt (3 bars, 12 notes) is at the start, its tempo and meter kept, tracks named; the
    # continuation may add notes at the prompt's last onset (a chord), never before it
    notes = sorted((n.time * 480 // s.score.tpq, n.pitch) for t in s.score.tracks for n in t.notes)
    prompt_notes = sorted((n.time, n.pitch) for t in want.tracks for n in t.notes)
    last_onset = prompt_notes[-1][0]
    assert [x for x in notes if x[0] < last_onset] == [x for x in prompt_notes if x[0] < last_onset]
    assert set(prompt_notes) <= set(notes)
    assert s.start_tick * 480 // s.score.tpq == 3 * BAR
    assert abs(s.score.tempos[0].qpm - 100) < 1 and s.score.tracks[0].name == "Acoustic Grand Piano"
    assert set(s.metrics) == {"silent_share", "loop_score", "out_of_key"}
    assert "bars" in s.line and "skipped" in s.line and "loops" in s.line and "\n" not in s.line
    assert s.report.startswith("continuation: ") and s.rejected == []
    assert symusic.Score.from_midi(s.midi_bytes()).note_num() == s.score.note_num()
    assert s.piano_roll_png("t")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_grammar_on_by_default_nothing_skipped(smp, prompt_path):
    """The grammar mask leaves the decoder nothing to skip, even on a random model; without it, tokens are
    skipped (the random model writes ungrammatical sequences)."""
    free = smp.sample(None, num_samples=4, max_new_tokens=60, seed=0, grammar=False)
    assert sum(s.skipped for s in free) > 0
    for prompt in (None, prompt_path):
        for seed in range(3):
            assert [s.skipped for s in smp.sample(prompt, num_samples=4, max_new_tokens=60, seed=seed)] == [0] * 4


class BarLeaning(torch.nn.Module):
    """A model (cache protocol) whose logits favour Bar tokens, so a random model reaches bar lines soon."""

    def __init__(self, inner, tok):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.bias = torch.from_numpy((tok.family == Family.BAR).astype(np.float32) * 4.0)

    def forward(self, ids, targets=None, *, cache=None, start_pos=0, last_only=False):
        logits = self.inner(ids, cache=cache, start_pos=start_pos, last_only=last_only)
        return logits + self.bias.to(logits.dtype)


@pytest.mark.slow
def test_programs_and_bars(smp, prompt_path):
    """Only the asked instruments in the continuation; exactly the asked number of new bars."""
    for seed in range(2):
        for s in smp.sample(None, num_samples=3, max_new_tokens=80, seed=seed, programs="bass,drums"):
            assert {(t.program, t.is_drum) for t in s.score.tracks if len(t.notes)} <= {(33, False), (0, True)}
    # the prompt fills 3 bars: the last note starts in bar 3 + n_bars (a model leaning to Bar tokens gets
    # there inside the context; a row that ran out of context would not count, but every row must end)
    bars_smp = Sampler(BarLeaning(smp.model, smp.tok), smp.tok, precision="fp32")
    for n_bars in (1, 2, 5):
        samples = bars_smp.sample(prompt_path, num_samples=3, bars=n_bars, seed=n_bars, temperature=1.0, top_k=0)
        assert all(s.ended and s.skipped == 0 for s in samples)
        for s in samples:
            last_onset = max(n.time for t in s.score.tracks for n in t.notes)
            assert int((s.score.get_downbeats() <= last_onset).sum()) == 3 + n_bars
            assert music.n_bars(s.score) == 3 + n_bars  # and no note rings on past the last bar
            new = [(t.program, n.time, n.pitch) for t in s.score.tracks for n in t.notes if n.time >= s.start_tick]
            assert len(new) == len(set(new))  # one note per instrument, onset and pitch
    with pytest.raises(MidistralError, match="unknown instrument 'banjoo'"):
        smp.sample(None, programs="piano,banjoo")
    with pytest.raises(MidistralError, match="bars=0: expected an integer >= 1"):
        smp.sample(None, bars=0)


def notes_of(score, skip_program=None):
    """(program, is_drum, onset, pitch, duration, velocity) of every note, in ticks at 480 per quarter."""
    f = 480 / score.tpq
    return sorted((t.program, t.is_drum, round(n.time * f), n.pitch, round(n.duration * f), n.velocity)
                  for t in score.tracks if (-1 if t.is_drum else t.program) != skip_program for n in t.notes)


@pytest.mark.slow
def test_accompany_adds_one_track_and_keeps_every_note(smp, prompt_path):
    want = notes_of(symusic.Score(str(prompt_path)))
    runs = [smp.accompany(prompt_path, "bass", num_samples=2, seed=4) for _ in range(2)]
    assert [s.midi_bytes() for s in runs[0]] == [s.midi_bytes() for s in runs[1]]
    for s in runs[0]:
        new = s.score.tracks[s.new_track]
        assert (new.program, new.is_drum, new.name) == (33, False, "Electric Bass (finger)")
        assert notes_of(s.score, skip_program=33) == want
        assert set(s.metrics) == {"silent_share", "loop_score", "out_of_key"} and s.start_tick == 0
        assert s.report.startswith(f"new track: Electric Bass (finger) {len(new.notes)} notes")
        assert s.piano_roll_png("acc")[:4] == b"\x89PNG"
    duet = symusic.Score(str(prompt_path))
    bass = symusic.Track("", 33, False)
    for b in range(3):
        bass.notes.append(symusic.Note(b * BAR, BAR, 36 + b, 70))
    duet.tracks.append(bass)
    (r,) = smp.accompany(duet.dumps_midi(), 33, replace=True, seed=4, bars="2:3", prompt_name="duet.mid")
    assert notes_of(r.score, skip_program=33) == want and r.score.tracks[r.new_track].program == 33
    assert all(BAR * r.score.tpq // 480 <= n.time for n in r.score.tracks[r.new_track].notes)  # bars 2-3 only


def test_accompany_adds_an_absent_instrument_to_the_trio_example(smp):
    """The README's true addition: examples/trio.mid (a chorale's soprano, alto, tenor) + a cello; the trio's
    notes are kept exactly, note by note, against symusic's reading of the file."""
    from conftest import ROOT

    path = ROOT / "examples" / "trio.mid"
    want = notes_of(symusic.Score(str(path)))
    assert {p for p, *_ in want} == {40, 41, 71}  # violin, viola, clarinet: no cello
    (s,) = smp.accompany(path, "cello", seed=0)
    new = s.score.tracks[s.new_track]
    assert (new.program, new.name) == (42, "Cello") and s.new_track == 3
    assert notes_of(s.score, skip_program=42) == want


def test_accompany_mistakes(smp, prompt_path, tmp_path):
    with pytest.raises(MidistralError, match="already plays") as e:
        smp.accompany(prompt_path, "piano")
    assert "\n" not in str(e.value)
    with pytest.raises(MidistralError, match="unknown instrument 'banjoo'"):
        smp.accompany(prompt_path, "banjoo")
    with pytest.raises(MidistralError, match="empty.mid: has no notes"):
        smp.accompany(symusic.Score(480), 33, prompt_name="empty.mid")
    with pytest.raises(MidiError, match="nope.mid: no such file"):
        smp.accompany(tmp_path / "nope.mid", 33)


def test_no_prompt_and_empty_prompt(smp):
    (s,) = smp.sample(None, max_new_tokens=10, seed=0)
    assert s.start_tick == 0 and s.metrics["silent_share"] == 0.0
    notes = []
    smp.log = notes.append
    try:
        (e,) = smp.sample(symusic.Score(480), max_new_tokens=10, seed=0, prompt_name="empty.mid")
    finally:
        smp.log = lambda msg: None
    assert e.midi_bytes() == s.midi_bytes()
    assert any("empty.mid has no notes; generating from BOS" in n for n in notes)


@pytest.mark.parametrize("prompt, match", [
    (b"RIFF....", "<bytes>: a RIFF MIDI"),
    (b"not midi at all", "<bytes>: not a MIDI file"),
    (b"", "<bytes>: empty file"),
    (b"MThd\x00\x00\x00\x06\x00\x01", "<bytes>: unreadable MIDI"),
    (42, "expected a path, MIDI bytes or a symusic.Score"),
])
def test_bad_prompt_one_line_error(smp, prompt, match):
    with pytest.raises(MidiError, match=match) as e:
        smp.sample(prompt, max_new_tokens=5)
    assert "\n" not in str(e.value)


def test_bad_prompt_names_the_file(smp, tmp_path):
    with pytest.raises(MidiError, match="nope.mid: no such file"):
        smp.sample(tmp_path / "nope.mid", max_new_tokens=5)
    text = tmp_path / "text.mid"
    text.write_text("hello\n")
    with pytest.raises(MidiError, match="text.mid: not a MIDI file"):
        smp.sample(text, max_new_tokens=5)
    with pytest.raises(MidiError, match="upload.mid: not a MIDI file"):
        smp.sample(b"hello", max_new_tokens=5, prompt_name="upload.mid")


# ----------------------------------------------------------------------------------------------------
# Rejection, and the failure modes it relies on (midistral.metrics) on hand-computed scores




def test_loop_score_counts_bars_repeating_one_of_the_previous_two():
    # bars: A B A B C C D (7 bars): bar 2 = bar 0, bar 3 = bar 1, bar 5 = bar 4 -> 3 of 7
    pattern = {"A": [60, 64], "B": [62, 65], "C": [67], "D": [69, 72]}
    notes = [(b * BAR + i * 480, 480, p) for b, name in enumerate("ABABCCD")
             for i, p in enumerate(pattern[name])]
    s = score_of({(0, False): notes})
    assert failure_modes(s)["loop_score"] == pytest.approx(3 / 7)
    # from bar 4 on: bars 4, 5, 6 are the continuation; bar 5 repeats bar 4 -> 1 of 3
    assert failure_modes(s, start_tick=4 * BAR)["loop_score"] == pytest.approx(1 / 3)


def test_loop_ignores_empty_bars_and_sees_durations():
    notes = [(0, 480, 60), (3 * BAR, 480, 60), (4 * BAR, 960, 60)]  # bars 1-2 silent; bar 4 longer note
    assert failure_modes(score_of({(0, False): notes}))["loop_score"] == 0.0


def test_silent_share_counts_sustained_notes_as_sounding():
    piano = [(b * BAR, 480, 60 + b) for b in range(4)]
    bass = [(0, 480, 40), (BAR, 2 * BAR, 41)]  # plays in bar 0, then holds through bars 1-2, silent in bar 3
    s = score_of({(0, False): piano, (33, False): bass})
    modes = failure_modes(s, start_tick=BAR // 2, prompt_programs=[0, 33])
    # continuation bars 1, 2, 3 (bar lines at or after start_tick): only bar 3 has the bass silent
    assert modes["silent_share"] == pytest.approx(1 / 3)
    # default prompt instruments: those with a note before start_tick (both here)
    assert failure_modes(s, start_tick=BAR // 2) == modes
    # an instrument of the prompt that has no track at all is silent everywhere
    assert failure_modes(s, BAR // 2, prompt_programs=[-1])["silent_share"] == 1.0
    assert failure_modes(s, BAR // 2, prompt_programs=[])["silent_share"] == 0.0


def test_out_of_key_uses_best_scale_and_skips_drums():
    d_major = [62, 64, 66, 67, 69, 71, 73, 74]
    notes = [(i * 480, 480, p) for i, p in enumerate(d_major + [65, 72])]  # F and C are outside D major
    drums = [(i * 480, 120, 37) for i in range(40)]
    s = score_of({(0, False): notes, (0, True): drums})
    assert failure_modes(s)["out_of_key"] == pytest.approx(2 / 10)
    assert failure_modes(symusic.Score(480)) == {"silent_share": 0.0, "loop_score": 0.0, "out_of_key": 0.0}




LOOPING = [[60, 64, 67, 72]] * 8                                      # the same bar 8 times
C_MAJOR = [60, 62, 64, 65, 67, 69, 71, 72]
GOOD = [[C_MAJOR[(b + i * 3) % 8] for i in range(4)] for b in range(8)]  # in C major, no bar repeats


def test_rejection_reasons_on_crafted_scores():
    looping, good = failure_modes(piece(LOOPING)), failure_modes(piece(GOOD))
    assert looping["loop_score"] == pytest.approx(7 / 8) and good["loop_score"] == 0.0
    assert rejection_reasons(looping) == [f"loops 88% > {RejectionLimits().max_loop_score:.0%}"]
    assert rejection_reasons(good) == []
    assert rejection_reasons(looping, RejectionLimits(max_loop_score=0.9)) == []
    assert rejection_reasons({"silent_share": 0.5, "loop_score": 0, "out_of_key": 0.4}) == [
        "silent 50% > 25%", "out-of-key 40% > 15%"]


class ScriptedGenerate:
    """Stands in for generate(): each call continues every row with the next scripted token sequence."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts, self.calls = tok, list(scripts), []

    def __call__(self, model, prompt, max_new_tokens, **kw):
        self.calls.append(kw["seed"])
        new = list(self.tok.encode(self.scripts.pop(0))) + [self.tok.eos_id]
        return torch.cat([prompt, torch.tensor(new)[None].repeat(len(prompt), 1)], 1)


def test_reject_regenerates_a_looping_sample_and_keeps_a_good_one(smp, monkeypatch):
    fake = ScriptedGenerate(smp.tok, [piece(LOOPING), piece(GOOD)])
    monkeypatch.setattr(sampler_module, "generate", fake)
    (s,) = smp.sample(None, max_new_tokens=200, seed=3, reject=True)
    assert len(fake.calls) == 2 and fake.calls[0] == 3 and fake.calls[1] != 3
    assert s.metrics["loop_score"] == 0.0 and s.rejected == ["try 1: loops 88% > 50%"]
    assert "rejected try 1: loops 88% > 50%" in s.report and "no try passed" not in s.report


def test_without_reject_the_looping_sample_is_kept_and_flagged(smp, monkeypatch):
    fake = ScriptedGenerate(smp.tok, [piece(LOOPING)])
    monkeypatch.setattr(sampler_module, "generate", fake)
    (s,) = smp.sample(None, max_new_tokens=200, seed=3)
    assert len(fake.calls) == 1 and s.metrics["loop_score"] == pytest.approx(7 / 8)
    assert s.rejected == [] and "loops 88% > 50%" in s.report


def test_reject_gives_up_after_the_tries_and_says_so(smp, monkeypatch):
    fake = ScriptedGenerate(smp.tok, [piece(LOOPING)] * 3)
    monkeypatch.setattr(sampler_module, "generate", fake)
    (s,) = smp.sample(None, max_new_tokens=200, seed=3, reject=True, limits=RejectionLimits(reject_tries=3))
    assert len(fake.calls) == 3 and len(set(fake.calls)) == 3 and len(s.rejected) == 2
    assert "no try passed, kept the last" in s.report


def test_reject_keeps_a_good_first_try(smp, monkeypatch):
    fake = ScriptedGenerate(smp.tok, [piece(GOOD)])
    monkeypatch.setattr(sampler_module, "generate", fake)
    (s,) = smp.sample(None, max_new_tokens=200, seed=3, reject=True)
    assert len(fake.calls) == 1 and s.rejected == [] and s.metrics["loop_score"] == 0.0
