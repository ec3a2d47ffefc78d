"""The model that ships in the repository (models/default): present, small, complete, and used with no --ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midistral.checkpoint import DEFAULT_MODEL, read_model_config
from midistral.general_midi import parse_programs
from midistral.sample import main as sample_main
from midistral.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["bach", "classical", "folk", "renaissance"]


@pytest.fixture(scope="module")
def sampler():
    return Sampler.load()


def test_the_shipped_model_is_complete_and_small():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json", "MODEL_CARD.md"} <= names
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) < 26 * 2**20
    cfg = read_model_config(DEFAULT_MODEL)
    assert cfg.num_hidden_layers >= 4 and cfg.hidden_size >= 256


def test_it_knows_many_instruments_and_four_styles(sampler):
    known = sampler.known_programs
    # piano, strings, guitar, bass, brass, winds, voices: the README's examples use these
    assert set(parse_programs("piano,bass,violin,cello,guitar,trumpet,flute,choir")) <= known
    assert -1 not in known  # no drums: MODEL_CARD.md says so
    assert sampler.styles == STYLES
    man = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    assert man["styles"] == STYLES


def test_sample_py_with_no_ckpt_writes_a_styled_piece(tmp_path, capsys):
    assert sample_main(["--style", "folk", "--bars", "2", "--seed", "0", "--out", str(tmp_path)]) == 0
    mids = list(tmp_path.glob("*.mid"))
    assert len(mids) == 1
    assert str(DEFAULT_MODEL) in capsys.readouterr().err


def test_list_styles_of_the_default(capsys):
    assert sample_main(["--list-styles"]) == 0
    assert capsys.readouterr().out.split() == STYLES


def test_the_examples_continue_with_the_default(sampler):
    out = sampler.sample(ROOT / "examples" / "prompt.mid", bars=2, seed=0, programs="piano,bass")
    assert out[0].skipped == 0
    assert out[0].score.note_num() > 0


def test_new_notes_are_played_once_per_instrument_onset_and_pitch(sampler):
    """The model doubles notes (same instrument, onset and pitch) in polyphonic styles; the written piece does not."""
    out = sampler.sample(None, style="classical", bars=4, num_samples=4, seed=3)

    def doubled(score):
        keys = [(i, n.time, n.pitch) for i, t in enumerate(score.tracks) for n in t.notes]
        return len(keys) - len(set(keys))

    raw = [sampler.tok.decode_with_report(s.new_ids)[0] for s in out]  # what the ids say, before the merge
    assert sum(doubled(r) for r in raw) > 0
    assert all(doubled(s.score) == 0 for s in out)
