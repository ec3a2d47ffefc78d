"""Tests for midistral/controls/gaps.py (`GaplessConstraint`) and the styles' default controls in Sampler.

Oracles: the decoded piece (no beat of its meter's grid between its first onset and its last note's end in
which no note sounds), and the constraint's own exact path (the bar clock fed token by token) for its
vectorised tables.
"""

import json

import numpy as np
import pytest
import torch

from midistral.controls import BarsConstraint, GaplessConstraint, read_style_defaults, with_style_defaults
from midistral.generate import generate
from midistral.tokenize import load_score
from midistral.tokenize.grammar import GrammarConstraint
from midistral.tokenize.remi import Family

from test_controls import bpe_tok, pick, tiny_transformer  # noqa: F401 (fixtures)

torch.set_num_threads(1)


def silent_beats(score, since: int = 0) -> list[int]:
    """Beat lines (ticks, each meter section's own grid) of the beats in which no note sounds, between the
    piece's first onset (or `since`, if later) and its last note's end."""
    notes = np.concatenate([np.stack([n["time"], n["duration"]], 1) for n in (t.notes.numpy() for t in score.tracks)]
                           or [np.zeros((0, 2))]).astype(np.int64).reshape(-1, 2)
    if not len(notes):
        return []
    starts, ends = notes[:, 0], notes[:, 0] + notes[:, 1]
    first, last = int(starts.min()), int(ends.max())
    sigs = [(int(t.time), int(t.denominator)) for t in score.time_signatures] or [(0, 4)]
    silent = []
    for i, (at, den) in enumerate(sigs):
        stop = sigs[i + 1][0] if i + 1 < len(sigs) else last
        beat = score.ticks_per_quarter * 4 // den
        for b in range(at, stop, beat):
            if b >= max(first, since) and b + beat <= last and not ((starts < b + beat) & (ends > b)).any():
                silent.append(b)
    return silent


# A random model that likes to move on in time: without the constraint, its pieces fall silent often.
MOVING_BIAS = {Family.BAR: 2.0, Family.REST: 4.0, Family.POSITION: 3.0}


@pytest.mark.parametrize("gapless", [False, True])
def test_gapless_pieces_never_fall_silent_for_a_beat(bpe_tok, dev_midi_files, gapless):  # noqa: F811
    """From nothing and after a real prompt, 4 bars: with the constraint no beat after the first note is
    silent (and the grammar and the bar count still hold); without it the same draws have silent beats."""
    t = bpe_tok
    model = tiny_transformer(len(t), seed=7)
    # lean the random model towards time moves, so that gaps are likely
    first_base = torch.tensor([int(e[0]) if len(e) else 0 for e in GaplessConstraint(t).exp])
    fam = torch.from_numpy(t.family.astype(np.int64))[first_base]
    bias = torch.zeros(len(t))
    for f, b in MOVING_BIAS.items():
        bias[:len(fam)][fam == f] = b
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    path = pick(dev_midi_files, lambda r: r["programs"] == "0" and int(r["nonempty_tracks"]) == 1)
    score = load_score(path)
    piano = np.concatenate([[t.bos_id], t.encode(score.clip(0, score.tpq * 8, clip_end=True))])
    silent_total = 0
    for prompt_ids in (np.array([t.bos_id]), piano):
        for seed in range(6):
            bars = BarsConstraint(t, 4)
            cons = [GrammarConstraint(t), bars] + ([GaplessConstraint(t)] if gapless else [])
            out = generate(model, torch.from_numpy(np.stack([prompt_ids] * 2)), 2000, temperature=1.0, top_k=40,
                           eos_id=t.eos_id, seed=seed, constraints=cons)
            for row, done in zip(out.numpy(), bars.complete):
                decoded, skipped = t.decode_with_report(row)
                assert done and skipped == 0
                # the whole piece, from the prompt's end (the prompt, a real file, may have silences of its
                # own; the continuation's notes may start before that end, at the prompt's last onset)
                gaps = silent_beats(decoded, int(t.decode(prompt_ids).end()) if len(prompt_ids) > 1 else 0)
                silent_total += len(gaps)
                if gapless:
                    assert gaps == [], seed
    if not gapless:
        assert silent_total > 0, "the biased model should leave silent beats without the constraint"


