"""A released model folder (midistral/release.py) and the default model: used with no --ckpt by sample.py, the
Sampler and the studio; styles as a control (--style, --list-styles, the studio's menu)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from midistral import checkpoint
from midistral.checkpoint import save_checkpoint
from midistral.errors import CheckpointError, MidistralError
from midistral.model import ModelConfig, Transformer
from midistral.release import release
from midistral.sample import main as sample_main
from midistral.sampler import Sampler
from midistral.tokenize import REMI
from midistral.tokenize.extra import ExtraVocab

STYLES = ["bach", "folk"]


@pytest.fixture(scope="module")
def styled_run(tmp_path_factory):
    """A run folder: best/ (a random tiny model whose tokenizer has style tokens) and data/manifest.json."""
    torch.manual_seed(0)
    tok = REMI()
    tok.extra = ExtraVocab(len(tok), styles=STYLES)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    run = tmp_path_factory.mktemp("styled")
    save_checkpoint(run / "best", Transformer(cfg), tok)
    (run / "data").mkdir()
    (run / "data" / "manifest.json").write_text(json.dumps({"programs": {"0": 3, "33": 2}}))
    return run


@pytest.fixture(scope="module")
def released(styled_run, tmp_path_factory):
    return release(styled_run, tmp_path_factory.mktemp("models") / "default")


def test_release_writes_fp16_weights_and_a_manifest(released, styled_run):
    with safe_open(str(released / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    man = json.loads((released / "manifest.json").read_text())
    assert man["programs"] == {"0": 3, "33": 2} and man["styles"] == STYLES
    assert man["origin"]["checkpoint"] == "best"
    # the same model, to fp16's rounding
    full = checkpoint.load_model(styled_run)
    half = checkpoint.load_model(released)
    ids = torch.randint(0, full.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(full(ids)[0], half(ids)[0], atol=2e-2)


def test_release_keeps_a_model_card(released, styled_run):
    (released / "MODEL_CARD.md").write_text("# card\n")
    release(styled_run, released)
    assert (released / "MODEL_CARD.md").read_text() == "# card\n"


def test_release_keeps_the_styles_default_controls(released, styled_run):
    man = json.loads((released / "manifest.json").read_text())
    man["style_defaults"] = {"bach": {"polyphony": 4, "gapless": True}}
    (released / "manifest.json").write_text(json.dumps(man))
    release(styled_run, released)
    assert json.loads((released / "manifest.json").read_text())["style_defaults"] == {"bach": {"polyphony": 4,
                                                                                               "gapless": True}}
    s = Sampler.load(released)
    assert s.style_defaults == {"bach": {"polyphony": 4, "gapless": True}}
    piece = s.sample(None, style="bach", bars=2, num_samples=1, seed=0, max_new_tokens=64)[0]
    assert "polyphony 4" in piece.report  # applied, and reported as asked for
    man.pop("style_defaults")
    (released / "manifest.json").write_text(json.dumps(man))


def test_released_model_knows_its_instruments_and_styles(released):
    s = Sampler.load(released)
    assert s.known_programs == frozenset({0, 33})
    assert s.styles == STYLES


def test_style_opens_the_prompt_after_bos(released):
    s = Sampler.load(released)
    p = s._encode_prompt(None, 16, "folk")  # noqa: SLF001 (the ids the model reads)
    assert p.ids.tolist() == [s.tok.bos_id, s.tok.extra.style_ids["folk"]]
    out = s.sample(style="folk", seed=0, max_new_tokens=24)
    assert len(out) == 1 and out[0].skipped == 0


def test_unknown_style_is_one_line_naming_the_known_ones(released):
    s = Sampler.load(released)
    with pytest.raises(MidistralError, match=r"style 'jazz'.*bach, folk") as e:
        s.sample(style="jazz", max_new_tokens=8)
    assert "\n" not in str(e.value)


def test_list_styles(released, capsys):
    assert sample_main(["--list-styles", "--ckpt", str(released)]) == 0
    assert capsys.readouterr().out.split() == STYLES


def test_no_ckpt_means_the_default_model(released, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", released)
    assert Sampler.load().ckpt == released
    assert sample_main(["--style", "bach", "--max-new-tokens", "16", "--seed", "1", "--out", str(tmp_path)]) == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".mid", ".png"]
    assert str(released) in capsys.readouterr().err


def test_a_missing_default_model_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="the shipped default model is missing") as e:
        Sampler.load()
    assert "\n" not in str(e.value)


def test_studio_style_menu(released):
    from midistral.studio.jobs import Studio
    from midistral.studio.settings import parse_request

    studio = Studio(Sampler.load(released))
    try:
        assert studio.info()["styles"] == STYLES
    finally:
        studio.close()
    req = parse_request({"mode": "generate", "style": "folk"}, None, "", ["generate"], True, STYLES)
    assert req.style == "folk"
    assert parse_request({"mode": "generate"}, None, "", ["generate"], True, STYLES).style is None
    with pytest.raises(MidistralError, match="Style: 'jazz'"):
        parse_request({"mode": "generate", "style": "jazz"}, None, "", ["generate"], True, STYLES)
