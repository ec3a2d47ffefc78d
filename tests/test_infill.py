"""Infilling at sampling (midistral/controls/infill.py) on real files with a tiny randomly initialised model: the
structure, not the quality. Notes outside the span are compared with the original file's own notes."""

import numpy as np
import pytest
import torch

from midistral.errors import MidistralError
from midistral.controls.infill import infill, infill_prompt
from midistral.model import ModelConfig, Transformer
from midistral.tokenize import REMI
from midistral.tokenize.grammar import Grammar, Mode, mode_of
from midistral.tokenize.remi import load_score

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok(extra_tok):
    return extra_tok


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=8192)
    return Transformer(cfg, attn_backend="torch")


def _notes(score, track_filter=lambda tr: True):
    out = []
    for tr in score.tracks:
        if track_filter(tr):
            a = tr.notes.numpy()
            prog = -1 if tr.is_drum else int(tr.program)
            out += [(prog, *x) for x in zip(*(a[f].tolist() for f in ("time", "duration", "pitch", "velocity")))]
    return sorted(out)


def _span(tok, score, a, b):
    return infill_prompt(tok, score, a, b)[2]


@pytest.mark.parametrize("name", ["music21__cs1-1pre.mid", "lmd__Predictable.mid", "miditok__POP909_010.mid"])
def test_infill_keeps_every_note_outside_the_span(name, tok, model, dev_midi_files):
    f = next(p for p in dev_midi_files if p.name == name)
    score = load_score(f)
    lo, hi = _span(tok, score, 3, 4)
    results = infill(model, tok, score, bars=(3, 4), num_samples=2, seed=0, temperature=1.0, top_k=None,
                     max_new_tokens=120)
    outside = lambda n: not lo <= n[1] < hi  # noqa: E731
    want = [n for n in _notes(score) if outside(n)]
    programs = {n[0] for n in _notes(score)}
    for r in results:
        got = _notes(r.score)
        assert [n for n in got if outside(n)] == want  # kept exactly (ticks; the tempo map is the original's)
        new = [n for n in got if not outside(n)]
        assert len(new) == r.new_notes and all(n[1] + n[2] <= hi for n in new)  # inside, cut at the span's end
        assert {n[0] for n in new} <= programs  # only the piece's instruments
        assert r.skipped == 0 and r.tokens > 0
        assert r.score.ticks_per_quarter == score.ticks_per_quarter
        assert [(t.time, t.qpm) for t in r.score.tempos] == [(t.time, t.qpm) for t in score.tempos]


def test_infill_of_some_tracks_keeps_the_others(tok, model, dev_midi_files):
    f = next(p for p in dev_midi_files if p.name == "lmd__Predictable.mid")
    score = load_score(f)
    progs = sorted({-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)})
    chosen = progs[:1]
    lo, hi = _span(tok, score, 2, 3)
    r = infill(model, tok, score, bars=(2, 3), tracks=chosen, seed=1, max_new_tokens=150)[0]
    other = lambda tr: (-1 if tr.is_drum else tr.program) not in chosen  # noqa: E731
    assert _notes(r.score, other) == _notes(score, other)
    assert all(n[0] in chosen for n in _notes(r.score) if lo <= n[1] < hi and n not in _notes(score))


def test_the_middle_has_the_bars_asked_for(tok, model, dev_midi_files):
    from midistral.generate import generate
    from midistral.controls.infill import BarCount
    from midistral.tokenize.extra import BarStats
    from midistral.tokenize.grammar import GrammarConstraint

    f = next(p for p in dev_midi_files if p.name == "music21__cs1-1pre.mid")
    prompt = infill_prompt(tok, load_score(f), 2, 4)[0]
    g = Grammar(tok)
    assert mode_of(g.run(prompt)) == Mode.MIDDLE
    out = generate(model, torch.tensor(prompt)[None].repeat(3, 1), 400, temperature=1.0, top_k=None,
                   eos_id=tok.extra.fill_end_id, seed=3,
                   constraints=[GrammarConstraint(tok, 400), BarCount(tok, 3, [0, 52, 68, 71])])
    for row in out[:, len(prompt):].tolist():
        if tok.extra.fill_end_id in row:
            middle = row[:row.index(tok.extra.fill_end_id)]
            assert len(BarStats(tok).bar_starts(np.array(middle))) == 3


def test_errors(tok, model, dev_midi_files):
    f = next(p for p in dev_midi_files if p.name == "music21__cs1-1pre.mid")
    with pytest.raises(MidistralError, match="the piece has bars 1-"):
        infill(model, tok, f, bars=(3, 999))
    with pytest.raises(MidistralError, match="style 'folk'"):
        infill(model, tok, f, bars=(1, 1), style="folk")
    plain = REMI()
    with pytest.raises(MidistralError, match="not trained for infilling"):
        infill(model, plain, f, bars=(1, 2))