def test_gapless_tables_agree_with_the_clock(bpe_tok, dev_midi_files):  # noqa: F811
    """The vectorised ban (per-meter tables of each id's time moves) equals the exact simulation on the bar
    clock, at states along real pieces, for every id the grammar could allow there (its Durations complete
    notes, its Positions lie inside the bar)."""
    t = bpe_tok
    con = GaplessConstraint(t)
    rng = np.random.default_rng(0)
    checked = banned = 0
    for path in dev_midi_files[:6]:
        ids = [t.bos_id] + t.encode(load_score(path)).tolist()[:400]
        con.start(torch.tensor([ids[:1]]))
        for k, nxt in enumerate(ids[1:]):
            clock = con.clocks[0]
            if clock.seen_note and k % 7 == 0:
                fast = con._banned(clock).numpy()
                tables = con._meter_tables(clock)
                for i in rng.choice(tables["fast"], min(80, len(tables["fast"])), replace=False).tolist():
                    c, valid = clock.copy(), True
                    for x in con.exp[i]:
                        f = t.family[x]
                        note = c.feed(x)
                        valid &= not (f == Family.DURATION and not note)
                        valid &= not (f == Family.POSITION and (x - t.pos0) * c.tpp >= c.bar_len)
                    if valid:
                        exact = con._opens_silence(clock, con.exp[i])
                        assert bool(fast[i]) == exact, (path.name, k, i)
                        checked, banned = checked + 1, banned + exact
            con.push(torch.tensor([nxt]))
    assert checked > 1000 and 0 < banned < checked


def test_gapless_leaves_a_row_alone_where_it_would_ban_everything(bpe_tok):  # noqa: F811
    t = bpe_tok
    con = GaplessConstraint(t)
    piece = t.encode(load_score_with_a_note(t)).tolist()
    con.start(torch.tensor([[t.bos_id] + piece]))
    clock = con.clocks[0]
    ban = con._banned(clock)
    assert clock.seen_note and ban.any()
    logits = torch.full((1, len(con.exp)), float("-inf"))
    logits[0, ban] = 1.0  # only silencing ids are left: the row keeps them
    before = logits.clone()
    con.mask(logits)
    assert torch.equal(logits, before)


def test_gapless_masks_what_only_leads_to_a_bar_with_the_bar_lines(bpe_tok):  # noqa: F811
    """A lone BPE "▁" expands to nothing and leads to a Bar: allowed while every Bar id is masked, a row whose
    other masks left only it wrote "▁" until its token budget ran out (found with --density beside it)."""
    t = bpe_tok
    con = GaplessConstraint(t)
    lone = [i for i in con._leads_to_bar if i < t.music_size]
    assert lone, "the BPE vocabulary should have a lone word start"
    con.start(torch.tensor([[t.bos_id] + t.encode(load_score_with_a_note(t)).tolist()]))
    ban = con._banned(con.clocks[0])
    assert ban[con._opens_bar].all() and ban[lone].all()


def load_score_with_a_note(t):
    import symusic

    s = symusic.Score(480)
    tr = symusic.Track(program=0)
    tr.notes.append(symusic.Note(0, 240, 60, 80))  # an eighth: moving to beat 3 leaves beat 2 silent
    s.tracks.append(tr)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    return s


# ----------------------------------------------------------------------------------------------------
# the styles' default controls


def test_style_defaults_fill_what_the_call_leaves_open():
    preset = {"polyphony": 4, "density": 16, "gapless": True}
    assert with_style_defaults(preset, True, None, None, None) == (16, 4, True, "--density 16 --polyphony 4 --gapless")
    # asked for: kept (density or polyphony given: neither default applies; --no-gapless wins)
    assert with_style_defaults(preset, True, "low", None, False) == ("low", None, False, "")
    # a prompt sets its own texture: only gapless applies
    assert with_style_defaults(preset, False, None, None, None) == (None, None, True, "--gapless")
    assert with_style_defaults({}, True, None, None, None) == (None, None, False, "")


def test_style_defaults_read_from_the_model_folder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"style_defaults": {"bach": {"gapless": True},
                                                                           "jazz": {"gapless": True}}}))
    assert read_style_defaults(tmp_path, ["bach", "folk"]) == {"bach": {"gapless": True}}  # unknown styles: out
    assert read_style_defaults(tmp_path / "missing", ["bach"]) == {}
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_style_defaults(tmp_path, ["bach"]) == {}
