"""Data preparation and batches: skipped files with reasons, exact chunking against a plain-Python reference."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, shared_midi_dir
from midistral.config import load_config
from midistral.data import TokenChunks, prepare
from midistral.errors import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 real files, the broken ones, a duplicate and 3 chorales in one folder."""
    dev, broken = shared_midi_dir("dev"), shared_midi_dir("broken")
    d = tmp_path_factory.mktemp("corpus")
    files = sorted(dev.glob("*.mid"))[:12]
    for f in files:
        shutil.copy(f, d / f.name)
    (d / "sub").mkdir()
    for f in broken.glob("*.mid"):
        shutil.copy(f, d / "sub" / f.name)
    shutil.copy(files[0], d / "sub" / "copy_of_first.mid")
    from midistral.data.chorales import chorale_midis

    chorales, errors = chorale_midis(tmp_path_factory.mktemp("cache"), max_files=3, workers=1)
    assert not errors and len(chorales) == 3
    for c in chorales:
        shutil.copy(c, d / c.name)
    return d


def cfg_for(folder, out, **data):
    cfg = load_config(ROOT / "configs" / "tiny.toml", [f"out_dir={json.dumps(str(out))}", f"data.dir={json.dumps(str(folder))}",
                                                        "data.max_files=0"])
    return with_data(cfg, **data)


