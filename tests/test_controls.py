"""Tests for midistral/controls/: instruments, length in bars, accompaniment.

Oracles: the tokenizer's own decoder (notes, programs, bar lines of the decoded piece, via symusic's
downbeats), the encoder (the walked stream must be exactly the encoding of the piece with its new notes),
and the input file itself (its notes must come back unchanged).
"""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import symusic
import torch
import torch.nn as nn

from midistral.controls import (BarsConstraint, EveryBarConstraint, ProgramsConstraint, accompany, bars_token_budget, known_programs,
                                parse_bar_range, parse_programs, program_name, unknown_instruments_note)
from midistral.controls.accompany import Walk
from midistral.controls.feeder import Feeder
from midistral.errors import MidistralError
from midistral.generate import generate
from midistral.model import ModelConfig, Transformer
from midistral.tokenize import REMI, load_score
from midistral.tokenize.grammar import GrammarConstraint
from midistral.tokenize.remi import Family

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# models and tokenizers


class RandomLogits(nn.Module):
    """A 'model' drawing seeded random logits (plus a bias per token family): cheap, any length."""

    def __init__(self, tok, seed=0, bias=None):
        super().__init__()
        self.cfg = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1, hidden_size=1,
                                   num_attention_heads=1, sliding_window=4, max_position_embeddings=1 << 20)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.g = torch.Generator().manual_seed(seed)
        self.bias = torch.zeros(len(tok))
        base_fam = torch.from_numpy(tok.family.astype(np.int64))
        fam = base_fam[torch.from_numpy(np.array([e[0] if len(e) else 0 for e in _exp(tok)]))]
        for f, b in (bias or {}).items():
            self.bias[fam == f] = b

    def forward(self, ids, cache=None, start_pos=0, last_only=False):  # every row either way: the same stream
        return torch.randn(ids.shape[0], ids.shape[1], len(self.bias), generator=self.g) * 2 + self.bias


def _exp(tok):
    from midistral.controls import id_expansions

    return id_expansions(tok)


BAR_BIAS = {Family.BAR: 4.0, Family.REST: 4.0, Family.TIME_SIG: 3.0, Family.POSITION: 2.0, Family.PROGRAM: 2.0,
            Family.PITCH: 1.0, Family.VELOCITY: 3.0, Family.DURATION: 3.0}


NOTE_BIAS = {Family.PROGRAM: 3.0, Family.PITCH: 2.0, Family.PITCH_DRUM: 2.0, Family.VELOCITY: 4.0,
             Family.DURATION: 4.0}


def tiny_transformer(vocab, seed=0, max_pos=4096):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=max_pos)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return REMI()


@pytest.fixture(scope="module")
def bpe_tok(dev_midi_files):
    t = REMI()
    small = [f for f in dev_midi_files if f.stat().st_size < 20000][:12]
    t.train_bpe(small, vocab_size=len(t.vocab) + 300, workers=1)
    return t


def manifest(dev_midi_files):
    path = dev_midi_files[0].parent.parent / "MANIFEST.tsv"
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    return {Path(r["file"]).name: r for r in rows}


def pick(dev_midi_files, cond):
    """The smallest dev file (by notes) whose MANIFEST row satisfies cond."""
    m = manifest(dev_midi_files)
    ok = [f for f in dev_midi_files if f.name in m and int(m[f.name]["notes"] or 0) > 0 and cond(m[f.name])]
    return min(ok, key=lambda f: int(m[f.name]["notes"]))


def decoded_bar_of_notes(score):
    """Bar index of every note onset, from the decoded piece's own time signatures (symusic's downbeats)."""
    downbeats = score.get_downbeats()
    ons = np.concatenate([t.notes.numpy()["time"] for t in score.tracks]) if score.tracks else np.zeros(0, int)
    return np.searchsorted(downbeats, ons, side="right") - 1


# ----------------------------------------------------------------------------------------------------
# instruments


def test_parse_programs_numbers_and_names():
    assert parse_programs("0,33,-1") == [0, 33, -1]
    assert parse_programs("piano, bass ,drums") == [0, 33, -1]
    assert parse_programs("Acoustic Guitar (nylon),violin,Cello") == [24, 40, 42]
    assert parse_programs(["strings", 73, "flute"]) == [48, 73]
    assert program_name(-1) == "Drums" and program_name(33) == "Electric Bass (finger)"


