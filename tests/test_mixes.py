"""Training mixes (midistral/data/mixes.py) on real files: fill-in-the-middle at bar boundaries, attribute
and style tokens. Checked by undoing each mix (the plain chunk comes back), against the per-bar values
BarStats gives (tested against MidiTok in test_tokenize_extra.py), and by the grammar: every mixed chunk
that opens a piece is a sentence of the grammar, token by token, in every mode."""

import json
from pathlib import Path

import numpy as np
import pytest

from midistral.data.dataset import TokenChunks, load_splits
from midistral.data.mixes import ChunkMixer, Mixes, add_extra_vocab
from midistral.config import load_config
from midistral.errors import ConfigError, MidiError
from midistral.tokenize import REMI
from midistral.tokenize.extra import BarStats
from midistral.tokenize.grammar import Grammar, Mode, mode_of


@pytest.fixture(scope="module")
def tok(dev_midi_files):
    t = REMI()
    t.train_bpe(dev_midi_files[:16], 1000, workers=1)
    add_extra_vocab(t, ["bach", "folk"])
    return t


@pytest.fixture(scope="module")
def pieces(tok, dev_midi_files):
    out = []
    for f in dev_midi_files:
        try:
            out.append(tok.encode(f))
        except MidiError:
            pass
    return out


def _framed(tok, ids, n):
    return np.r_[tok.bos_id, ids[:n - 1]] if n < len(ids) + 1 else np.r_[tok.bos_id, ids, tok.eos_id]


def _split_fim(tok, out):
    """(head + prefix, k, suffix, middle) of a mixed chunk in the tokenizer's layout."""
    e = tok.extra
    holes = np.flatnonzero(out == e.hole_id)
    fs = int(np.flatnonzero(out == e.fill_start_id)[0])
    assert out[-1] == e.fill_end_id and (np.diff(holes) == 1).all()
    k, suffix = len(holes), out[holes[-1] + 1:fs]
    if e.fim_layout == "psm":
        return out[:holes[0]], k, suffix, out[fs + 1:-1]
    after = out[fs + 1:-1]  # the prefix, then the middle's k whole bars
    cut = BarStats(tok).bar_starts(after)[-k]
    return np.r_[out[:holes[0]], after[:cut]], k, suffix, after[cut:]


@pytest.mark.parametrize("layout", ["spm", "psm"])
def test_infill_rearranges_whole_bars(tok, pieces, layout, monkeypatch):
    monkeypatch.setattr(tok.extra, "fim_layout", layout)
    mixer = ChunkMixer(tok, Mixes(infill=1.0, infill_max_bars=4, fim_layout=layout))
    stats = BarStats(tok)
    rng = np.random.default_rng(0)
    done = 0
    for ids in pieces:
        for n in (64, 200, 10_000):
            seq = _framed(tok, ids, n)
            out = mixer.mix(seq, None, rng)
            if tok.extra.hole_id not in out:
                continue
            prefix, k, suffix, middle = _split_fim(tok, out)
            assert 1 <= k <= 4
            assert len(stats.bar_starts(middle)) == k and stats.bar_starts(middle)[0] == 0  # k whole bars
            plain = np.r_[prefix, middle, suffix]
            assert (plain == seq[:len(plain)]).all()
            if seq[-1] == tok.eos_id:
                assert len(seq) - len(plain) == 1  # only EOS dropped
            else:  # the bar the chunk cuts is dropped
                assert len(seq) - len(plain) == len(seq) - stats.bar_starts(seq)[-1]
            done += 1
            short = mixer.mix(seq, None, np.random.default_rng(n), max_len=150)
            if tok.extra.hole_id in short:  # made to fit: the middle whole, at the end
                assert len(short) <= 150 and len(stats.bar_starts(_split_fim(tok, short)[3])) >= 1
    assert done > 20


def test_attributes_and_style_are_inputs_placed_before_bars(tok, pieces):
    mixer = ChunkMixer(tok, Mixes(attributes=1.0, style=1.0))
    stats, e = BarStats(tok), tok.extra
    for ids in pieces[:6]:
        seq = _framed(tok, ids, 10_000)
        out = mixer.mix(seq, "folk", np.random.default_rng(1))
        assert out[0] == tok.bos_id and out[1] == e.id["Style_folk"]
        assert [e.kind(i) for i in out[2:6]] == ["ACTrackNoteDensityMin", "ACTrackNoteDensityMax",
                                                 "ACTrackOnsetPolyphonyMin", "ACTrackOnsetPolyphonyMax"]
        assert (out[~e.is_extra(out)] == seq).all()
        starts = stats.bar_starts(seq)
        dens, pmin, pmax = stats.per_bar(seq, starts)
        at = np.flatnonzero(np.isin(out, [i for t, i in e.id.items() if t.startswith("ACBarNoteDensity")]))
        assert len(at) == len(starts) - (seq[-1] != tok.eos_id)  # a bar the chunk cuts gets none
        for j, a in enumerate(at):
            assert out[a:a + 3].tolist() == e.bar_ids(dens[j], pmin[j], pmax[j])
            assert stats.starts_bar[out[a + 3]] or stats.empty[out[a + 3]]
        assert mixer.input_only[out[1:at[-1] + 3]][e.is_extra(out[1:at[-1] + 3])].all()
    plain = ChunkMixer(tok, Mixes(attributes=1.0, style=1.0)).mix(seq, None, np.random.default_rng(1))
    assert e.id["Style_folk"] not in plain and e.id["Style_bach"] not in plain  # no style when none is known


@pytest.mark.parametrize("mixes", [Mixes(infill=1.0), Mixes(infill=1.0, attributes=1.0, style=1.0),
                                   Mixes(attributes=1.0, style=1.0)])