def with_data(cfg, **data):
    """`cfg` with these [data] values (checked as the config loader checks them)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


@pytest.mark.slow
def test_chorale_midi_written_in_place_equals_music21s_own_write(tmp_path):
    """The conversion's in-place repeat expansion (no deep copy) writes the same bytes as music21's write, with
    repeat barlines (bwv103.6, bwv104.6) and without; and it leaves music21's expander as it was."""
    import warnings

    from music21 import corpus as m21, repeat
    from midistral.data.chorales import write_midi_consuming

    process = repeat.Expander.process
    for name in ("bach/bwv103.6.mxl", "bach/bwv104.6.mxl", "bach/bwv1.6.mxl"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m21.parse(name).write("midi", fp=str(tmp_path / "copy.mid"))
            write_midi_consuming(m21.parse(name), tmp_path / "in_place.mid")
        assert (tmp_path / "copy.mid").read_bytes() == (tmp_path / "in_place.mid").read_bytes(), name
    assert repeat.Expander.process is process


def test_prepare_lists_skipped_files_and_reuses(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, bpe_vocab_size=700)
    out = prepare(cfg, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["file"]).name: s["reason"] for s in man["skipped"]}
    broken = [f.name for f in (corpus / "sub").glob("*.mid") if f.name != "copy_of_first.mid"]
    assert len(broken) >= 4
    for name in broken:
        assert "unreadable MIDI" in reasons[name]
    assert "duplicate of" in reasons["copy_of_first.mid"]
    kept = sum(c["files"] for c in man["counts"].values())
    assert kept + len(man["skipped"]) == man["files_found"] == 12 + len(broken) + 1 + 3
    assert man["vocab_size"] == 700 and man["dtype"] == "uint16"
    # every kept piece's ids decode back to base tokens of that file (BPE learned on train only)
    from midistral.tokenize import REMI

    tok = REMI.load(out / "tokenizer.json")
    offs = np.load(out / "val.idx.npy")
    flat = np.fromfile(out / "val.bin", dtype=np.uint16)
    first = man["counts"]["val"]["files_list"][0]
    assert np.array_equal(tok.base_ids(flat[offs[0]:offs[1]].astype(np.int64)), tok.encode_base(first))
    r = subprocess.run([sys.executable, "-m", "midistral.data", "stats", "--config", str(ROOT / "configs" / "tiny.toml"),
                        f"data.prepared_dir={json.dumps(str(out))}", f"data.dir={json.dumps(str(corpus))}", "data.max_files=0",
                        "data.bpe_vocab_size=700"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "bars per piece" in r.stdout, r.stderr
    assert (out / "stats.png").stat().st_size > 5000
    stamp = (out / "train.bin").stat().st_mtime_ns
    prepare(cfg, progress=False)  # same config: reused
    assert (out / "train.bin").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_filters_and_transposition(corpus, tmp_path):
    out = prepare(cfg_for(corpus, tmp_path, only_4_4=True, max_bars=60, transpose=[-2, 2], transpose_copies=2), progress=False)
    man = json.loads((out / "manifest.json").read_text())
    reasons = [s["reason"] for s in man["skipped"]]
    assert any(r == "not 4/4 throughout" for r in reasons) and any("max_bars=60" in r for r in reasons)
    assert man["counts"]["train"]["pieces"] == 3 * man["counts"]["train"]["files"]


def write_manifest(folder, splits):
    """The manifest prepare() would write for hand-made shards (the fields TokenChunks checks)."""
    shards = {p.name: {"bytes": p.stat().st_size} for p in folder.iterdir() if p.suffix in (".bin", ".npy")}
    (folder / "manifest.json").write_text(json.dumps({
        "format": "midistral.data", "version": 2, "dtype": "uint16", "vocab_size": 600, "fingerprint": "test",
        "shards": shards, "counts": {s: {"files": len(p)} for s, p in splits.items()}}))


def test_chunks_and_padding_exact(tmp_path):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(4, 600, n) for n in (3, 10, 25, 7, 40)]
    offs = np.r_[0, np.cumsum([len(p) for p in pieces])]
    np.concatenate(pieces).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.save(tmp_path / "train.idx.npy", offs)
    write_manifest(tmp_path, {"train": pieces})
    BOS, EOS, PAD, MIN, MAX = 1, 2, 0, 5, 8
    ds = TokenChunks(tmp_path, "train", MIN, MAX, BOS, EOS, PAD)
    ref = []  # plain Python: frame each piece, cut every MAX, drop short tails unless the whole piece
    for p in pieces:
        framed = [BOS] + p.tolist() + [EOS]
        cuts = [framed[i:i + MAX] for i in range(0, len(framed), MAX)]
        ref += [c for c in cuts if len(c) >= MIN or len(cuts) == 1]
    assert len(ds) == len(ref)
    idx = np.arange(len(ref))[::-1]
    x, y = ds.batch(idx)
    L = max(len(ref[i]) for i in idx)
    for row, i in enumerate(idx):
        seq = ref[i] + [PAD] * (L - len(ref[i]))
        assert x[row].tolist() == seq[:-1]
        assert y[row].tolist() == [t if k + 1 < len(ref[i]) else -100 for k, t in enumerate(seq[1:])]


def test_packed_batch_holds_the_padded_batch(tmp_path):
    """packed_batch(idx) holds exactly batch(idx)'s chunks, each a run of its own segment, in rows of at most
    row_len; the rest is padding (segment -1, target -100)."""
    rng = np.random.default_rng(1)
    pieces = [rng.integers(4, 600, n) for n in (3, 10, 25, 7, 40, 12, 5)]
    offs = np.r_[0, np.cumsum([len(p) for p in pieces])]
    np.concatenate(pieces).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.save(tmp_path / "train.idx.npy", offs)
    write_manifest(tmp_path, {"train": pieces})
    ds = TokenChunks(tmp_path, "train", 4, 16, 1, 2, 0)
    idx = rng.permutation(len(ds))
    x, y = ds.batch(idx)
    px, py, seg = ds.packed_batch(idx, 15)
    assert px.shape[1] <= 15 and px.shape[0] < len(idx) and px.shape == py.shape == seg.shape
    for c in range(len(idx)):
        n = int((y[c] != -100).sum())  # a chunk's inputs: its length - 1; all are targets here
        at = (seg == c).nonzero()
        assert len(at) == n and (at[:, 0] == at[0, 0]).all() and (at[:, 1].diff() == 1).all()
        r, s = int(at[0, 0]), int(at[0, 1])
        assert px[r, s:s + n].tolist() == x[c, :n].tolist() and py[r, s:s + n].tolist() == y[c, :n].tolist()
    assert (py[seg == -1] == -100).all() and (px[seg == -1] == 0).all()
    assert int((seg >= 0).sum()) == int((y != -100).sum())


@pytest.mark.slow
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(ROOT / "configs" / "tiny.toml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="data.dir .*no such folder"):
        prepare(cfg_for(tmp_path / "nowhere", tmp_path))
    for extra, msg in [(["train.lrr=1"], "unknown config key 'train.lrr'"),
                       ([f"data.dir={json.dumps(str(tmp_path / 'nowhere'))}"], "no such folder")]:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
                            f"out_dir={json.dumps(str(tmp_path / 'run'))}", *extra], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg.split(".*")[-1] in r.stderr, r.stderr


def small_prepared(tmp_path_factory_or_path, **data):
    """12 real files prepared with the tiny config (no BPE), in a fresh folder."""
    out = Path(tmp_path_factory_or_path)
    cfg = load_config(ROOT / "configs" / "tiny.toml", [f"out_dir={json.dumps(str(out))}",
                                                        f"data.dir={json.dumps(str(shared_midi_dir('dev')))}"])
    cfg = with_data(cfg, **data)
    return cfg, prepare(cfg, progress=False)


def test_damaged_or_foreign_folder_is_refused_or_prepared_again(tmp_path, capsys):
    from midistral.data import load_splits
    from midistral.errors import DataError

    cfg, out = small_prepared(tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    assert man["fingerprint"] and man["shards"]["train.bin"]["bytes"] == (out / "train.bin").stat().st_size
    tok, train_set, val_set = load_splits(out, 16, 128)
    assert len(train_set) and len(val_set)
    good = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(good[:-10])  # truncated
    with pytest.raises(DataError, match="train.bin: .* the manifest says"):
        load_splits(out, 16, 128)
    (out / "train.bin").write_bytes(good)
    (out / "val.idx.npy").write_bytes(b"\x93NUMPY garbage" + b"\0" * (man["shards"]["val.idx.npy"]["bytes"] - 14))
    with pytest.raises(DataError, match="val.idx.npy: corrupt piece index"):
        load_splits(out, 16, 128)
    (out / "manifest.json").write_text(json.dumps({**man, "version": 1}))
    with pytest.raises(DataError, match="another version"):
        load_splits(out, 16, 128)
    (out / "manifest.json").write_text('{"cut')
    with pytest.raises(DataError, match="not a valid manifest"):
        load_splits(out, 16, 128)
    # another data config: detected (fingerprint), prepared again rather than reused
    capsys.readouterr()
    prepare(with_data(cfg, max_files=6), progress=False)
    assert "prepared with another data config" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"]["files"] < man["counts"]["train"]["files"]


def test_empty_validation_split_is_reported(tmp_path, capsys):
    from midistral.data import load_splits
    from midistral.errors import DataError

    _, out = small_prepared(tmp_path, split=[1, 0, 0])
    assert "the val split kept none" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["warnings"]
    with pytest.raises(DataError, match="the val split has no usable piece"):
        load_splits(out, 16, 128)


def test_files_get_umask_permissions(tmp_path):
    import os
    import stat

    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer

    old = os.umask(0o027)
    try:
        _, out = small_prepared(tmp_path / "run")
        save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                                   num_hidden_layers=1, num_attention_heads=2,
                                                                   num_key_value_heads=1)))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), *(tmp_path / "ckpt").iterdir()]}
    assert all(m == 0o640 for m in modes.values()), modes  # 0666 & ~027, not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750  # 0777 & ~027, not mkdtemp's 0700


