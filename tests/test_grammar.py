"""Grammar-constrained sampling (midistral/tokenize/grammar.py) against independent oracles.

- real files: every token our encoder writes is allowed by the mask in its state (with and without BPE);
- a plain-Python walk over token strings, written here from the grammar table, agrees with the
  vectorised (states x vocabulary) tables for every BPE id in states met in real files;
- a randomly initialised model, many seeds, with and without BPE: constrained samples decode with 0
  skipped tokens and 0 MidiTok `tokens_errors` (MidiTok is the oracle); unconstrained ones do not;
- the no-repeat-n-gram ban yields when it would leave no legal id.
"""

import warnings

import numpy as np
import pytest
import torch
from miditok import REMI as MidiTokREMI
from miditok import TokenizerConfig, TokSequence

from midistral.errors import MidiError
from midistral.generate import generate
from midistral.model import ModelConfig, Transformer
from midistral.tokenize import DEFAULT_PARAMS, REPORT_PARAMS, REMI, REMIConfig
from midistral.tokenize.grammar import COMPLETE, NK, Grammar, GrammarConstraint, State, expansions
from midistral.tokenize.remi import Family

torch.set_num_threads(2)


def complete_length(grammar: Grammar, ids) -> int:
    """Length of the longest prefix of `ids` that ends with every note closed (decodes with nothing skipped)."""
    state, best = (State.START, -1, 4), 0
    for i, t in enumerate(ids):
        state = grammar.step(state, int(t))
        if state[0] % NK in COMPLETE:
            best = i + 1
    return best


@pytest.fixture(scope="module")
def base_tok():
    return REMI()


@pytest.fixture(scope="module")
def bpe_tok(dev_midi_files):
    tok = REMI()
    tok.train_bpe(dev_midi_files[:16], 1000, workers=1)
    return tok


@pytest.fixture(scope="module")
def miditok_oracle():
    return MidiTokREMI(TokenizerConfig(**DEFAULT_PARAMS))


def _tokenizer(name, base_tok, bpe_tok):
    return {"base": base_tok, "bpe": bpe_tok}[name]


# ----------------------------------------------------------------------------------------------------
# A plain walk over token strings: the grammar table of docs/grammar.md, written independently


FOLLOWS = {
    "start": {"Bar"}, "Bar": {"TimeSig"}, "TimeSig": {"Position", "Bar", "Rest", "EOS"},
    "Position": {"Program", "Tempo"}, "Tempo": {"Program", "Position", "Bar", "Rest", "EOS"},
    "Program": {"Pitch", "Chord"}, "ProgramDrums": {"PitchDrum"}, "Chord": {"Program"},
    "Pitch": {"Velocity"}, "PitchDrum": {"Velocity"}, "Velocity": {"Duration"},
    "Duration": {"Program", "Position", "Bar", "Rest", "EOS"}, "Rest": {"Rest", "Bar", "Position", "TimeSig", "EOS"},
}


def walk(state, token: str):
    """(kind, last position or None, numerator) after `token`, or None if the grammar forbids it."""
    kind, last, num = state
    family, value = token.split("_", 1)
    if kind == "end":
        return state
    if family not in FOLLOWS[kind]:
        return None
    if family == "Position":
        if (last is not None and int(value) <= last) or int(value) >= num * 12:
            return None
        last = int(value)
    if family in ("Bar", "Rest"):
        last = None
    if family == "TimeSig":
        num = int(value.split("/")[0])
    if family == "Program" and value == "-1":
        family = "ProgramDrums"
    return ("end" if family == "EOS" else family), last, num


def walk_all(state, tokens):
    for t in tokens:
        state = walk(state, t)
        if state is None:
            return None
    return state


def strings(tok, ids) -> list[str]:
    return [tok.id_to_token[i] for i in tok.base_ids(np.asarray(ids, dtype=np.int64)).tolist()]


# ----------------------------------------------------------------------------------------------------
# Real files


@pytest.mark.parametrize("name", ["base", "bpe"])
def test_real_files_follow_the_grammar(name, base_tok, bpe_tok, dev_midi_files):
    tok = _tokenizer(name, base_tok, bpe_tok)
    g = Grammar(tok)
    checked = 0
    for f in dev_midi_files[:40]:
        try:
            ids = tok.encode(f).tolist()
        except MidiError:  # a file with no notes (tests/data has one)
            continue
        state = g.run([tok.bos_id])
        for i, t in enumerate(ids):
            assert g.legal(state, t), f"{f.name}: token {i} ({strings(tok, [t])}) refused in state {state}"
            state = g.step(state, t)
        assert g.legal(state, tok.eos_id), f"{f.name}: EOS refused at the end"
        assert complete_length(g, ids) == len(ids)
        checked += 1
    assert checked >= 20


