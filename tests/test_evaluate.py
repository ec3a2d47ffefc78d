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


def test_constant_real_set_rule_through_compare(tmp_path):
    """The rule for a constant real set (every real piece at one value, as empty_beat_rate 0 for chorales): OA is
    the share of generated pieces at that value when the others are far from it (the constant borrows the
    generated set's bandwidth); two constant sets: 1 if equal, about 0 if not; KL 0 for equal sets."""
    for at_constant in (10, 17, 20):
        gen = np.r_[np.zeros(at_constant), np.linspace(1.0, 1.3, 20 - at_constant)]
        assert evaluate.overlap_area(np.zeros(41), gen) == pytest.approx(at_constant / 20, abs=0.05)
    assert evaluate.overlap_area(np.full(8, 3.0), np.full(5, 3.0)) == 1.0
    assert evaluate.kl_divergence(np.full(8, 3.0), np.full(5, 3.0)) == 0.0
    assert evaluate.overlap_area(np.full(8, 3.0), np.full(5, 4.0)) < 1e-3
    # through compare: real pieces without empty beats, generated ones with a gap in 3 of 12
    real = evaluate.measure_set(evaluate.midi_files(make_set(tmp_path / "real", range(12)), "x"))
    gaps = make_set(tmp_path / "gen", range(12))
    for k in range(3):
        s = symusic.Score(str(gaps / f"p{k}.mid"))
        for t in s.tracks:
            t.notes = [n for n in t.notes if not 8 * s.ticks_per_quarter <= n.time < 12 * s.ticks_per_quarter]
        s.dump_midi(str(gaps / f"p{k}.mid"))
    gen = evaluate.measure_set(evaluate.midi_files(gaps, "x"))
    assert (real.values["empty_beat_rate"] == 0).all()
    row = {r["metric"]: r for r in evaluate.compare(real, gen)["rows"]}["empty_beat_rate"]
    assert row["oa"] == pytest.approx(9 / 12, abs=0.05)


def bars_piece(bars, tpq=480, shift=0, program=0, split_tracks=False):
    """A 4/4 piece with one bar per item of `bars`, each a list of (beat, pitch) quarter notes."""
    s = symusic.Score(tpq)
    tracks = [symusic.Track(program=program), symusic.Track(program=program + 1)]
    for b, content in enumerate(bars):
        for k, (beat, pitch) in enumerate(content):
            tracks[k % 2 if split_tracks else 0].notes.append(symusic.Note(b * 4 * tpq + beat * tpq, tpq, pitch + shift, 80))
    s.tracks.extend(t for t in tracks if len(t.notes))
    return s


def random_bars(rng, n):
    return [[(beat, int(rng.integers(48, 84))) for beat in range(4)] for _ in range(n)]


def test_bar_hashes_are_sets_of_onsets_and_pitches():
    from midistral.metrics import bar_hashes

    rng = np.random.default_rng(1)
    bars = random_bars(rng, 6)
    h = bar_hashes(bars_piece(bars))
    assert len(h) == 6 and len(set(h.tolist())) == 6 and h.all()
    assert (bar_hashes(bars_piece(bars, tpq=96, split_tracks=True, program=40)) == h).all()  # tracks, tpq, programs
    assert not (bar_hashes(bars_piece(bars, shift=1)) == h).any()  # another pitch: another bar
    doubled = bars_piece([b + b for b in bars])  # every note twice: the same set
    assert (bar_hashes(doubled) == h).all()
    gap = bars_piece(bars[:2] + [[]] + bars[2:])
    assert bar_hashes(gap)[2] == 0 and (bar_hashes(gap)[[0, 1, 3]] == h[[0, 1, 2]]).all()
    assert (bar_hashes(bars_piece(bars), start_tick=2 * 4 * 480) == h[2:]).all()
    assert (bar_hashes(bars_piece(bars), max_bars=3) == h[:3]).all()


def test_copy_index_share_and_longest_run_from_one_piece(tmp_path):
    from midistral.metrics import CopyIndex, bar_hashes, copying_reasons

    rng = np.random.default_rng(2)
    a, b = random_bars(rng, 12), random_bars(rng, 12)
    index = CopyIndex.from_bars([bar_hashes(bars_piece(a)), bar_hashes(bars_piece(b))])
    assert index.n_pieces == 2 and len(index.hashes) == 24
    fresh = random_bars(rng, 5)
    cases = [(a, 1.0, 12), (fresh, 0.0, 0),
             (a[2:5] + fresh[:1] + b[0:2] + a[7:8], 6 / 7, 3),  # runs of 3, 2, 1: the longest counts
             (a[2:4] + a[6:8], 1.0, 2),                         # consecutive here, not in the training piece
             (a[3:5] + b[5:7], 1.0, 2),                         # two pieces, two bars each: no run of 4
             (a[0:1] + a[0:1] + a[1:2], 1.0, 2)]                # a bar twice, then its successor
    for bars, share, run in cases:
        got = index.copying(bars_piece(bars))
        assert got == {"copied_bars": pytest.approx(share), "copied_run": run}, (share, run, got)
    transposed = index.copying(bars_piece(a, shift=2))
    assert transposed == {"copied_bars": 0.0, "copied_run": 0}
    # only the continuation: from the third bar on
    assert index.copying(bars_piece(fresh[:2] + a[4:9]), start_tick=2 * 4 * 480)["copied_run"] == 5
    assert copying_reasons({"copied_run": 4.0}) and not copying_reasons({"copied_run": 3.0})
    path = tmp_path / "idx.npz"
    index.save(path)
    again = CopyIndex.load(path)
    assert again.n_pieces == 2 and (again.hashes == index.hashes).all() and (again.places == index.places).all()