def test_resource_bounds():
    import symusic

    from midistral.errors import MidiError
    from midistral.limits import MAX_NOTES, check_midi_size, check_score

    def score(n_notes, tpq=480, spacing=120, n_tracks=1):
        s = symusic.Score(tpq)
        for k in range(n_tracks):
            t = symusic.Track(program=k % 128)
            m = n_notes // n_tracks
            t.notes = symusic.Note.from_numpy(time=np.arange(m, dtype=np.int32) * spacing, duration=np.full(m, 60, np.int32),
                                              pitch=np.full(m, 60, np.int8), velocity=np.full(m, 80, np.int8))
            s.tracks.append(t)
        return s

    with pytest.raises(MidiError, match="1,000,000 notes, more than"):
        check_score(score(1_000_000), "big.mid")
    with pytest.raises(MidiError, match="5000 tracks"):
        check_score(score(5000, n_tracks=5000), "wide.mid")
    with pytest.raises(MidiError, match="MB, more than"):
        check_midi_size(100 * 2**20, "huge.mid")
    from midistral.tokenize import REMI

    tok = REMI()
    for s in (score(10_000, 480, 1920), score(10_000, 1, 1), score(10_000, 30000, 7500), score(MAX_NOTES // 20)):
        check_score(s, "ok.mid")  # 10^4 bars, tpq 1, tpq 30000: within bounds, and encoded
        assert len(tok.encode(s)) > 10_000


@pytest.mark.slow
def test_preparation_killed_anywhere_then_run_again_gives_the_same_shards(tmp_path):
    """kill -9 at three random moments of a preparation (BPE included), then run it again: the same shards,
    byte for byte, as an uninterrupted preparation; the killed folder is never taken as prepared."""
    import os
    import random
    import signal
    import time

    def cmd(out):
        return [sys.executable, "-m", "midistral.data", "prepare", "--config", str(ROOT / "configs" / "tiny.toml"),
                f"data.dir={json.dumps(str(shared_midi_dir('dev')))}", f"data.prepared_dir={json.dumps(str(out))}",
                "data.bpe_vocab_size=700"]

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    t0 = time.time()
    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True, env=env, cwd=ROOT)
    duration = time.time() - t0
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    rng = random.Random(7)
    for k in range(3):
        out = tmp_path / f"killed{k}"
        p = subprocess.Popen(cmd(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished first: the run below reuses its folder
            pass
        p.wait()
        subprocess.run(cmd(out), check=True, capture_output=True, env=env, cwd=ROOT)
        man = json.loads((out / "manifest.json").read_text())
        assert man["shards"] == ref["shards"] and man["fingerprint"] == ref["fingerprint"]
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "ref" / "tokenizer.json").read_bytes()
        assert not list(out.glob(".*.tmp"))  # a killed writer's temporaries were cleared


# Sounding ranges (MIDI pitches) of the General MIDI instruments the voice pools may use, from standard
# orchestration tables (written independently of midistral/data/chorales.py), and the chorale voices' usual
# tessitura: every program drawn for a voice must cover it.
INSTRUMENT_RANGE = {73: (60, 96), 68: (58, 91), 40: (55, 103), 56: (54, 82), 71: (50, 94), 64: (56, 87),
                    41: (48, 91), 60: (34, 77), 69: (52, 84), 65: (49, 81), 42: (36, 76), 57: (40, 72),
                    70: (34, 75), 66: (44, 76), 43: (28, 67), 32: (28, 67), 33: (28, 67), 58: (28, 65)}
TESSITURA = [(62, 77), (57, 72), (50, 67), (40, 62)]  # soprano D4-F5, alto A3-C5, tenor D3-G4, bass E2-D4


def test_ensembles_are_deterministic_distinct_and_fit_each_voice():
    from midistral.data.chorales import VOICE_POOLS, draw_ensemble

    seen = set()
    for i in range(300):
        name, copy = f"bwv{i}.{i % 7}.mid", i % 3
        ens = draw_ensemble(name, copy)
        assert ens == draw_ensemble(name, copy)  # deterministic in (name, copy, seed)
        assert len(set(ens)) == 4  # distinct programs: REMIPlus would merge two tracks of one program
        for program, pool, (lo, hi) in zip(ens, VOICE_POOLS, TESSITURA):
            assert program in pool
            assert INSTRUMENT_RANGE[program][0] <= lo and hi <= INSTRUMENT_RANGE[program][1], (program, lo, hi)
        seen.add(tuple(ens))
    assert len(seen) > 150  # varied, not one ensemble
    for voice in range(4):  # every pool member is drawn for its voice
        assert {e[voice] for e in seen} == set(VOICE_POOLS[voice])
    assert draw_ensemble("bwv1.6.mid", 0, seed=1) != draw_ensemble("bwv1.6.mid", 0) or \
        draw_ensemble("bwv1.6.mid", 1, seed=1) != draw_ensemble("bwv1.6.mid", 1)


def test_ensembles_config_key_is_checked():
    for value, msg in [("1.5", "data.ensembles=1.5: expected a number in [0, 1]"),
                       ("true", "data.ensembles=True: expected a number in [0, 1]"),
                       ('"all"', "data.ensembles='all': expected a number in [0, 1]")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(ROOT / "configs" / "tiny.toml", [f"data.ensembles={value}"])
    with pytest.raises(ConfigError, match="unknown config key 'data.ensemble'"):
        load_config(ROOT / "configs" / "tiny.toml", ["data.ensemble=1"])
    from midistral.data.prepare import made_with

    cfg = load_config(ROOT / "configs" / "tiny.toml")
    assert not {"ensembles", "ensemble_copies"} & set(made_with(cfg)[0]["data"])  # off: fingerprints as before
    assert load_config(ROOT / "configs" / "chorales-ensembles.toml").data.ensembles == 1.0
    assert load_config(ROOT / "configs" / "report.toml").data.ensembles == 0  # Lakh: the files' own programs


@pytest.mark.parametrize("transpose_copies,ensemble_copies", [(1, 0), (0, 2), (1, 1)])
def test_prepare_draws_ensembles_and_transposes_copies(tmp_path, transpose_copies, ensemble_copies):
    """Four-voice pieces (the example chorale, transposed so the files differ), prepared with ensembles, transposed
    copies and ensemble copies: every piece decodes to the file's notes shifted by 0 (the piece, every split, and
    its ensemble copies) or by a nonzero shift in the range (a transposed copy), its tracks playing
    draw_ensemble's programs for that copy from the highest part down."""
    import symusic

    from midistral.data.chorales import draw_ensemble
    from midistral.tokenize import REMI

    src = symusic.Score(str(ROOT / "examples" / "prompt.mid"))
    folder = tmp_path / "midi"
    folder.mkdir()
    for k in range(8):
        s = src.copy()
        s.tracks = [t.shift_pitch(k - 4) for t in s.tracks]
        if k % 2:  # tracks in another order than from the top down
            s.tracks = [s.tracks[i] for i in (2, 0, 3, 1)]
        s.dump_midi(str(folder / f"piece{k}.mid"))
    cfg = cfg_for(folder, tmp_path / "run", ensembles=1.0, transpose=[-2, 2], transpose_copies=transpose_copies,
                  ensemble_copies=ensemble_copies)
    out = prepare(cfg, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    tok = REMI.load(out / "tokenizer.json")
    n_checked = 0
    for split in ("train", "val", "test"):
        offs = np.load(out / f"{split}.idx.npy")
        flat = np.fromfile(out / f"{split}.bin", dtype=np.uint16).astype(np.int64)
        files = man["counts"][split]["files_list"]
        copies = 1 + transpose_copies + ensemble_copies if split == "train" else 1
        assert len(offs) - 1 == copies * len(files)
        for j in range(len(offs) - 1):
            f, copy = Path(files[j // copies]), j % copies
            got = tok.decode(flat[offs[j]:offs[j + 1]])
            want = tok.decode(tok.encode(f))  # the file's own notes (quantised as the tokenizer does)
            gp = sorted((n.time, n.pitch) for t in got.tracks for n in t.notes)
            wp = sorted((n.time, n.pitch) for t in want.tracks for n in t.notes)
            shifts = {g[1] - w[1] for g, w in zip(gp, wp)}
            assert len(gp) == len(wp) and len(shifts) == 1 and [g[0] for g in gp] == [w[0] for w in wp]
            shift = shifts.pop()
            assert shift in ((-2, -1, 1, 2) if 0 < copy <= transpose_copies else (0,))
            by_height = sorted(got.tracks, key=lambda t: -np.mean([n.pitch for n in t.notes]))
            assert [t.program for t in by_height] == draw_ensemble(f.name, copy)
            # the order of the tracks (the order of notes at one tick) stays the file's
            order = sorted(want.tracks, key=lambda t: -np.mean([n.pitch for n in t.notes]))
            assert [order.index(want.tracks[i]) for i in range(4)] == [by_height.index(got.tracks[i]) for i in range(4)]
            n_checked += 1
    assert not man["skipped"] and n_checked == 8 + (transpose_copies + ensemble_copies) * man["counts"]["train"]["files"]


# The general draw's instruments: sounding ranges from standard orchestration and instrument tables (written
# independently of midistral/data/ensembles.py), and the families the model should meet.
GENERAL_RANGE = {**INSTRUMENT_RANGE, 0: (21, 108), 4: (28, 100), 6: (29, 89), 19: (24, 96), 46: (23, 104),
                 110: (55, 103), 72: (74, 108), 67: (37, 68), 52: (40, 84), 53: (48, 79), 24: (40, 83),
                 25: (40, 86), 26: (40, 86), 27: (40, 86), 34: (28, 67), 35: (28, 67), 48: (28, 103),
                 11: (53, 89), 12: (45, 96), 21: (53, 93), 22: (60, 96)}
GM_FAMILIES = {"piano": range(0, 8), "organ": range(16, 24), "guitar": range(24, 32), "bass": range(32, 40),
               "strings": range(40, 56), "voice": (52, 53), "brass": range(56, 64), "winds": range(64, 80)}


def test_general_ensembles_fit_each_voice_and_cover_the_families():
    from midistral.data.ensembles import draw_general

    rng = np.random.default_rng(0)
    kinds, programs = set(), set()
    for i in range(600):
        n = int(rng.integers(1, 7))
        centres = sorted(rng.integers(40, 80, n))[::-1]
        ranges = [(int(c - rng.integers(3, 10)), int(c + rng.integers(3, 10))) for c in centres]
        kind, ens = draw_general(f"piece{i}.mid", i % 3, ranges)
        assert (kind, ens) == draw_general(f"piece{i}.mid", i % 3, ranges)  # deterministic
        assert len(ens) == n
        for p, (lo, hi) in zip(ens, ranges):
            assert GENERAL_RANGE[p][0] <= lo and hi <= GENERAL_RANGE[p][1], (kind, p, lo, hi)
        if kind == "keyboard":
            assert len(set(ens)) == 1 and ens[0] in (0, 4, 6, 19)
        elif kind == "band":
            assert 32 <= ens[-1] <= 35 or ens[-1] in (0, 4, 6, 19)  # a bass, or a keyboard where none covers
            assert len(set(ens[:1] + ens[-1:])) == 2 and not set(ens[:1] + ens[-1:]) & set(ens[1:-1])
        else:  # mixed, family: one instrument per voice
            assert len(set(ens)) == n or set(ens) & {0, 4, 6, 19}, (kind, ens)
        kinds.add(kind)
        programs.update(ens)
    assert kinds == {"mixed", "family", "band", "keyboard"}
    for family, members in GM_FAMILIES.items():
        assert programs & set(members), family


def test_general_ensembles_keep_drums_and_cover_any_number_of_voices():
    import symusic

    from midistral.data.ensembles import ensemble_for

    s = symusic.Score(480)
    for k, base in enumerate((76, 70, 64, 58, 52, 45)):  # six voices and a drum track
        t = symusic.Track(program=0)
        for b in range(8):
            t.notes.append(symusic.Note(b * 480, 480, base + (b % 3), 80))
        s.tracks.append(t)
    drums = symusic.Track(program=0, is_drum=True)
    drums.notes.append(symusic.Note(0, 120, 36, 90))
    s.tracks.append(drums)
    assert ensemble_for(s, "six.mid", 0, 1.0) is None  # the chorale draw: up to four voices, no drums
    progs = ensemble_for(s, "six.mid", 0, 1.0, general=True)
    assert len(progs) == 7 and progs[6] == 0  # the drum track keeps its program
    assert ensemble_for(s, "six.mid", 0, 0.0, general=True) is None


def test_split_by_style_splits_each_style_and_one_style_as_before():
    from midistral.config import DataConfig
    from midistral.data.prepare import split_by_style, split_files

    d = DataConfig(seed=3, split=[0.8, 0.1, 0.1])
    files = [Path(f"f{i:03d}.mid") for i in range(60)]
    styles = {str(f): ("folk" if i < 40 else "bach" if i < 55 else "classical") for i, f in enumerate(files)}
    split = split_by_style(files, styles, d)
    for style in ("folk", "bach", "classical"):
        mine = [split[str(f)] for f in files if styles[str(f)] == style]
        assert {"train", "val", "test"} <= set(mine), style
    assert split_by_style(files, {}, d) == split_files(files, d)  # a folder: no styles
    assert split_by_style(files, {str(f): "bach" for f in files}, d) == split_files(files, d)  # the chorales


def test_every_music21_folder_has_a_style_or_a_reason():
    music21 = pytest.importorskip("music21")
    from midistral.data.music21_corpus import NOT_MUSIC, STYLE_OF_FOLDER, STYLES, list_sources

    root = Path(music21.__file__).parent / "corpus"
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert folders <= set(STYLE_OF_FOLDER) | set(NOT_MUSIC), folders - set(STYLE_OF_FOLDER) - set(NOT_MUSIC)
    assert set(STYLE_OF_FOLDER.values()) == set(STYLES)
    sources, skipped = list_sources()
    assert len(sources) > 3000 and all(Path(s).suffix in (".mxl", ".xml", ".musicxml", ".krn", ".abc") for s in sources)
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert "Roman-numeral" in reasons["bach/bwv1.6.rntxt"] if "bach/bwv1.6.rntxt" in reasons else True
    assert len({str(Path(s).with_suffix("")) for s in sources}) == len(sources)  # one format per piece


SMALL_SOURCES = ["bach/bwv165.6.mxl", "bach/bwv66.6.mxl", "bach/bwv1.6.mxl", "palestrina/Credo_67_c.krn",
                 "palestrina/Credo_81_c.krn", "palestrina/Gloria_70_c.krn", "josquin/adieuMesAmours.abc",
                 "ryansMammoth/PaddyMilesFricasseeReel.abc", "ryansMammoth/TwoPennyPostmansJig.abc",
                 "ryansMammoth/LetsBeGay.abc", "mozart/k545/movement1_exposition.mxl",
                 "haydn/opus1no1/movement4.mxl", "mozart/k80/movement3.mxl", "demos/missing_file.abc"]


@pytest.mark.slow
def test_music21_source_converts_once_styles_splits_and_records_programs(tmp_path, monkeypatch):
    """A dozen small music21 files of the four styles (and one that does not exist): converted once and cached,
    one skip report, each style split, each piece's style and the training programs in the manifest."""
    pytest.importorskip("music21")
    import midistral.data.music21_corpus as m21

    monkeypatch.setattr(m21, "list_sources", lambda root=None: (SMALL_SOURCES, [{"file": "x.rntxt", "reason": "an analysis"}]))
    cache = tmp_path / "cache"
    cfg = load_config(ROOT / "configs" / "music21.toml", [f"out_dir={json.dumps(str(tmp_path / 'run'))}",
                                                          f"data.cache_dir={json.dumps(str(cache))}", "data.workers=1",
                                                          "data.bpe_vocab_size=700"])
    out = prepare(cfg, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["styles"]) == {"bach", "renaissance", "folk", "classical"}
    for style, splits in man["styles"].items():
        assert all(splits[s]["files"] >= 1 for s in ("train", "val", "test")), style
    for s in ("train", "val", "test"):
        c = man["counts"][s]
        assert len(c["styles_list"]) == c["files"] and len(c["piece_styles"]) == c["pieces"]
        assert sum(v[s]["tokens"] for v in man["styles"].values()) == c["tokens"]
    reasons = {r["file"]: r["reason"] for r in man["skipped"]}
    assert reasons["x.rntxt"] == "an analysis" and "cannot parse" in reasons["demos/missing_file.abc"]
    assert (cache / "josquin/adieuMesAmours.abc.json").is_file()  # four ABC tunes, the voices of one piece
    assert len(json.loads((cache / "josquin/adieuMesAmours.abc.json").read_text())["pieces"]) == 1
    assert man["programs"] and all(int(k) in range(-1, 128) and 0 < v <= man["counts"]["train"]["files"]
                                   for k, v in man["programs"].items())
    assert (out / "copy_index.npz").is_file()

    def no_conversion(args):
        raise AssertionError(f"{args[0]} converted twice")

    monkeypatch.setattr(m21, "convert_source", no_conversion)
    shutil.rmtree(out)
    again = prepare(cfg, progress=False)
    assert json.loads((again / "manifest.json").read_text())["counts"] == man["counts"]


def test_skip_summary_groups_reasons():
    from midistral.data.prepare import skip_summary

    skipped = [{"file": "a", "reason": "12 notes (< min_notes=16)"}, {"file": "b", "reason": "3 notes (< min_notes=16)"},
               {"file": "c", "reason": "duplicate of x.mid"}, {"file": "d", "reason": "not convertible to MIDI (E: f)"}]
    assert skip_summary(skipped) == [("N notes", 2), ("duplicate", 1), ("not convertible to MIDI", 1)]


def test_music21_tune_with_a_shared_time_signature_is_converted(tmp_path):
    """music21's ABC reader can put one time-signature object into several measures; its MIDI writer refuses
    that, and the conversion keeps the object in its first measure only."""
    pytest.importorskip("music21")
    import symusic
    from music21 import meter, note, stream

    from midistral.data.music21_corpus import _write_midi

    def tune():
        ts, part = meter.TimeSignature("2/4"), stream.Part()
        for i in range(3):
            m = stream.Measure(number=i + 1)
            if i != 1:
                m.insert(0, ts)
            m.append(note.Note(60 + i, quarterLength=2))
            part.append(m)
        return stream.Score([part])

    with pytest.raises(Exception, match="already found"):
        tune().write("midi", fp=str(tmp_path / "plain.mid"))
    _write_midi(tune(), tmp_path / "t.mid")
    s = symusic.Score(str(tmp_path / "t.mid"))
    assert [n.pitch for t in s.tracks for n in t.notes] == [60, 61, 62]
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left


def test_epoch_order_grouped_by_length_is_a_seeded_permutation_with_less_padding():
    from midistral.data import epoch_order

    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(1000) < 0.6, rng.integers(100, 300, 1000), 512)  # folk tunes beside motets
    plain = epoch_order(1000, 3, 1)
    grouped = epoch_order(1000, 3, 1, lengths, batch=16, group=8)
    assert sorted(grouped.tolist()) == list(range(1000))
    assert np.array_equal(grouped, epoch_order(1000, 3, 1, lengths, batch=16, group=8))  # resume sees the same
    assert not np.array_equal(grouped, epoch_order(1000, 3, 2, lengths, batch=16, group=8))

    def padded(order):
        return sum(lengths[order[i:i + 16]].max() * len(order[i:i + 16]) for i in range(0, 1000, 16))

    assert padded(grouped) < 0.8 * padded(plain)
    assert np.array_equal(epoch_order(1000, 3, 1, lengths, batch=16, group=0), plain)
