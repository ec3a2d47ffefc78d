"""BPE against MidiTok 3.1's (test-only oracle): same vocabulary, merges and ids; MidiTok files load."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from midistral.errors import CheckpointError
from midistral.tokenize import REMI, REMIConfig, REPORT_PARAMS

miditok = pytest.importorskip("miditok")
NO_BARS = {k: v for k, v in REPORT_PARAMS.items() if k != "max_bar_embedding"}


@pytest.fixture(scope="module")
def trained(dev_midi_files, tmp_path_factory):
    """Ours and MidiTok's, each trained to 1,600 tokens on the same 30 files; MidiTok's saved to JSON."""
    cut = len(dev_midi_files) * 3 // 5
    train, test = dev_midi_files[:cut:2], dev_midi_files[cut:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mt = miditok.REMI(miditok.TokenizerConfig(**NO_BARS))
        mt.train(vocab_size=1600, model="BPE", files_paths=[Path(f) for f in train])
        ours = REMI(REMIConfig(**NO_BARS))
    ours.train_bpe(train, 1600, workers=2)
    path = tmp_path_factory.mktemp("mt") / "tokenizer.json"
    mt.save(path)
    return ours, mt, test, path


@pytest.mark.slow
def test_same_vocabulary_and_merges(trained):
    ours, mt, _, _ = trained
    a = json.loads(mt._model.to_str())["model"]
    b = json.loads(ours.bpe.hf.to_str())["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"]
    assert len(ours) == len(mt) == 1600


@pytest.mark.slow
def test_same_ids_on_other_files(trained):
    ours, mt, test, path = trained
    loaded = REMI.from_miditok(path)
    compared = 0
    for f in test:
        try:
            want = mt.encode(f).ids
        except Exception:
            continue
        try:
            got = ours.encode(f)
        except Exception as e:  # files without notes: a clear error instead of a header-only sequence
            assert "no notes" in str(e)
            continue
        assert got.tolist() == want, f.name
        assert loaded.encode(f).tolist() == want, f.name
        # BPE ids decode to the same piece as base ids
        base = ours.encode_base(f)
        assert np.array_equal(ours.base_ids(got), base)
        assert ours.tokens(ours.decode(got)) == ours.tokens(ours.decode(base))
        compared += 1
    assert compared >= 0.75 * len(test)


@pytest.mark.slow
def test_save_load_keeps_merges_and_retraining_replaces(trained, tmp_path, dev_midi_files):
    ours, _, test, _ = trained
    ours.save(tmp_path / "tok.json")
    back = REMI.load(tmp_path / "tok.json")
    f = next(f for f in test if "event_order" not in f.name)  # that one has no notes
    assert back.encode(f).tolist() == ours.encode(f).tolist()
    back.train_bpe(dev_midi_files[:10], 1200, workers=1)
    assert len(back) == 1200 and len(ours) == 1600


@pytest.mark.slow
def test_encode_many_reports_failures(trained, broken_midi_files):
    ours, _, test, _ = trained
    paths = list(test[:6]) + list(broken_midi_files)
    res = ours.encode_many(paths, workers=2)
    assert [r.path for r in res] == paths
    for r in res[:6]:
        if r.error is None:
            assert r.ids.tolist() == ours.encode(r.path).tolist()
    for r in res[6:]:
        assert r.ids is None and Path(r.path).name in r.error


def test_miditok_file_without_bpe(tmp_path, dev_midi_files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mt = miditok.REMI(miditok.TokenizerConfig(**REPORT_PARAMS))
    mt.save(tmp_path / "plain.json")
    tok = REMI.from_miditok(tmp_path / "plain.json")
    assert tok.bpe is None and len(tok) == 1127
    f = next(f for f in dev_midi_files[10:] if f.stat().st_size > 1000)  # one with notes
    assert tok.encode(f).tolist() == mt.encode(f).ids


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="a.json: not a JSON"):
        REMI.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"config": {}, "tokenization": "TSD", "miditok_version": "3.1.0"}))
    with pytest.raises(CheckpointError, match="b.json: field 'tokenization' is 'TSD'"):
        REMI.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"config": {"use_programs": False}, "tokenization": "REMI", "miditok_version": "3.1.0"}))
    with pytest.raises(Exception, match="c.json: tokenizer use_programs"):
        REMI.from_miditok(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"tokenizer": "something else"}))
    with pytest.raises(CheckpointError, match="d.json: field 'tokenizer'"):
        REMI.load(tmp_path / "d.json")
