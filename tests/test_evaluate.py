"""midistral.evaluate: OA/KL against scipy's gaussian_kde (the oracle), set-level properties, the CLI."""

import json

import numpy as np
import pytest
import symusic

from midistral import evaluate

stats = pytest.importorskip("scipy.stats")


def scipy_oa_kl(a, b):
    """OA and KL(a || b) of scipy's gaussian_kde (Scott's rule) integrated on a fine grid."""
    ka, kb = stats.gaussian_kde(a), stats.gaussian_kde(b)
    lo = min(a.min(), b.min()) - 6 * max(a.std(), b.std())
    hi = max(a.max(), b.max()) + 6 * max(a.std(), b.std())
    x = np.linspace(lo, hi, 20001)
    p, q = ka(x), kb(x)
    return np.trapezoid(np.minimum(p, q), x), np.trapezoid(p * np.log(p / q), x)


@pytest.mark.parametrize("seed", range(5))
def test_oa_and_kl_match_scipy_kde(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, 40 + seed)
    b = rng.normal(0.7 * seed / 4, 1 + seed / 4, 30)
    oa, kl = scipy_oa_kl(a, b)
    assert evaluate.overlap_area(a, b) == pytest.approx(oa, abs=2e-3)
    assert evaluate.kl_divergence(a, b) == pytest.approx(kl, abs=5e-3)


def test_oa_of_a_set_with_itself_is_one_and_of_disjoint_sets_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(5, 2, 50)
    assert evaluate.overlap_area(a, a) == pytest.approx(1.0, abs=1e-3)
    assert evaluate.kl_divergence(a, a) == pytest.approx(0.0, abs=1e-9)
    assert evaluate.overlap_area(a, a + 1000) < 1e-3
    assert evaluate.kl_divergence(a, a + 1000) > 10
    # constant sets: the same constant overlaps fully, two different constants not at all
    assert evaluate.overlap_area(np.zeros(5), np.zeros(7)) == 1.0
    assert evaluate.overlap_area(np.zeros(5), np.ones(7)) < 1e-3


def test_a_constant_set_borrows_the_other_sets_bandwidth():
    """Real chorales all have empty_beat_rate 0: a constant set. It is smoothed with the generated set's kernel
    (scipy's, the oracle), so OA is about the share of generated pieces at the constant."""
    real = np.zeros(41)
    gen = np.r_[np.zeros(17), 0.02, 0.03, 0.06]
    kde = stats.gaussian_kde(gen)
    bw = np.sqrt(kde.covariance[0, 0])
    x = np.linspace(-0.1, 0.2, 200001)
    p = np.exp(-0.5 * (x / bw) ** 2) / (bw * np.sqrt(2 * np.pi))
    q = kde(x)
    assert evaluate.overlap_area(real, gen) == pytest.approx(np.trapezoid(np.minimum(p, q), x), abs=2e-3)
    assert evaluate.overlap_area(gen, real) == pytest.approx(evaluate.overlap_area(real, gen), abs=1e-9)
    assert evaluate.kl_divergence(real, gen) == pytest.approx(np.trapezoid(p * np.log(p / q), x), abs=5e-3)
    # far outliers: OA is the share of the other set at the constant; all at the constant: 1
    assert evaluate.overlap_area(np.zeros(41), np.r_[np.zeros(17), 1.0, 1.1, 1.2]) == pytest.approx(0.85, abs=5e-3)
    assert evaluate.overlap_area(np.zeros(41), np.zeros(20)) == 1.0


def write_piece(path, seed, tpq=480, pitch_shift=0):
    """A four-voice chorale-like piece: a bar of 4/4 chords per two seconds, pitches from the seed."""
    rng = np.random.default_rng(seed)
    s = symusic.Score(tpq)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    for voice, base in enumerate((72, 64, 57, 48)):
        t = symusic.Track(program=[73, 68, 71, 70][voice])
        for beat in range(32):
            t.notes.append(symusic.Note(beat * tpq, tpq, int(base + pitch_shift + rng.integers(-4, 5)), 80))
        s.tracks.append(t)
    s.dump_midi(str(path))


def make_set(folder, seeds, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        write_piece(folder / f"p{s}.mid", s, **kw)
    return folder


def test_set_comparison_identical_and_different_sets(tmp_path):
    real = evaluate.measure_set(evaluate.midi_files(make_set(tmp_path / "real", range(12)), "x"))
    same = evaluate.compare(real, real)
    assert all(r["oa"] == pytest.approx(1.0, abs=1e-3) for r in same["rows"])
    assert same["pitch_class_distance"]["intra_real_mean"] > 0
    high = evaluate.measure_set(evaluate.midi_files(make_set(tmp_path / "high", range(12), pitch_shift=30), "x"))
    shifted = {r["metric"]: r["oa"] for r in evaluate.compare(real, high)["rows"]}
    assert shifted["pitch_range"] == pytest.approx(1.0, abs=0.05)  # a transposition keeps the range
    assert "drum_in_pattern_rate" not in shifted  # undefined without drums: not compared


def test_cli_writes_the_report(tmp_path, capsys):
    gen, real = make_set(tmp_path / "gen", range(6)), make_set(tmp_path / "real", range(10, 18), tpq=96)
    assert evaluate.main([str(gen), "--reference", str(real), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| pitch_entropy |" in report and "mean OA" in report
    assert (tmp_path / "rep" / "distributions.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["n_real"] == 8
    assert "pieces/s" in capsys.readouterr().out


def test_cli_run_folder_reference_uses_the_test_split(tmp_path, capsys):
    pieces = make_set(tmp_path / "pieces", range(10))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    test_files = [str(pieces / f"p{i}.mid") for i in (1, 4, 7)]
    manifest = {"counts": {"test": {"files": 3, "files_list": test_files},
                           "train": {"files": 7, "files_list": [str(pieces / "p0.mid")]}}}
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate.main([str(pieces), "--reference", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["n_real"] == 3
    assert "test split of" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "no_midi", "reference_missing", "run_without_test_split"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    good = make_set(tmp_path / "good", range(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no music here")
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "manifest.json").write_text(json.dumps({"counts": {"test": {"files_list": []}}}))
    gen, ref = {"missing": (tmp_path / "nope", good), "empty": (tmp_path / "empty", good),
                "no_midi": (tmp_path / "texts", good), "reference_missing": (good, tmp_path / "nope"),
                "run_without_test_split": (good, tmp_path / "run")}[case]
    assert evaluate.main([str(gen), "--reference", str(ref)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
