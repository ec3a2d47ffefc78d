"""Attribute controls at sampling (midistral/controls/key.py, attributes.py): the key mask, the per-bar attribute
tokens for density and polyphony, and their requested-vs-achieved report. Tiny randomly initialised models: the
mechanism, not the music. Oracles: the tokenizer's decoder (the notes a sample really has), the grammar (every
sample decodes with nothing skipped) and the attribute values BarStats computes (tested against MidiTok in
test_tokenize_extra.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from midistral.controls import KeyConstraint, accompany, parse_key
from midistral.errors import MidistralError
from midistral.generate import generate
from midistral.model import ModelConfig, Transformer
from midistral.sampler import Sampler
from midistral.tokenize import REMI, load_score
from midistral.tokenize.grammar import GrammarConstraint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(extra_tok):
    return extra_tok


@pytest.fixture(scope="module")
def plain_tok():
    return REMI()


def tiny(vocab, seed=0, max_pos=4096):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=max_pos)
    return Transformer(cfg, attn_backend="torch").eval()


def pitched_notes(score):
    return Counter((int(n.time), int(n.pitch), int(n.duration)) for t in score.tracks if not t.is_drum
                   for n in t.notes)


def new_pitched(tok, prompt_ids, row):
    """The pitched notes the continuation added: the decoded piece's minus the decoded prompt's (a multiset)."""
    before = pitched_notes(tok.decode(prompt_ids)) if len(prompt_ids) > 1 else Counter()
    return list((pitched_notes(tok.decode(row)) - before).elements())


# ----------------------------------------------------------------------------------------------------
# key


@pytest.mark.parametrize("text, root, minor", [("E major", 4, False), ("D minor", 2, True), ("F# minor", 6, True),
                                               ("Bb", 10, False), ("bb major", 10, False), ("b minor", 11, True),
                                               ("c#m", 1, True), ("Ebm", 3, True), ("  a  MINOR ", 9, True)])
def test_parse_key(text, root, minor):
    k = parse_key(text)
    assert (k.root, k.minor) == (root, minor)


def test_minor_allows_the_raised_sixth_and_seventh():
    assert parse_key("D minor").pitch_classes == {2, 4, 5, 7, 9, 10, 0, 11, 1}  # B and C# beside Bb and C
    assert parse_key("C major").pitch_classes == {0, 2, 4, 5, 7, 9, 11}


@pytest.mark.parametrize("text", ["H major", "E dorian", "", "E# #", "major"])
def test_key_errors_name_the_flag_and_value(text):
    with pytest.raises(MidistralError) as e:
        parse_key(text)
    assert str(e.value).startswith(f"--key {text!r}: expected a key") and "\n" not in str(e.value)


def test_cli_key_error_is_one_line(capsys):
    from midistral import sample

    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x", "--key", "H dur"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: argument --key: 'H dur': expected a key")


@pytest.mark.parametrize("which", ["plain", "bpe"])
def test_key_mask_leaves_no_new_note_outside_the_key(which, tok, plain_tok, dev_midi_files):
    """A random model at temperature 1.5 over a real prompt: every new pitched note is in the key; the
    prompt's own notes are not touched; nothing is skipped."""
    t = tok if which == "bpe" else plain_tok
    model = tiny(len(t), seed=3)
    prompt_ids = np.r_[t.bos_id, t.encode(load_score(dev_midi_files[0]).clip(0, 480 * 8))]
    key = parse_key("E major")
    new = []
    for seed in range(3):
        prompt = torch.from_numpy(np.stack([prompt_ids] * 4))
        out = generate(model, prompt, 300, temperature=1.5, top_k=None, eos_id=t.eos_id, seed=seed,
                       constraints=[GrammarConstraint(t, 300), KeyConstraint(t, key)])
        for row in out.numpy():
            decoded, skipped = t.decode_with_report(row)
            assert skipped == 0
            new += new_pitched(t, prompt_ids, row)
    assert len(new) > 100
    assert all(p % 12 in key.pitch_classes for _, p, _ in new)