# ----------------------------------------------------------------------------------------------------
# Sampler.infill: the library call the CLI and the studio use

def test_sampler_infill_keeps_the_outside_and_writes_inside(tok, model, dev_midi_files):
    from midistral.sampler import Sampler

    f = next(p for p in dev_midi_files if p.name == "lmd__Predictable.mid")
    score = load_score(f)
    lo, hi = _span(tok, score, 2, 3)
    seen = []
    samples = Sampler(model, tok).infill(f, (2, 3), num_samples=2, seed=0, temperature=1.0, top_k=0,
                                         max_new_tokens=150, on_progress=lambda i, n: seen.append(i))
    outside = lambda n: not lo <= n[1] < hi  # noqa: E731
    want = [n for n in _notes(score) if outside(n)]
    assert len(samples) == 2 and seen
    assert sum(len([n for n in _notes(s.score) if not outside(n)]) for s in samples) > 0  # the span got notes
    for s in samples:
        got = _notes(s.score)
        assert [n for n in got if outside(n)] == want
        new = [n for n in got if not outside(n)]
        assert all(lo <= n[1] < hi and n[1] + n[2] <= hi for n in new)
        assert s.skipped == 0 and s.start_tick == lo and set(s.metrics) >= {"silent_share", "loop_score"}
        assert s.report.startswith("infill bars 2-3: ") and "kept" in s.report and "new" in s.report
        kept = sum(int(x.split("kept ")[1].split(",")[0]) for x in s.report.split(": ", 1)[1].split("; "))
        assert kept == len(want)
        assert "bars" in s.line and "skipped 0" in s.line


def test_sampler_infill_of_one_track_keeps_the_others(tok, model, dev_midi_files):
    from midistral.general_midi import program_name
    from midistral.sampler import Sampler

    f = next(p for p in dev_midi_files if p.name == "lmd__Predictable.mid")
    score = load_score(f)
    progs = sorted({-1 if t.is_drum else t.program for t in score.tracks if len(t.notes)})
    s = Sampler(model, tok).infill(f, (2, 3), tracks=[progs[0]], seed=1, max_new_tokens=150)[0]
    other = lambda tr: (-1 if tr.is_drum else tr.program) != progs[0]  # noqa: E731
    assert _notes(s.score, other) == _notes(score, other)
    assert "(not regenerated)" in s.report and f"{program_name(progs[0])} kept" in s.report


def test_sampler_infill_errors_are_one_line(tok, model, dev_midi_files):
    from midistral.sampler import Sampler

    f = next(p for p in dev_midi_files if p.name == "music21__cs1-1pre.mid")
    sampler = Sampler(model, tok)
    for bars, tracks, match in [((3, 999), None, "the piece has bars 1-"), ((3, 2), None, "first bar is after"),
                                ((1, 2), "bass", "not in the piece")]:
        with pytest.raises(MidistralError, match=match) as e:
            sampler.infill(f, bars, tracks=tracks)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(f))
    with pytest.raises(MidistralError, match="data.infill = 0.3") as e:
        Sampler(model, REMI()).infill(f, (1, 2))
    assert "\n" not in str(e.value) and "not trained for infilling" in str(e.value)


@pytest.mark.parametrize("layout", ["spm", "psm"])
def test_the_prompt_follows_the_layout_the_model_learnt(tok, dev_midi_files, layout, monkeypatch):
    from midistral.tokenize import REMI

    monkeypatch.setattr(tok.extra, "fim_layout", layout)
    e, score = tok.extra, load_score(next(p for p in dev_midi_files if p.name == "music21__cs1-1pre.mid"))
    prompt, _, _, prefix = infill_prompt(tok, score, 3, 4)
    bars = tok.base_ids_by_bar(score)
    suffix = tok.bpe.encode_bars(bars[4:])
    holes = [e.hole_id] * 2
    want = ([*prefix, *holes, *suffix, e.fill_start_id] if layout == "psm"
            else [*holes, *suffix, e.fill_start_id, *prefix])
    assert prompt.tolist() == [tok.bos_id, *want] and len(prefix) > 0
    assert mode_of(Grammar(tok).run(prompt)) == Mode.MIDDLE
    # a tokenizer saved before the layout was recorded was trained prefix-suffix-middle
    old = {**tok.to_dict(), "extra": {k: v for k, v in tok.extra.to_dict().items() if k != "fim_layout"}}
    assert REMI.from_dict(old).extra.fim_layout == "psm"
