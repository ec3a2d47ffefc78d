"""Tests for midistral/controls/onsets.py (`OnsetConstraint`).

Oracle: the decoded piece (per track and onset tick, at most ten notes).
"""

import numpy as np
import pytest
import torch

from midistral.controls import BarsConstraint, OnsetConstraint
from midistral.generate import generate
from midistral.tokenize.grammar import GrammarConstraint
from midistral.tokenize.remi import Family

from test_controls import bpe_tok, tiny_transformer  # noqa: F401 (fixtures)

torch.set_num_threads(1)


def crowded_onsets(score) -> int:
    """Onsets of one track with more than ten notes."""
    return sum(int((np.unique(t.notes.numpy()["time"], return_counts=True)[1] > 10).sum()) for t in score.tracks)


@pytest.mark.parametrize("onsets", [False, True])
def test_at_most_ten_notes_per_instrument_and_onset(bpe_tok, onsets):  # noqa: F811
    """A random model leaning to notes piles them on one tick; with the constraint no track starts more than
    ten notes there, and the grammar and the bar count still hold."""
    t = bpe_tok
    model = tiny_transformer(len(t), seed=3)
    first = torch.tensor([int(e[0]) if len(e) else 0 for e in OnsetConstraint(t).exp])
    fam = torch.from_numpy(t.family.astype(np.int64))[first]
    bias = torch.zeros(len(t))
    for f, b in {Family.PROGRAM: 3.0, Family.PITCH: 4.0, Family.VELOCITY: 4.0, Family.DURATION: 4.0}.items():
        bias[:len(fam)][fam == f] = b
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    faults = 0
    for seed in range(3):
        bars = BarsConstraint(t, 2)
        cons = [GrammarConstraint(t)] + ([OnsetConstraint(t)] if onsets else []) + [bars]
        out = generate(model, torch.tensor([[t.bos_id]] * 2), 1500, temperature=1.0, top_k=50, eos_id=t.eos_id,
                       seed=seed, constraints=cons)
        for row, done in zip(out.numpy(), bars.complete):
            decoded, skipped = t.decode_with_report(row)
            assert skipped == 0 and (done or not onsets)
            faults += crowded_onsets(decoded)
    if onsets:
        assert faults == 0
    else:
        assert faults > 0, "the biased model should pile notes up without the constraint"


def test_masked_mass_goes_to_moving_on(bpe_tok):  # noqa: F811
    """The probability of the masked ids (here any note of an instrument that has ten at this onset) goes to the
    ids that move on in time, in proportion, not to other notes."""
    import symusic

    t = bpe_tok
    s = symusic.Score(480)
    tr = symusic.Track(program=0)
    for pitch in range(60, 70):  # ten notes at tick 0: the cap
        tr.notes.append(symusic.Note(0, 480, pitch, 80))
    s.tracks.append(tr)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    con = OnsetConstraint(t)
    con.start(torch.tensor([[t.bos_id] + t.encode(s).tolist()]))
    logits = torch.randn(1, len(t), generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    con.mask(logits)
    banned = torch.isinf(logits[0]) & ~torch.isinf(before[0])
    on = con._moves_on
    assert banned.any() and not (banned & on).any()
    p0, p1 = before[0].softmax(0), logits[0].softmax(0)
    assert float(p1[on].sum()) == pytest.approx(float(p0[on].sum() + p0[banned].sum()), rel=1e-5)
    others = ~on & ~banned
    assert torch.allclose(p1[others], p0[others], rtol=1e-5, atol=1e-9)  # untouched


def test_switching_to_a_full_instrument_is_masked(bpe_tok):  # noqa: F811
    """A Program token alone is no note, but the grammar wants a note of that instrument next: at the cap, the
    switch itself is masked (else only that instrument's notes would be left, and the mask would give way)."""
    import symusic

    t = bpe_tok
    s = symusic.Score(480)
    for program, pitches in ((0, range(60, 70)), (33, [40])):  # piano at the cap, bass with one note
        tr = symusic.Track(program=program)
        for pitch in pitches:
            tr.notes.append(symusic.Note(0, 480, pitch, 80))
        s.tracks.append(tr)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    con = OnsetConstraint(t)
    con.start(torch.tensor([[t.bos_id] + t.encode(s).tolist()]))
    banned = set(con._banned(0).tolist())
    exp = con.exp
    alone = {p: next(i for i, e in enumerate(exp) if e == [t.program_id[p]]) for p in (0, 33)}
    assert alone[0] in banned and alone[33] not in banned