def test_mixed_chunks_are_sentences_of_the_grammar(tok, pieces, mixes):
    grammar = Grammar(tok, holes=True)  # the hole is given at sampling; here it must fit where it stands
    mixer = ChunkMixer(tok, mixes)
    rng = np.random.default_rng(2)
    modes = set()
    for ids in pieces:
        out = mixer.mix(_framed(tok, ids, 10_000), "bach", rng)
        state = grammar.run(out[:1])
        for i, t in enumerate(out[1:].tolist()):
            assert grammar.legal(state, t), (i, tok.extra.tokens[t - tok.music_size] if t >= tok.music_size else t)
            state = grammar.step(state, t)
            modes.add(mode_of(state))
    assert (Mode.MIDDLE in modes) == (mixes.infill > 0)


def _prepared(folder, tok, pieces, train_styles):
    """A prepared folder holding `pieces` in both splits, the training pieces of `train_styles`."""
    offs = np.r_[0, np.cumsum([len(p) for p in pieces])]
    for split in ("train", "val"):
        np.concatenate(pieces).astype(np.uint16).tofile(folder / f"{split}.bin")
        np.save(folder / f"{split}.idx.npy", offs)
    shards = {p.name: {"bytes": p.stat().st_size} for p in folder.iterdir()}
    tok_plain = REMI.from_dict({k: v for k, v in tok.to_dict().items() if k != "extra"})
    tok_plain.save(folder / "tokenizer.json")
    (folder / "manifest.json").write_text(json.dumps({
        "format": "midistral.data", "version": 2, "dtype": "uint16", "vocab_size": len(tok_plain),
        "fingerprint": "test", "shards": shards,
        "counts": {"train": {"piece_styles": train_styles}, "val": {"piece_styles": [None] * len(pieces)}}}))
    return tok_plain


def test_token_chunks_mix_training_only_and_deterministically(tmp_path, tok, pieces):
    tok_plain = _prepared(tmp_path, tok, pieces, ["folk"] * len(pieces))
    t, train, val = load_splits(tmp_path, 16, 128, Mixes(infill=0.5, attributes=0.5, style=1.0), seed=3)
    assert t.extra.styles == ["folk"] and len(t) == len(tok_plain) + len(t.extra)
    idx = np.arange(len(train))
    x1, y1 = train.batch(idx)
    again = TokenChunks(tmp_path, "train", 16, 128, t.bos_id, t.eos_id, t.pad_id, mixer=train.mixer, seed=3)
    x2, y2 = again.batch(idx)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert x1.shape[1] <= 128 and int(x1.max()) < len(t)
    assert 0.1 < (x1 == t.extra.hole_id).any(1).float().mean() <= 0.5  # fill-in-the-middle needs 2 bars or more
    assert not (y1 == t.extra.hole_id).any() and (y1 == t.extra.fill_end_id).any()
    xv, _ = val.batch(np.arange(len(val)))
    assert int(xv.max()) < t.music_size  # validation stays plain
    _, plain_train, _ = load_splits(tmp_path, 16, 128)
    assert plain_train.mixer is None


def test_style_repeats_list_a_styles_training_chunks_more_often(tmp_path, tok, pieces):
    styles = ["bach" if i % 3 == 0 else "folk" for i in range(len(pieces))]
    _prepared(tmp_path, tok, pieces, styles)
    _, once, val_once = load_splits(tmp_path, 16, 128, Mixes(infill=0.5, style=1.0), seed=3)
    _, more, val = load_splits(tmp_path, 16, 128, Mixes(infill=0.5, style=1.0), seed=3, style_repeats={"bach": 3})
    bach = np.array([styles[p] == "bach" for p in once.chunk_piece.tolist()])
    assert bach.any() and len(more) == len(once) + 2 * bach.sum() and len(val) == len(val_once)
    chunks = lambda c: list(zip(c.chunk_piece.tolist(), c.chunk_start.tolist()))  # noqa: E731
    counts = {k: chunks(more).count(k) for k in set(chunks(once))}
    assert all(n == (3 if styles[piece] == "bach" else 1) for (piece, _), n in counts.items())
    x, _ = more.batch(np.flatnonzero(more.chunk_piece == more.chunk_piece[0])[:3])  # one chunk's copies
    assert len({tuple(r.tolist()) for r in x}) > 1  # each copy mixed on its own draws
    with pytest.raises(ConfigError, match=r"data.style_repeats: no piece of style 'bahc'.*bach, folk"):
        load_splits(tmp_path, 16, 128, style_repeats={"bahc": 2})


@pytest.mark.parametrize("value", ["{bach = 0}", "{bach = 1.5}", "3", '{"" = 2}'])
def test_style_repeats_bad_values_name_the_key(value):
    with pytest.raises(ConfigError, match="data.style_repeats"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "music21.toml", [f"data.style_repeats={value}"])


def test_the_layout_is_saved_with_the_tokens_and_a_run_may_change_it(tok):
    """data.fim_layout goes into the tokenizer (sampling builds its prompt from it); a run may start from a
    checkpoint trained in the other layout (train.init_from compares what the ids mean, not the layout)."""
    from midistral.runs import _vocabulary

    a = REMI.from_dict(tok.to_dict())
    b = REMI.from_dict(tok.to_dict())
    add_extra_vocab(a, fim_layout="spm")
    add_extra_vocab(b, fim_layout="psm")
    assert REMI.from_dict(a.to_dict()).extra.fim_layout == "spm" and REMI.from_dict(b.to_dict()).extra.fim_layout == "psm"
    assert _vocabulary(a) == _vocabulary(b) and a.to_dict() != b.to_dict()
    b.extra.params["polyphony_max"] += 1
    assert _vocabulary(a) != _vocabulary(b)