def test_report_config_real_files_follow_the_grammar(dev_midi_files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = REMI(REMIConfig(**REPORT_PARAMS))
    g = Grammar(tok)
    checked = 0
    for f in dev_midi_files[:20]:
        try:
            ids = tok.encode(f).tolist()
        except MidiError:  # needs more than 500 numbered bars
            continue
        state = (State.START, -1, 4)
        for t in ids:
            assert g.legal(state, t)
            state = g.step(state, t)
        checked += 1
    assert checked >= 10


def test_tables_agree_with_a_plain_walk(bpe_tok, dev_midi_files):
    """For every id, in states met along real files: legal by the tables <=> legal by walking its strings."""
    tok = bpe_tok
    g = Grammar(tok)
    exp = [[tok.id_to_token[b] for b in e.tolist()] for e in expansions(tok)]
    assert sum(len(e) > 1 for e in exp) > 200  # the BPE vocabulary has merged ids to check
    names = {State.START: "start", State.BAR: "Bar", State.TIME_SIG: "TimeSig", State.POSITION: "Position",
             State.TEMPO: "Tempo", State.PROGRAM: "Program", State.PROGRAM_DRUMS: "ProgramDrums",
             State.CHORD: "Chord", State.PITCH: "Pitch", State.VELOCITY: "Velocity", State.DURATION: "Duration",
             State.REST: "Rest"}
    seen = set()
    for f in dev_midi_files[:6]:
        state = (State.START, -1, 4)
        for t in tok.encode(f).tolist():
            seen.add(state)
            state = g.step(state, t)
    assert len(seen) > 30
    constraint = GrammarConstraint(tok)
    constraint.start(torch.tensor([[tok.bos_id]]))
    seen = sorted(seen)[::max(1, len(seen) // 150)]  # about 150 states, all kinds
    for state in seen:
        constraint.states = [state]
        assert np.array_equal(constraint.allowed()[0].numpy(), g.allowed(state))
        s, last, num = state
        plain = (names[s], None if last < 0 else last, num)
        mask = g.allowed(state)
        assert mask.any()
        for i in range(len(tok)):
            if i in (tok.pad_id, tok.bos_id, tok.mask_id):
                assert not mask[i]
                continue
            want = walk_all(plain, exp[i] if i != tok.eos_id else ["EOS_None"]) is not None
            assert mask[i] == want, f"state {plain}, id {i} {exp[i]}: table {mask[i]}, walk {want}"


# ----------------------------------------------------------------------------------------------------
# Random model


def random_model(vocab: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=1024)
    model = Transformer(cfg, attn_backend="torch")
    with torch.no_grad():  # peaky logits: a random model that insists on its favourite (wrong) tokens
        model.lm_head.weight.mul_(40)
    return model


def sample(tok, seed, constrained, n=4, new=160, **kw):
    model = random_model(len(tok), seed)
    prompt = torch.full((n, 1), tok.bos_id)
    constraints = [GrammarConstraint(tok, new)] if constrained else []
    out = generate(model, prompt, new, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=seed,
                   constraints=constraints, **kw)
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
    return rows


def miditok_errors(oracle, tok, ids) -> float:
    return oracle.tokens_errors(TokSequence(tokens=strings(tok, ids)))


@pytest.mark.parametrize("name", ["base", "bpe"])
@pytest.mark.parametrize("seed", range(6))
def test_random_model_constrained_samples_decode(name, seed, base_tok, bpe_tok, miditok_oracle):
    tok = _tokenizer(name, base_tok, bpe_tok)
    kw = dict(temperature=1.0, top_k=None) if seed % 2 else {}  # the whole vocabulary, or the defaults
    for ids in sample(tok, seed, constrained=True, **kw):
        assert len(ids) > 0
        assert tok.decode_with_report(ids)[1] == 0, strings(tok, ids)
        assert miditok_errors(miditok_oracle, tok, ids) == 0, strings(tok, ids)


@pytest.mark.parametrize("name", ["base", "bpe"])
def test_random_model_unconstrained_samples_break_the_grammar(name, base_tok, bpe_tok, miditok_oracle):
    """The oracles can fail: without the constraint the same random models write broken pieces."""
    tok = _tokenizer(name, base_tok, bpe_tok)
    rows = [ids for seed in range(2) for ids in sample(tok, seed, constrained=False, temperature=1.0, top_k=None)]
    assert sum(tok.decode_with_report(ids)[1] for ids in rows) > 0
    assert sum(miditok_errors(miditok_oracle, tok, ids) for ids in rows if ids) > 0


@pytest.mark.parametrize("name", ["base", "bpe"])
def test_budget_closes_the_last_note(name, base_tok, bpe_tok):
    """A piece cut by max_new_tokens still ends complete (the last steps close the open note)."""
    tok = _tokenizer(name, base_tok, bpe_tok)
    g = Grammar(tok)
    for seed in range(4):
        for ids in sample(tok, seed, constrained=True, new=23 + seed, temperature=1.0, top_k=None):
            assert complete_length(g, ids) == len(ids)
            assert tok.decode_with_report(ids)[1] == 0


def test_ngram_ban_yields_to_the_grammar(base_tok):
    """After BOS only Bar is legal; the 2-gram ban forbids it (BOS Bar was seen): the ban yields."""
    tok = base_tok
    bar = tok.vocab["Bar_None"]
    prompt = torch.tensor([[tok.bos_id, bar, tok.bos_id]])
    model = random_model(len(tok), 0)
    out = generate(model, prompt, 1, no_repeat_ngram_size=2, seed=0, constraints=[GrammarConstraint(tok)])
    assert out[0, -1].item() == bar
    free = generate(model, prompt, 1, no_repeat_ngram_size=2, seed=0)
    assert free[0, -1].item() != bar  # without the constraint the ban holds


def test_finished_rows_accept_padding(base_tok):
    c = GrammarConstraint(base_tok)
    c.start(torch.tensor([[base_tok.bos_id], [base_tok.bos_id]]))
    rows = [["Bar_None", "TimeSig_4/4", "EOS_None", "PAD_None", "PAD_None"],
            ["Bar_None", "TimeSig_4/4", "Rest_0.1.8", "Rest_1.0.4", "Position_5"]]
    for step in zip(*rows):
        c.push(torch.tensor([base_tok.vocab[t] for t in step]))
    ok = c.allowed()
    assert ok[0].all()  # finished
    assert not ok[1, base_tok.eos_id] and ok[1, base_tok.vocab["Tempo_121.29"]]  # after Position


def test_expansions(base_tok, bpe_tok, dev_midi_files):
    assert [e.tolist() for e in expansions(base_tok)[:5]] == [[0], [1], [2], [3], [4]]
    exp = expansions(bpe_tok)
    assert len(exp) == len(bpe_tok)
    ids = bpe_tok.encode(dev_midi_files[0])
    assert np.array_equal(np.concatenate([exp[i] for i in ids.tolist()]), bpe_tok.encode_base(dev_midi_files[0]))


# ----------------------------------------------------------------------------------------------------
# Extra tokens (tokenize/extra.py): style, attributes, fill-in-the-middle, in every mode


@pytest.fixture(scope="module")
def extra_tok(bpe_tok):
    from midistral.tokenize.extra import ExtraVocab

    tok = REMI.from_dict(bpe_tok.to_dict())
    tok.extra = ExtraVocab(len(tok), styles=["bach", "folk"])
    return tok


def _fim_prompt(tok, ids, a, k, suffix_bars=None):
    """BOS, bars before `a`, k holes, the bars after the hole (all, or `suffix_bars` of them)."""
    from midistral.tokenize.extra import BarStats

    starts = BarStats(tok).bar_starts(ids)
    b = starts[a + k] if a + k < len(starts) else len(ids)
    end = len(ids) if suffix_bars is None else (starts[a + k + suffix_bars] if a + k + suffix_bars < len(starts)
                                                 else len(ids))
    return np.r_[tok.bos_id, ids[:starts[a]], [tok.extra.hole_id] * k, ids[b:end]]


def _walk_legal(g, ids):
    """Every id after the first (BOS) legal in its state."""
    state = g.run(ids[:1])
    for i, t in enumerate(ids[1:]):
        assert g.legal(state, int(t)), (i, int(t), state)
        state = g.step(state, int(t))
    return state


@pytest.mark.parametrize("mode", ["plain", "context", "middle"])
@pytest.mark.parametrize("seed", range(2))
def test_random_model_with_extra_tokens_decodes_in_every_mode(mode, seed, extra_tok, dev_midi_files, miditok_oracle):
    """Random models write only what decodes (0 skipped, 0 MidiTok errors) and keep the layout: a plain piece
    never opens a hole or writes FillBar_Start/End; a context never ends with EOS; a middle starts with a bar
    and ends only with FillBar_End."""
    tok, e = extra_tok, extra_tok.extra
    g = Grammar(tok, holes=True)  # walks the prompt too, whose holes the caller gives
    from midistral.tokenize.extra import BarStats

    sparse = [ids for ids in (tok.encode(f)[:600] for f in dev_midi_files if f.name.startswith("music21__"))
              if len(BarStats(tok).bar_starts(ids)) >= 8]  # several bars in 600 ids
    real = sparse[seed % len(sparse)]
    prompt = {"plain": np.r_[tok.bos_id, e.id["Style_bach"]],
              "context": _fim_prompt(tok, real, 2, 2, suffix_bars=1),
              "middle": np.r_[_fim_prompt(tok, real, 2, 2, suffix_bars=3), e.fill_start_id]}[mode]
    model = random_model(len(tok), seed)
    end = tok.eos_id if mode == "plain" else e.fill_end_id
    kw = dict(temperature=1.0, top_k=None) if seed % 2 else {}
    out = generate(model, torch.tensor(prompt)[None].repeat(4, 1), 200, eos_id=end, pad_id=tok.pad_id, seed=seed,
                   constraints=[GrammarConstraint(tok, 200)], **kw)
    for row in out[:, len(prompt):].tolist():
        new = row[:row.index(end) + 1] if end in row else row
        full = np.r_[prompt, new]
        _walk_legal(g, full)
        kinds = {e.kind(t) for t in new if e.is_extra(t)}
        if mode == "plain":
            assert not kinds & {"Infill_Bar", "FillBar_Start", "FillBar_End"}
        else:
            assert tok.eos_id not in new
        if mode == "middle":
            assert tok.family[tok.base_ids(new[:1] if not e.is_extra(new[0]) else [])].tolist() in ([Family.BAR], [])
            assert not kinds & {"Infill_Bar", "FillBar_Start", "Style"}
        music = [t for t in full.tolist() if not e.is_extra(t) and t != tok.bos_id]
        assert tok.decode_with_report(full)[1] == 0
        assert miditok_errors(miditok_oracle, tok, music) == 0


def test_extra_tokens_where_they_may_come(extra_tok):
    tok, e = extra_tok, extra_tok.extra
    g = Grammar(tok)
    bar = tok.vocab["Bar_None"]
    start = g.run([tok.bos_id])
    ok = g.allowed(start)
    assert ok[e.id["Style_folk"]] and ok[e.id["ACTrackNoteDensityMin_3"]] and ok[e.id["ACBarNoteDensity_5"]]
    assert not ok[e.hole_id] and not ok[e.fill_start_id] and not ok[e.fill_end_id]  # plain: no hole opened
    assert Grammar(tok, holes=True).allowed(start)[e.hole_id]
    after_bar_ac = g.run([tok.bos_id, *e.bar_ids(4, 1, 2)])
    assert np.flatnonzero(g.allowed(after_bar_ac)).tolist() == [i for i in range(len(tok)) if g.legal(after_bar_ac, i)]
    assert all(tok.base_ids([i])[:1].tolist() in ([bar], []) for i in np.flatnonzero(g.allowed(after_bar_ac)))
    track = g.run([tok.bos_id, *e.track_ids([3, 5], 1, 2)])
    assert g.allowed(track)[bar] and not g.allowed(g.run([tok.bos_id, *e.track_ids([3, 5], 1, 2)[:2]]))[bar]
    piece = [bar, tok.vocab["TimeSig_4/4"]]
    ctx = g.run([tok.bos_id, *piece, e.hole_id])
    assert g.allowed(ctx)[e.hole_id] and g.allowed(ctx)[e.fill_start_id] and not g.allowed(ctx)[tok.eos_id]
    ctx2 = g.run([tok.bos_id, *piece, e.hole_id, *piece])
    assert not g.allowed(ctx2)[e.hole_id] and g.allowed(ctx2)[e.fill_start_id] and not g.allowed(ctx2)[tok.eos_id]
    mid = g.run([tok.bos_id, *piece, e.hole_id, e.fill_start_id])
    assert not g.allowed(mid)[e.fill_end_id] and not g.allowed(mid)[tok.eos_id]  # a middle writes a bar first
    mid2 = g.run([tok.bos_id, *piece, e.hole_id, e.fill_start_id, *piece])
    assert g.allowed(mid2)[e.fill_end_id] and not g.allowed(mid2)[tok.eos_id]
    assert g.step(mid2, e.fill_end_id)[0] == State.END