@pytest.mark.parametrize("spec, named", [("piano,banjoo", "banjoo"), ("128", "128"), ("0,-2", "-2"),
                                         ("kazooka", "kazooka"), ("", "''")])
def test_parse_programs_errors_name_the_value(spec, named):
    with pytest.raises(MidistralError) as e:
        parse_programs(spec)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_known_programs_from_the_manifest_of_a_run(tmp_path):
    """The run's data manifest names the programs of its training split; found from the run folder, a
    checkpoint folder in it, or the data folder; None where there is no training data to read."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "best").mkdir()
    (run / "data" / "manifest.json").write_text(json.dumps({"programs": {"68": 12, "73": 3, "-1": 0}}))
    for where in (run, run / "best", run / "data"):
        assert known_programs(where) == {68, 73}
    assert known_programs(tmp_path / "nowhere") is None and known_programs(None) is None


def test_known_programs_scan_the_train_shard_without_a_table(tok, bpe_tok, dev_midi_files, tmp_path):
    """Without a programs table: the Program tokens of train.bin (BPE ids expanded), against the decoder's
    own reading of the same ids."""
    files = [pick(dev_midi_files, CASES["multi-track with drums"]), pick(dev_midi_files, CASES["single-track"])]
    for t in (tok, bpe_tok):
        ids = np.concatenate([t.encode(short(load_score(f), 4)) for f in files]).astype(np.uint16)
        data = tmp_path / f"data{len(t)}"
        data.mkdir()
        ids.tofile(data / "train.bin")
        t.save(data / "tokenizer.json")
        (data / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
        want = {-1 if tr.is_drum else tr.program for tr in t.decode(ids.astype(np.int64)).tracks}
        assert known_programs(data, t) == want and known_programs(data) == want


def test_unknown_instruments_note_names_what_the_model_knows():
    assert unknown_instruments_note([33], None) is None and unknown_instruments_note([68], {68, 70}) is None
    note = unknown_instruments_note([33, 68], {68, 70, 71, 73})
    assert note == ("the model never learned Electric Bass (finger) (it may stay silent); "
                    "it knows Oboe, Bassoon, Clarinet, Flute")
    many = unknown_instruments_note([-1], set(range(20)))
    assert "Drums" in many and many.endswith("and 8 more") and "\n" not in many


def test_accompany_and_the_sampler_say_when_the_model_never_learned_the_instrument(tok, dev_midi_files, tmp_path):
    from midistral.checkpoint import save_checkpoint
    from midistral.sampler import Sampler

    path = pick(dev_midi_files, CASES["single-track"])
    piece = short(load_score(path), 2)
    model = tiny_transformer(len(tok), seed=7)
    said = []
    accompany(model, tok, piece, "bass", seed=0, known={0, 68}, log=said.append)
    assert said == ["note: the model never learned Electric Bass (finger) (it may stay silent); "
                    "it knows Acoustic Grand Piano, Oboe"]
    with pytest.warns(UserWarning, match="never learned Drums"):
        accompany(model, tok, piece, "drums", seed=0, known={0, 68})
    run = tmp_path / "run"
    save_checkpoint(run / "best", model, tok)
    (run / "data").mkdir()
    (run / "data" / "manifest.json").write_text(json.dumps({"programs": {"0": 5, "68": 2}}))
    sampler = Sampler.load(run)
    (s,) = sampler.accompany(piece, "bass", seed=0)
    assert "never learned Electric Bass (finger)" in s.report and "it knows Acoustic Grand Piano, Oboe" in s.report
    (s,) = sampler.sample(None, programs="piano,banjo", bars=1, seed=0)
    assert s.report.endswith("[the model never learned Banjo (it may stay silent); it knows Acoustic Grand Piano, Oboe]")
    (s,) = sampler.sample(None, programs="piano", bars=1, seed=0)
    assert "never learned" not in s.report


def _programs_of_new_notes(tok, prompt_ids, out_row):
    """Programs of the notes the continuation added (decoded; prompt notes removed by count per program)."""
    full = tok.decode(out_row)
    before = tok.decode(prompt_ids) if len(prompt_ids) > 1 else symusic.Score(24)
    count = {(-1 if t.is_drum else t.program): len(t.notes) for t in before.tracks}
    return {(-1 if t.is_drum else t.program) for t in full.tracks
            if len(t.notes) > count.get(-1 if t.is_drum else t.program, 0)}


@pytest.mark.parametrize("use_bpe", [False, True])
@pytest.mark.parametrize("use_grammar", [False, True])
def test_programs_mask_is_exact(tok, bpe_tok, use_bpe, use_grammar):
    t = bpe_tok if use_bpe else tok
    # without the grammar a random transformer rarely completes a note: random logits biased to notes do
    model = tiny_transformer(len(t), seed=1) if use_grammar else RandomLogits(t, seed=1, bias=NOTE_BIAS)
    allowed = parse_programs("piano,bass,drums")
    n_notes = 0
    for seed in range(13):  # 13 seeds x 4 rows = 52 samples
        prompt = torch.tensor([[t.bos_id]] * 4)
        cons = ([GrammarConstraint(t, 120)] if use_grammar else []) + [ProgramsConstraint(t, allowed)]
        out = generate(model, prompt, 120, temperature=1.5, top_k=None, eos_id=t.eos_id, seed=seed, constraints=cons)
        for row in out.numpy():
            score = t.decode(row)
            progs = {(-1 if tr.is_drum else tr.program) for tr in score.tracks}
            n_notes += score.note_num()
            assert progs <= set(allowed), (seed, progs)
    assert n_notes > 50


def test_programs_keep_the_prompt_unless_excluded(tok, dev_midi_files):
    path = pick(dev_midi_files, lambda r: r["programs"] == "0" and int(r["nonempty_tracks"]) == 1)
    score = load_score(path)
    score = score.clip(0, score.tpq * 16, clip_end=True)
    prompt_ids = np.concatenate([[tok.bos_id], tok.encode(score)])
    model = RandomLogits(tok, seed=3, bias={Family.PROGRAM: 3.0})
    prompt = torch.from_numpy(np.stack([prompt_ids] * 4))
    for cons, expect in ((ProgramsConstraint(tok, [33]), {0, 33}),
                         (ProgramsConstraint(tok, [33], exclude=["piano"]), {33}),
                         (ProgramsConstraint(tok, [40], keep_prompt=False), {40})):
        out = generate(model, prompt, 200, temperature=1.0, top_k=None, eos_id=tok.eos_id, seed=0,
                       constraints=[cons])
        for row in out.numpy():
            assert _programs_of_new_notes(tok, prompt_ids, row) <= expect


# ----------------------------------------------------------------------------------------------------
# length in bars


def test_bars_exact_for_1_to_64(tok):
    """N new bars, counted in the decoded piece: the last note starts in bar N, none after (random logits)."""
    bos = torch.tensor([[tok.bos_id]] * 2)
    for n in range(1, 65):
        model = RandomLogits(tok, seed=n, bias=BAR_BIAS)
        con = BarsConstraint(tok, n)
        out = generate(model, bos, bars_token_budget(model, 1), temperature=1.0, top_k=None, eos_id=tok.eos_id,
                       seed=n, constraints=[con])
        assert all(con.complete)
        for row in out.numpy():
            bars = decoded_bar_of_notes(tok.decode(row))
            assert bars.max() + 1 == n, (n, bars.max() + 1)


@pytest.mark.parametrize("use_bpe", [False, True])
def test_bars_exact_after_a_real_prompt_with_grammar(tok, bpe_tok, dev_midi_files, use_bpe):
    t = bpe_tok if use_bpe else tok
    path = pick(dev_midi_files, lambda r: int(r["time_sig_changes"]) > 0 and int(r["nonempty_tracks"]) >= 2)
    score = load_score(path)
    prompt_ids = np.concatenate([[t.bos_id], t.encode(score.clip(0, score.tpq * 12, clip_end=True))])
    prompt_bar = decoded_bar_of_notes(t.decode(prompt_ids)).max()
    model = tiny_transformer(len(t), seed=2)
    checked = 0
    for n in (1, 3, 8):
        con = BarsConstraint(t, n)
        prompt = torch.from_numpy(np.stack([prompt_ids] * 3))
        out = generate(model, prompt, 3000, temperature=1.2, top_k=None, eos_id=t.eos_id, seed=n,
                       constraints=[GrammarConstraint(t), con])
        for row, done in zip(out.numpy(), con.complete):
            if done:  # a random model may not reach n bars in the token budget; complete says so
                assert decoded_bar_of_notes(t.decode(row)).max() - prompt_bar == n
                checked += 1
    assert checked >= 3


def test_bars_from_nothing_with_grammar_and_programs(tok):
    """From BOS alone the stream opens with a Bar (the grammar asks for one): the three constraints together
    always leave an id to sample, and the decoded piece has exactly n bars in the chosen programs."""
    model = tiny_transformer(len(tok), seed=0)
    bos = torch.tensor([[tok.bos_id]] * 2)
    for seed in range(6):
        con = BarsConstraint(tok, 3)
        out = generate(model, bos, bars_token_budget(model, 1), temperature=0.8, top_k=20, no_repeat_ngram_size=4,
                       eos_id=tok.eos_id, seed=seed,
                       constraints=[GrammarConstraint(tok), ProgramsConstraint(tok, [-1, 33]), con])
        for row, done in zip(out.numpy(), con.complete):
            assert done
            assert decoded_bar_of_notes(tok.decode(row)).max() + 1 == 3
            assert set(_programs_of_new_notes(tok, bos[:1], row)) <= {-1, 33}


def test_bars_closing_id_that_goes_on_gives_its_mass_to_eos(bpe_tok, dev_midi_files):
    """In the last bar, an id that closes it and goes on with the next bar's notes (in BPE a Bar opens an id
    with what follows) is masked and its probability goes to EOS: the model asked to end the bar. Masking it
    alone had left that mass to more notes of the last bar (hundreds, with a pop model)."""
    t = bpe_tok
    exp = _exp(t)
    opens_bar = [i for i, e in enumerate(exp) if len(e) and t.family[e[0]] == Family.BAR]
    goes_on = [i for i in opens_bar if any(t.family[x] in (Family.PITCH, Family.PITCH_DRUM) for x in exp[i])]
    assert goes_on, "the BPE vocabulary should merge a Bar with the notes after it"
    path = pick(dev_midi_files, lambda r: int(r["nonempty_tracks"]) >= 2 and int(r["notes"]) >= 100)
    ids = t.encode(load_score(path)).tolist()
    starts = [k for k, i in enumerate(ids) if i in set(opens_bar)]
    has_note = lambda span: any(t.family[x] == Family.PITCH for i in span for x in exp[i])  # noqa: E731
    k = next(k for k in range(1, len(starts) - 1) if has_note(ids[starts[k]:starts[k + 1]]))
    con = BarsConstraint(t, 1)  # the prompt ends in bar k - 1; bar k, with notes, is the one new bar
    con.start(torch.tensor([[t.bos_id] + ids[:starts[k]]]))
    for i in ids[starts[k]:starts[k + 1]]:
        con.push(torch.tensor([i]))
    logits = torch.zeros(2, len(exp))
    logits[:, goes_on[0]] = 20.0
    logits[1, t.eos_id] = float("-inf")  # EOS banned before (min_new_tokens): it stays banned
    con.rows.append(dict(con.rows[0], cache={}))
    con.mask(logits)
    assert torch.isinf(logits[:, goes_on]).all()
    assert logits[0, t.eos_id] == pytest.approx(float(torch.logsumexp(torch.tensor([0.0, 20.0]), 0)), abs=1e-4)
    assert torch.isinf(logits[1, t.eos_id])


def _bars_of_program(score, program):
    downbeats = score.get_downbeats()
    ons = [t.notes.numpy()["time"] for t in score.tracks if (-1 if t.is_drum else t.program) == program]
    return set((np.searchsorted(downbeats, np.concatenate(ons), side="right") - 1).tolist()) if ons else set()


@pytest.mark.parametrize("use_bpe", [False, True])
def test_every_bar_has_each_asked_for_instrument(tok, bpe_tok, dev_midi_files, use_bpe):
    """--programs piano,bass --bars N: each of the two starts a note in every new bar (from nothing and after
    a real piano prompt), the grammar holds, and the bars are still exactly N."""
    t = bpe_tok if use_bpe else tok
    model = tiny_transformer(len(t), seed=4)
    path = pick(dev_midi_files, lambda r: r["programs"] == "0" and int(r["nonempty_tracks"]) == 1)
    score = load_score(path)
    piano = np.concatenate([[t.bos_id], t.encode(score.clip(0, score.tpq * 8, clip_end=True))])
    checked = 0
    for prompt_ids in (np.array([t.bos_id]), piano):
        first = decoded_bar_of_notes(t.decode(prompt_ids)).max() + 1 if len(prompt_ids) > 1 else 0
        for seed in range(3):
            bars = BarsConstraint(t, 4)
            out = generate(model, torch.from_numpy(np.stack([prompt_ids] * 2)), 2000, temperature=0.8, top_k=20,
                           no_repeat_ngram_size=4, eos_id=t.eos_id, seed=seed,
                           constraints=[GrammarConstraint(t), ProgramsConstraint(t, [0, 33]), bars,
                                        EveryBarConstraint(t, [0, 33])])
            for row, done in zip(out.numpy(), bars.complete):
                decoded, skipped = t.decode_with_report(row)
                assert done and skipped == 0
                new_bars = set(range(first, first + 4))
                assert decoded_bar_of_notes(decoded).max() + 1 == first + 4
                assert new_bars <= _bars_of_program(decoded, 0) and new_bars <= _bars_of_program(decoded, 33), seed
                checked += 1
    assert checked == 12


def test_bars_refuses_zero(tok):
    with pytest.raises(MidistralError, match="bars: 0"):
        BarsConstraint(tok, 0)


# ----------------------------------------------------------------------------------------------------
# accompaniment


def note_table(track):
    n = track.notes.numpy()
    return np.stack([n["time"], n["duration"], n["pitch"], n["velocity"]], 1)


def assert_unchanged(original, out, dropped=None):
    kept = [t for t in original.tracks if (-1 if t.is_drum else t.program) != dropped]
    assert len(out.tracks) == len(kept) + 1
    for a, b in zip(kept, out.tracks):
        assert (a.program, a.is_drum, a.name) == (b.program, b.is_drum, b.name)
        assert np.array_equal(note_table(a), note_table(b))
    assert out.tpq == original.tpq
    assert [(x.time, x.numerator, x.denominator) for x in out.time_signatures] == \
        [(x.time, x.numerator, x.denominator) for x in original.time_signatures]


def short(score, bars=8):
    return score.clip(0, score.tpq * 4 * bars, clip_end=True)


CASES = {
    "single-track": lambda r: int(r["nonempty_tracks"]) == 1 and r["programs"] == "0" and int(r["notes"]) > 300,
    "multi-track with drums": lambda r: r["has_drums"] == "1" and int(r["nonempty_tracks"]) >= 4,
    "tempo and meter changes": lambda r: int(r["tempo_changes"]) > 0 and int(r["time_sig_changes"]) > 0,
    "compound meter": lambda r: "/8" in r["time_signatures"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_add_track_keeps_every_note(tok, dev_midi_files, case):
    path = pick(dev_midi_files, CASES[case])
    original = load_score(path)
    if case != "tempo and meter changes":
        original = short(original)
    model = tiny_transformer(len(tok), seed=3, max_pos=512)  # short positions: the walk restarts them
    playing = {-1 if t.is_drum else t.program for t in original.tracks}
    program = next(p for p in (33, 48, -1, 73) if p not in playing)
    out = accompany(model, tok, original, program, seed=0)
    assert_unchanged(original, out)
    new = out.tracks[-1]
    assert new.name == program_name(program) and new.is_drum == (program == -1)
    assert len(new.notes) > 0


@pytest.mark.parametrize("use_bpe", [False, True])
def test_walked_stream_is_the_encoding_of_the_result(tok, bpe_tok, dev_midi_files, use_bpe):
    """The time tokens the walk writes (rests, bar lines, positions) are those the encoder writes for the
    piece with its new notes: re-encoding the decoded stream gives the stream back (chords of the new
    track aside: the walk does not write Chord tokens)."""
    t = bpe_tok if use_bpe else tok
    for case in ("multi-track with drums", "tempo and meter changes"):
        score = load_score(pick(dev_midi_files, CASES[case]))
        model = tiny_transformer(len(t), seed=4)
        program = 33 if case.startswith("tempo") else 40
        for seed in range(2):
            walk = Walk(model, t, score, program, None, 1.0, None, 6, seed, 6)
            base = [x for x in walk.run() if t.family[x] != Family.SPECIAL]
            again = t.encode_base(t.decode(np.array(base))).tolist()
            p = t.program_id[program]
            again = [x for i, x in enumerate(again)
                     if not (x == p and i + 1 < len(again) and t.family[again[i + 1]] == Family.CHORD)
                     and not (t.family[x] == Family.CHORD and again[i - 1] == p)]
            assert again == base


@pytest.mark.parametrize("use_bpe", [False, True])
def test_every_choice_sees_the_logits_of_the_stream_so_far(tok, bpe_tok, dev_midi_files, use_bpe, monkeypatch):
    """The walk reads the model speculatively (drafts of the piece going on, rolled back when a note is
    written): each id it samples must still come from the logits a plain full forward pass over the ids
    read so far gives, with the rolling ring wrapped many times (window 64)."""
    t = bpe_tok if use_bpe else tok
    seen, asked = [], []
    feed = Feeder.feed

    def recording_feed(self, ids, draft=lambda limit: []):
        seen.extend(ids)
        logits = feed(self, ids, draft)
        asked.append((len(seen), logits.clone()))
        return logits

    monkeypatch.setattr(Feeder, "feed", recording_feed)
    score = short(load_score(pick(dev_midi_files, CASES["single-track"])))
    model = tiny_transformer(len(t), seed=8)
    walk = Walk(model, t, score, 33, None, 1.0, None, 6, 0, 6)
    walk.run()
    assert walk.feeder.calls < walk.n_sampled  # most choices were answered from a draft
    with torch.inference_mode():
        full = model(torch.tensor([seen]))[0]
    for n, logits in asked:
        torch.testing.assert_close(logits, full[n - 1], atol=1e-4, rtol=1e-4)


def test_add_track_in_a_bar_range(tok, dev_midi_files):
    original = short(load_score(pick(dev_midi_files, CASES["single-track"])), 12)
    out = accompany(tiny_transformer(len(tok), seed=5), tok, original, "bass", bars="3:5", seed=1)
    assert_unchanged(original, out)
    downbeats = out.get_downbeats()
    on = out.tracks[-1].notes.numpy()["time"]
    assert len(on) and on.min() >= downbeats[2] and on.max() < downbeats[5]


def test_replace_track_rewrites_only_that_program(tok, dev_midi_files):
    original = short(load_score(pick(dev_midi_files, CASES["multi-track with drums"])))
    out = accompany(tiny_transformer(len(tok), seed=6), tok, original, "drums", replace=True, seed=2)
    assert_unchanged(original, out, dropped=-1)
    assert out.tracks[-1].is_drum and out.tracks[-1].name == "Drums"


def test_accompany_errors_are_one_line(tok, dev_midi_files, tmp_path):
    path = pick(dev_midi_files, CASES["single-track"])
    model = tiny_transformer(len(tok), seed=7)
    with pytest.raises(MidistralError, match="already plays.*--replace-track 0"):
        accompany(model, tok, path, "piano")
    with pytest.raises(MidistralError, match="unknown instrument 'basss'"):
        accompany(model, tok, path, "basss")
    with pytest.raises(MidistralError, match="130 is outside"):
        accompany(model, tok, path, 130)
    with pytest.raises(MidistralError, match="bars: '5:2'"):
        accompany(model, tok, path, "bass", bars="5:2")
    with pytest.raises(MidistralError, match="bars: 900: starts after the piece's last bar"):
        accompany(model, tok, path, "bass", bars="900:")
    empty = symusic.Score(480)
    empty.tracks.append(symusic.Track(name="x", program=0))
    empty.dump_midi(tmp_path / "empty.mid")
    with pytest.raises(MidistralError, match="empty.mid: has no notes"):
        accompany(model, tok, tmp_path / "empty.mid", "bass")
    with pytest.raises(MidistralError, match="no notes besides"):
        accompany(model, tok, path, "piano", replace=True)


def test_parse_bar_range():
    assert parse_bar_range("3:5") == (3, 5) and parse_bar_range("4:") == (4, None)
    assert parse_bar_range(":6") == (1, 6) and parse_bar_range((2, 2)) == (2, 2)
    for bad in ("0:3", "x", ":", "5:2"):
        with pytest.raises(MidistralError):
            parse_bar_range(bad)