def test_sampler_key_reports_requested_and_achieved(tiny_run):
    smp = Sampler.load(tiny_run)
    samples = smp.sample(None, num_samples=3, seed=0, key="D minor", temperature=1.5, top_k=0, max_new_tokens=200)
    key = parse_key("D minor")
    total = 0
    for s in samples:
        pitches = [int(n.pitch) for t in s.score.tracks if not t.is_drum for n in t.notes]
        assert all(p % 12 in key.pitch_classes for p in pitches)
        total += len(pitches)
        assert f"controls: key D minor: 0 of {len(pitches)} new notes out of key (0%)" in s.report
    assert total > 20
    plain = smp.sample(None, seed=0, temperature=1.5, top_k=0, max_new_tokens=200)[0]
    assert "controls:" not in plain.report


def test_infill_and_accompany_keep_the_key(tok, dev_midi_files):
    f = next(p for p in dev_midi_files if p.name == "lmd__Predictable.mid")
    score = load_score(f)
    model = tiny(len(tok), seed=5, max_pos=8192)
    key = parse_key("A minor")
    smp = Sampler(model, tok)
    for s in smp.infill(f, (2, 3), num_samples=2, seed=0, temperature=1.5, top_k=0, max_new_tokens=150, key=key):
        new = list((pitched_notes(s.score) - pitched_notes(score)).elements())
        assert all(p % 12 in key.pitch_classes for _, p, _ in new)
        assert s.skipped == 0 and "controls: key A minor: 0 of" in s.report
    piece = score.clip(0, score.tpq * 8)
    out = accompany(model, tok, piece, "bass", seed=0, temperature=1.5, key="A minor")
    bass = out.tracks[-1].notes.numpy()["pitch"]
    assert len(bass) > 0 and all(int(p) % 12 in key.pitch_classes for p in bass)
    (s,) = smp.accompany(piece, "bass", seed=0, temperature=1.5, key="A minor")
    assert f"controls: key A minor: 0 of {len(s.score.tracks[s.new_track].notes)} new notes" in s.report


# ----------------------------------------------------------------------------------------------------
# --bars N never ends on a silent bar


class EagerForBars(torch.nn.Module):
    """Seeded random logits with a strong pull to the bar attribute ACBarNoteDensity (what a model trained with
    attribute tokens may write before a bar): every bar line is a chance to walk into the dead end."""

    def __init__(self, tok, seed=0):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1, hidden_size=1,
                                   num_attention_heads=1, sliding_window=4, max_position_embeddings=1 << 20)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.g = torch.Generator().manual_seed(seed)
        self.bias = torch.zeros(len(tok))
        self.bias[[i for t, i in tok.extra.id.items() if t.startswith("ACBarNoteDensity")]] = 6.0

    def forward(self, ids, cache=None, start_pos=0, last_only=False):
        return torch.randn(ids.shape[0], ids.shape[1], len(self.bias), generator=self.g) * 2 + self.bias


def onset_bars(score):
    downbeats = score.get_downbeats()
    ons = np.concatenate([t.notes.numpy()["time"] for t in score.tracks])
    return np.searchsorted(downbeats, ons, side="right") - 1


@pytest.mark.parametrize("with_prompt", [False, True])
def test_bars_end_on_a_bar_with_an_onset_when_the_model_writes_bar_attributes(tok, dev_midi_files, with_prompt):
    """The bug: with bar n still empty, the model wrote a bar attribute; the grammar then asks for a Bar, which
    the length forbids (bar n would stay empty): only the lone "▁" was left, written until the token budget ran
    out, and the piece ended on bar n without an onset. Now a bar attribute (and "▁") is masked wherever no
    bar may start: every row completes its n bars and the n-th holds an onset."""
    from midistral.controls import BarsConstraint

    if with_prompt:
        prompt_ids = np.r_[tok.bos_id, tok.encode(load_score(dev_midi_files[0]).clip(0, 480 * 8))]
    else:
        prompt_ids = np.array([tok.bos_id])
    prompt_bar = onset_bars(tok.decode(prompt_ids)).max() if with_prompt else -1
    for n in (1, 3, 8):
        model = EagerForBars(tok, seed=n)
        con = BarsConstraint(tok, n)
        out = generate(model, torch.from_numpy(np.stack([prompt_ids] * 4)), 600, temperature=1.0, top_k=None,
                       eos_id=tok.eos_id, seed=n, constraints=[GrammarConstraint(tok), con])
        assert all(con.complete), n
        for row in out.numpy():
            score, skipped = tok.decode_with_report(row)
            assert skipped == 0
            assert onset_bars(score).max() - prompt_bar == n


