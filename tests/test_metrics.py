"""midistral.metrics against muspy 0.5 (the oracle, after adjust_resolution(12)), and hand-computed failure modes."""

import math
import warnings

import numpy as np
import pytest
import symusic

from midistral import metrics

muspy = pytest.importorskip("muspy")


def muspy_music(score: symusic.Score) -> "muspy.Music":
    """The same notes as a muspy Music at 12 ticks per beat (muspy's own rounding), bypassing MIDI parsing."""
    tracks = []
    for t in score.tracks:
        n = t.notes.numpy()
        notes = [muspy.Note(int(a), int(p), int(d), int(v))
                 for a, p, d, v in zip(n["time"], n["pitch"], n["duration"], n["velocity"])]
        tracks.append(muspy.Track(program=t.program, is_drum=t.is_drum, notes=notes))
    music = muspy.Music(resolution=score.ticks_per_quarter, tracks=tracks)
    return music.adjust_resolution(12)


def muspy_metrics(score: symusic.Score) -> dict:
    m = muspy_music(score)
    if not m.tracks:
        return {}
    bar = metrics.measure_resolution(score)
    return {
        "pitch_range": muspy.pitch_range(m), "n_pitches_used": muspy.n_pitches_used(m),
        "n_pitch_classes_used": muspy.n_pitch_classes_used(m), "polyphony": muspy.polyphony(m),
        "polyphony_rate": muspy.polyphony_rate(m), "scale_consistency": muspy.scale_consistency(m),
        "pitch_entropy": muspy.pitch_entropy(m), "pitch_class_entropy": muspy.pitch_class_entropy(m),
        "empty_beat_rate": muspy.empty_beat_rate(m), "empty_measure_rate": muspy.empty_measure_rate(m, bar),
        "groove_consistency": muspy.groove_consistency(m, bar),
        "drum_in_pattern_rate": muspy.drum_in_pattern_rate(m, "duple"),
        "drum_pattern_consistency": muspy.drum_pattern_consistency(m),
    }


def assert_same(score: symusic.Score, label: str) -> None:
    ours = metrics.piece_metrics(score)
    ref = muspy_metrics(score)
    if not any(len(t.notes) and not t.is_drum for t in score.tracks):
        ref.pop("pitch_range", None)  # muspy says -127 for a drums-only piece; we say 0
    for name, want in ref.items():
        got = ours[name]
        assert (math.isnan(want) and math.isnan(got)) or abs(got - want) <= 1e-6, f"{label}: {name} {got} != muspy {want}"


def make_score(tpq: int, tracks, time_signature=None) -> symusic.Score:
    """tracks: list of (program, is_drum, [(time, duration, pitch), ...])."""
    s = symusic.Score(tpq)
    if time_signature:
        s.time_signatures.append(symusic.TimeSignature(0, *time_signature))
    for program, is_drum, notes in tracks:
        t = symusic.Track(program=program, is_drum=is_drum)
        for time, dur, pitch in notes:
            t.notes.append(symusic.Note(time, dur, pitch, 80))
        s.tracks.append(t)
    return s


def test_real_files_equal_muspy(dev_midi_files):
    assert dev_midi_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in dev_midi_files:
            assert_same(symusic.Score(path), path.name)


def random_score(seed: int) -> symusic.Score:
    rng = np.random.default_rng(seed)
    tpq = int(rng.choice([24, 96, 480, 7]))  # 24 and 7 make half-tick roundings at 12 ticks per beat
    tracks = []
    for _ in range(rng.integers(1, 4)):
        n = int(rng.integers(0, 60))
        notes = list(zip(rng.integers(0, tpq * 32, n).tolist(), rng.integers(0, tpq * 3, n).tolist(),
                         rng.integers(30, 90, n).tolist()))
        tracks.append((int(rng.integers(0, 128)), bool(rng.random() < 0.3), notes))
    ts = [None, (4, 4), (3, 4), (6, 8), (5, 8)][seed % 5]
    return make_score(tpq, tracks, ts)


@pytest.mark.parametrize("seed", range(40))
def test_random_scores_equal_muspy(seed):
    assert_same(random_score(seed), f"seed {seed}")


@pytest.mark.parametrize("case", ["empty", "no_tracks", "drums_only", "zero_durations", "one_note", "same_pitch_overlap"])
def test_edge_cases_equal_muspy(case):
    tracks = {
        "empty": [(0, False, [])],
        "no_tracks": [],
        "drums_only": [(0, True, [(0, 6, 36), (6, 6, 38), (13, 6, 42)])],
        "zero_durations": [(0, False, [(0, 0, 60), (12, 0, 62), (24, 12, 64)])],
        "one_note": [(0, False, [(5, 30, 60)])],
        "same_pitch_overlap": [(0, False, [(0, 24, 60), (12, 24, 60)]), (1, False, [(6, 6, 60)])],
    }[case]
    score = make_score(12, tracks)
    assert_same(score, case)
    if case in ("empty", "no_tracks"):
        assert metrics.piece_metrics(score)["pitch_range"] == 0


