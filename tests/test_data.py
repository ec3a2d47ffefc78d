"""Data preparation and batches: skipped files with reasons, exact chunking against a plain-Python reference."""

import json
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
    """12 real files, the 4 broken ones, a duplicate and 3 chorales in one folder."""
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
    cfg["data"].update(data)
    return cfg


def test_prepare_lists_skipped_files_and_reuses(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, bpe_vocab_size=700)
    out = prepare(cfg, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["file"]).name: s["reason"] for s in man["skipped"]}
    for name in ("lmd__Get_Back.3.mid", "lmd__You_Are_Not_Alone.mid", "miditok__ValueError_Control168.mid",
                 "symusic__Issue104_Bizarre_Love_Triangle2.mid"):
        assert "unreadable MIDI" in reasons[name]
    assert "duplicate of" in reasons["copy_of_first.mid"]
    kept = sum(c["files"] for c in man["counts"].values())
    assert kept + len(man["skipped"]) == man["files_found"] == 20
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