# ----------------------------------------------------------------------------------------------------
# density and polyphony: the attribute tokens


def extra_names(tok, ids):
    return [tok.extra.tokens[i - tok.extra.start] for i in ids if i >= tok.extra.start]


def bar_triples(tok, ids):
    """The three ids before every bar start of `ids` (BarStats: a Bar id, or the lone "▁" before it)."""
    from midistral.tokenize.extra import BarStats

    ids = np.asarray(ids, np.int64)
    return [ids[s - 3:s].tolist() for s in BarStats(tok).bar_starts(ids)]


@pytest.fixture(scope="module")
def model(tok):
    return tiny(len(tok), seed=11)


@pytest.mark.parametrize("bars", [None, 6])
def test_every_new_bar_gets_the_requested_attribute_tokens(tok, model, dev_midi_files, bars):
    """From BOS and after a real prompt, free length and --bars: before every bar the model starts come the three
    requested tokens, there are no other attribute tokens in the continuation, nothing is skipped, and with
    --bars the piece has its bars, with an onset in the last."""
    from midistral.controls import Steering

    want = Steering(tok, density="high", polyphony=3)
    for prompt in (None, dev_midi_files[0]):
        samples = Sampler(model, tok).sample(prompt, num_samples=3, seed=1, bars=bars, density="high", polyphony=3,
                                             prompt_bars=2, temperature=1.0, max_new_tokens=None if bars else 300)
        for s in samples:
            assert s.skipped == 0
            want.prompt(np.array([tok.bos_id]))
            triple = tok.extra.bar_ids(*want.bar_values)
            assert extra_names(tok, triple) == ["ACBarNoteDensity_16", "ACBarOnsetPolyphonyMin_1",
                                                "ACBarOnsetPolyphonyMax_3"]
            ids = s.new_ids if bars or len(s.new_ids) < 300 else s.new_ids[:-3]  # where the budget ends, the
            triples = bar_triples(tok, ids)  # grammar may close with a Bar: no room for its three tokens
            assert len(triples) >= 1 and all(t == triple for t in triples)  # (a rest may cross a bar line)
            assert len(extra_names(tok, s.new_ids)) == 3 * len(triples)
            if bars and prompt is None:
                assert onset_bars(s.score).max() + 1 == bars
            if bars:
                assert "controls: density high (16/bar): " in s.report
                assert f"over {bars} new bars" in s.report and "polyphony 3: mean bar maximum" in s.report


def test_infill_with_density_writes_the_attribute_tokens_in_the_span(tok, model, dev_midi_files):
    """--infill 2-3 --density low --polyphony 2: the prompt holds the track tokens and each context bar's own
    three values (as training's mix), every middle bar gets the asked-for three, the notes outside the span
    stay, and the report counts the span's two bars only."""
    from midistral.controls import Steering, infill_prompt

    f = next(p for p in dev_midi_files if p.name == "lmd__Predictable.mid")
    score = load_score(f).clip(0, 480 * 4 * 6)
    steer = Steering(tok, density="low", polyphony=2)
    prompt = infill_prompt(tok, score, 2, 3, steering=steer)[0]
    names = extra_names(tok, prompt)
    assert [n.split("_")[0] for n in names[:4]] == ["ACTrackNoteDensityMin", "ACTrackNoteDensityMax",
                                                    "ACTrackOnsetPolyphonyMin", "ACTrackOnsetPolyphonyMax"]
    assert names.count("Infill_Bar") == 2 and sum(n.startswith("ACBarNoteDensity") for n in names) == 4  # 1 + 3
    smp = Sampler(model, tok)
    for s in smp.infill(score, (2, 3), num_samples=2, seed=0, temperature=1.0, density="low", polyphony=2):
        triples = bar_triples(tok, s.new_ids)
        assert len(triples) == 2 and all(extra_names(tok, t) == ["ACBarNoteDensity_4", "ACBarOnsetPolyphonyMin_1",
                                                                 "ACBarOnsetPolyphonyMax_2"] for t in triples)
        assert s.skipped == 0 and s.end_tick is not None
        assert "density low (4/bar): " in s.report and "over 2 new bars" in s.report