def test_sampler_rejects_a_copied_run():
    from midistral.sampler import rejection_reasons
    from midistral.sampling import RejectionLimits

    fine = {"silent_share": 0.0, "loop_score": 0.0, "out_of_key": 0.0}
    assert rejection_reasons(fine) == [] and rejection_reasons({**fine, "copied_run": 3.0}) == []
    assert rejection_reasons({**fine, "copied_run": 4.0}) == ["copies 4 bars of a training piece (>= 4)"]
    assert rejection_reasons({**fine, "copied_run": 5.0}, RejectionLimits(max_copied_run=6)) == []


def test_cli_reports_copying_against_the_training_split(tmp_path, capsys):
    rng = np.random.default_rng(3)
    train = [random_bars(rng, 16) for _ in range(4)]
    (tmp_path / "pieces").mkdir()
    paths = []
    for i, bars in enumerate(train + [random_bars(rng, 16) for _ in range(3)]):
        bars_piece(bars).dump_midi(str(tmp_path / "pieces" / f"t{i}.mid"))
        paths.append(str(tmp_path / "pieces" / f"t{i}.mid"))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    manifest = {"counts": {"train": {"files_list": paths[:4]}, "test": {"files_list": paths[4:]}}}
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    gen = tmp_path / "gen"
    gen.mkdir()
    bars_piece(train[0][:8]).dump_midi(str(gen / "copy.mid"))  # 8 bars of a training piece
    bars_piece(random_bars(rng, 8)).dump_midi(str(gen / "new.mid"))
    bars_piece(train[1][3:5] + random_bars(rng, 6)).dump_midi(str(gen / "quote.mid"))
    assert evaluate.main([str(gen), "--reference", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "copying against 4 training pieces (real pieces cut to 8 bars)" in out
    c = json.loads((tmp_path / "rep" / "metrics.json").read_text())["copying"]
    assert c["generated"]["max_run"] == 8 and c["generated"]["copy_share"] == pytest.approx(1 / 3)
    assert c["generated"]["copied_bars"] == pytest.approx((1 + 0 + 2 / 8) / 3)
    assert c["real"] == {"pieces": 3, "copied_bars": 0.0, "mean_run": 0.0, "max_run": 0.0, "copy_share": 0.0}
    assert sorted(r["copied_run"] for r in c["per_generated_piece"]) == [0, 2, 8]
    # a plain folder reference has no training split: said, not guessed; --train gives one
    assert evaluate.main([str(gen), "--reference", str(tmp_path / "pieces"), "--out", str(tmp_path / "r2")]) == 0
    assert "no copying check" in capsys.readouterr().out
    assert evaluate.main([str(gen), "--reference", str(tmp_path / "pieces"), "--train", str(run),
                          "--out", str(tmp_path / "r3")]) == 0
    assert "copying against 4 training pieces" in capsys.readouterr().out
    assert evaluate.main([str(gen), "--reference", str(run), "--train", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: --train")


def test_cli_style_and_openings_of_the_test_split(tmp_path, capsys):
    rng = np.random.default_rng(4)
    (tmp_path / "pieces").mkdir()
    paths = []
    for i in range(6):
        bars_piece(random_bars(rng, 20 + i)).dump_midi(str(tmp_path / "pieces" / f"t{i}.mid"))
        paths.append(str(tmp_path / "pieces" / f"t{i}.mid"))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    test = {"files_list": paths[1:], "styles_list": ["folk", "bach", "folk", "folk", "bach"]}
    (run / "data" / "manifest.json").write_text(json.dumps({"counts": {"train": {"files_list": paths[:1]}, "test": test}}))
    gen = make_set(tmp_path / "gen", range(3))
    assert evaluate.main([str(gen), "--reference", str(run), "--style", "folk", "--bars", "8",
                          "--out", str(tmp_path / "rep")]) == 0
    assert "style folk, first 8 bars (3 pieces)" in capsys.readouterr().out
    files, _ = evaluate.reference_files(run, "bach")
    assert [f.name for f in files] == ["t2.mid", "t5.mid"]
    cut = evaluate.opening(files[0], 8)
    assert cut.end() <= 8 * 4 * 480 and cut.note_num() == 32
    assert evaluate.main([str(gen), "--reference", str(run), "--style", "jazz"]) == 1
    assert "styles: bach, folk" in capsys.readouterr().err