def test_pitch_in_scale_rate_equals_muspy():
    score = random_score(3)
    m = muspy_music(score)
    for mode in ("major", "minor"):
        for root in range(12):
            assert metrics.pitch_in_scale_rate(score, root, mode) == pytest.approx(muspy.pitch_in_scale_rate(m, root, mode), abs=1e-12)


def test_notes_per_bar_by_hand():
    # 3/4 at 12 ticks per beat: a bar is 36 ticks; 5 notes ending at tick 80 -> 3 bars (ceil(80 / 36))
    score = make_score(12, [(0, False, [(0, 12, 60), (12, 12, 62), (40, 12, 64), (70, 10, 65)]), (0, True, [(0, 6, 36)])], (3, 4))
    assert metrics.notes_per_bar(score) == pytest.approx(5 / 3)
    assert math.isnan(metrics.notes_per_bar(make_score(12, [(0, False, [])])))


# failure modes: 4/4 at 12 ticks per beat, a bar is 48 ticks
A = [(0, 12, 60), (12, 12, 64), (24, 24, 67)]
B = [(0, 24, 62), (24, 24, 65)]
C = [(0, 48, 59)]


def bars_of(*patterns, program=0):
    return [(48 * i + t, d, p) for i, pat in enumerate(patterns) for t, d, p in pat]


def test_loop_score_by_hand():
    looping = make_score(12, [(0, False, bars_of(A, A, A, A))])
    assert metrics.failure_modes(looping)["loop_score"] == pytest.approx(3 / 4)  # bars 1, 2, 3 repeat bar 0
    assert metrics.failure_modes(looping, start_tick=48)["loop_score"] == 1.0
    two_back = make_score(12, [(0, False, bars_of(A, B, A, C))])
    assert metrics.failure_modes(two_back)["loop_score"] == pytest.approx(1 / 4)  # bar 2 repeats bar 0
    fresh = make_score(12, [(0, False, bars_of(A, B, C, [(0, 12, 72)]))])
    assert metrics.failure_modes(fresh)["loop_score"] == 0.0
    # an empty bar is no repeat of an empty bar; ticks in another resolution are rescaled first
    gaps = make_score(24, [(0, False, [(t * 2, d * 2, p) for t, d, p in bars_of(A, [], [], B)])])
    assert metrics.failure_modes(gaps)["loop_score"] == 0.0
    assert metrics.failure_modes(gaps, start_tick=96)["loop_score"] == 0.0


def test_silent_share_by_hand():
    melody = (0, False, bars_of(A, B, C, A))
    bass_two_bars = (33, False, bars_of([(0, 48, 40)], [(0, 48, 43)]))
    score = make_score(12, [melody, bass_two_bars])
    assert metrics.failure_modes(score, start_tick=96)["silent_share"] == 1.0  # the bass of the prompt stops
    assert metrics.failure_modes(score, start_tick=96, prompt_programs=[0])["silent_share"] == 0.0
    assert metrics.failure_modes(score)["silent_share"] == pytest.approx(2 / 4)  # no prompt: every instrument
    held = make_score(12, [melody, (33, False, [(0, 48, 40), (48, 96, 43)])])  # a note held over bars 1 and 2
    assert metrics.failure_modes(held, start_tick=96)["silent_share"] == pytest.approx(1 / 2)
    drums = make_score(12, [melody, (0, True, bars_of([(0, 6, 36)], [], [(0, 6, 36)], []))])
    assert metrics.failure_modes(drums, prompt_programs=[-1])["silent_share"] == pytest.approx(2 / 4)


def test_out_of_key_by_hand():
    # C E G C F F A D B F#: C major holds 9 of 10, G major 8 (no F) -> the key is C major, F# is out
    pitches = [60, 64, 67, 72, 65, 65, 69, 62, 71, 66]
    score = make_score(12, [(0, False, [(12 * i, 12, p) for i, p in enumerate(pitches)]), (0, True, [(0, 6, 37)])])
    assert metrics.failure_modes(score)["out_of_key"] == pytest.approx(0.1)
    assert metrics.failure_modes(score, start_tick=12 * 9)["out_of_key"] == 1.0  # only the F# is generated
    assert metrics.failure_modes(score, start_tick=12 * 8)["out_of_key"] == pytest.approx(0.5)
    assert metrics.failure_modes(make_score(12, [(0, False, [])])) == {"silent_share": 0.0, "loop_score": 0.0, "out_of_key": 0.0}