def test_the_prompt_gets_the_attribute_tokens_of_training(tok, dev_midi_files):
    """Track tokens after BOS and the style, each prompt bar's own three values before it (BarStats' values, as
    data/mixes.py writes them); without the extra tokens the prompt is unchanged."""
    from midistral.controls import Steering
    from midistral.tokenize.extra import BarStats

    body = tok.encode(load_score(dev_midi_files[0]).clip(0, 480 * 12))
    ids = np.r_[tok.bos_id, tok.extra.style_ids["bach"], body]
    steer = Steering(tok, density=6)
    out = steer.prompt(ids)
    assert out[:2].tolist() == ids[:2].tolist()
    assert [n.split("_")[0] for n in extra_names(tok, out[2:6])] == ["ACTrackNoteDensityMin", "ACTrackNoteDensityMax",
                                                                     "ACTrackOnsetPolyphonyMin",
                                                                     "ACTrackOnsetPolyphonyMax"]
    assert out[~tok.extra.is_extra(out) | (out == tok.extra.style_ids["bach"])].tolist() == ids.tolist()
    stats = BarStats(tok)
    starts = stats.bar_starts(body)
    want = [tok.extra.bar_ids(*v) for v in zip(*stats.per_bar(body, starts))]
    assert bar_triples(tok, out[6:]) == want
    assert steer.bar_values[0] == 6 and 1 <= steer.bar_values[2] <= 6


def test_defaults_for_what_is_not_asked():
    from midistral.controls.attributes import DENSITY_LEVELS, parse_density

    assert DENSITY_LEVELS == {"low": 4, "medium": 8, "high": 16}
    assert [parse_density(x) for x in ("low", "Medium", " high ", "7", 0)] == [4, 8, 16, 7, 0]


def test_defaults_from_the_other_control_without_a_prompt(tok):
    from midistral.controls import Steering

    for asked, values in [(dict(density=8), (8, 1, 2)), (dict(density="high"), (16, 1, 4)),
                          (dict(polyphony=1), (4, 1, 1)), (dict(polyphony=6), (18, 1, 6)), (dict(density=0), (0, 1, 1))]:
        steer = Steering(tok, **asked)
        steer.prompt(np.array([tok.bos_id]))
        assert steer.bar_values == values, asked


def test_the_ngram_ban_never_takes_the_attribute_tokens(tok, model):
    """no_repeat_ngram_size 2 would ban the density token after any id it followed once: exempt, every bar still
    gets its three tokens."""
    s = Sampler(model, tok).sample(None, seed=2, bars=5, density=5, temperature=1.0, no_repeat_ngram_size=2)[0]
    triples = bar_triples(tok, s.new_ids)
    # (a rest that crosses a bar line starts a bar without a Bar token, so without the three tokens)
    assert len(triples) >= 3 and all(extra_names(tok, t)[0] == "ACBarNoteDensity_5" for t in triples)
    assert s.skipped == 0


def test_report_states_requested_and_achieved(tok, model):
    """The report's numbers against the decoded piece, counted here with symusic's own bar lines: notes starting
    per bar over the N bars, and the most notes starting together per bar."""
    from midistral.controls import Steering

    (s,) = Sampler(model, tok).sample(None, seed=3, bars=4, density="low", polyphony=2, key="G major",
                                      temperature=1.0)
    ons = np.concatenate([t.notes.numpy()["time"] for t in s.score.tracks])
    bar = onset_bars(s.score)
    dens = np.bincount(bar, minlength=4)
    most = [max(Counter(ons[bar == b].tolist()).values(), default=0) for b in range(4)]
    controls = s.report.split("  controls: ")[1]
    assert controls.startswith("key G major: 0 of ")
    assert f"density low (4/bar): {dens.mean():.1f} notes per bar over 4 new bars" in controls
    sounding = [m for m, d in zip(most, dens) if d]
    assert f"polyphony 2: mean bar maximum {np.mean(sounding):.1f} (highest {max(most)}) over 4 new bars" in controls
    assert Steering(tok, key="E major").key_report(0, 0) == "key E major: 0 of 0 new notes out of key (0%)"


def test_errors_are_one_line(tok, tiny_run):
    from midistral.controls import Steering
    from midistral.controls.attributes import parse_polyphony

    plain = Sampler.load(tiny_run)  # a tokenizer without attribute tokens
    for asked in (dict(density="low"), dict(polyphony=2), dict(density=3, polyphony=2)):
        with pytest.raises(MidistralError, match="has no attribute-control tokens") as e:
            plain.sample(None, seed=0, bars=1, **asked)
        assert str(e.value).startswith(" and ".join(f"--{k}" for k in asked)) and "\n" not in str(e.value)
    with pytest.raises(MidistralError, match="count up to 18 notes per bar"):
        Steering(tok, density=19)
    with pytest.raises(MidistralError, match="go up to 6"):
        Steering(tok, polyphony=7)
    for bad in ("0", "two", "-1"):
        with pytest.raises(MidistralError, match=f"--polyphony {bad!r}: expected"):
            parse_polyphony(bad)


@pytest.mark.parametrize("argv, match", [
    (["--density", "loud"], "argument --density: 'loud': expected low, medium, high or a number"),
    (["--polyphony", "0"], "argument --polyphony: '0': expected the most notes"),
    (["p.mid", "--add-track", "bass", "--density", "low"], "--density steers new bars (their attribute "
                                                            "tokens): it does not apply to --add-track"),
    (["p.mid", "--replace-track", "piano", "--polyphony", "2"], "--polyphony steers new bars"),
])
def test_cli_errors(argv, match, capsys):
    from midistral import sample

    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x", *argv])
    assert match in capsys.readouterr().err.strip().splitlines()[-1]


def test_studio_form_carries_the_controls(dev_midi_files):
    """The studio's form fields key / density / polyphony reach the sampler as its keywords; bad values and
    density with an added track are one-line errors the page shows."""
    from midistral.studio.settings import parse_request

    modes = ["generate", "continue", "add", "replace"]
    r = parse_request({"mode": "generate", "key": " D minor ", "density": "low", "polyphony": "2"}, None, "", modes,
                      True)
    assert r.attributes == {"key": "D minor", "density": "low", "polyphony": "2"}
    assert parse_request({"mode": "generate", "key": "", "density": ""}, None, "", modes, True).attributes == {}
    for form, match in [({"key": "H major"}, "Key 'H major': expected a key"),
                        ({"density": "loud"}, "Density 'loud': expected low, medium, high"),
                        ({"polyphony": "0"}, "Polyphony '0': expected")]:
        with pytest.raises(MidistralError, match=match):
            parse_request({"mode": "generate", **form}, None, "", modes, True)
    prompt = dev_midi_files[0].read_bytes()
    form = {"mode": "add", "track_program": "33", "density": "high"}
    with pytest.raises(MidistralError, match="density and polyphony steer new music"):
        parse_request(form, prompt, "a.mid", modes, True)
    assert parse_request({**form, "density": "", "key": "E"}, prompt, "a.mid", modes, True).attributes == {"key": "E"}


@pytest.mark.parametrize("density", [2, 6, 12])
def test_density_bounds_hold_in_every_new_bar(tok, model, density):
    """--density d --bars 4 with a random model, which follows the attribute tokens not at all: DensityConstraint
    still keeps the notes starting in every new bar within its bounds (3/4 of d to 5/4 of d, at least d + 1),
    and nothing is skipped."""
    from midistral.controls.attributes import density_bounds

    low, high = density_bounds(density, tok.extra.params["density_bar_max"])
    for s in Sampler(model, tok).sample(None, num_samples=3, seed=5, bars=4, density=density, temperature=1.0):
        assert s.skipped == 0
        per_bar = np.bincount(onset_bars(s.score), minlength=4)
        assert len(per_bar) == 4 and per_bar.min() >= low and per_bar.max() <= high, (density, per_bar)


def test_density_bounds():
    from midistral.controls.attributes import density_bounds

    assert density_bounds(4, 18) == (3, 5) and density_bounds(16, 18) == (12, 20) and density_bounds(2, 18) == (2, 3)
    assert density_bounds(18, 18) == (14, None) and density_bounds(0, 18) == (0, 0)
