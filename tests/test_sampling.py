"""midistral.sampling: one SamplingConfig (its checks, its "did you mean", the flags built from its fields)
and one set of defaults that generate(), controls.accompany, the Sampler, sample.py, the run config and the
studio all take."""

import argparse
import dataclasses
import inspect
import subprocess
import sys

import pytest

from conftest import ROOT
from midistral.errors import ConfigError
from midistral.fields import FieldError, add_arguments, from_args
from midistral.sampling import (DEFAULT_MAX_NEW_TOKENS, MIN_NEW_FROM_SCRATCH, SAMPLING, TOKENS_PER_BAR, RejectionLimits,
                                SamplingConfig, check_call)


def test_defaults():
    c = SamplingConfig()
    assert (c.temperature, c.top_k, c.top_p, c.no_repeat_ngram_size, c.grammar) == (0.7, 12, None, 6, True)
    assert c.max_new() == DEFAULT_MAX_NEW_TOKENS and c.max_new(bars=4) == 4 * TOKENS_PER_BAR + 64
    assert c.min_new(from_scratch=True) == MIN_NEW_FROM_SCRATCH and c.min_new(from_scratch=False) == 0
    assert SamplingConfig(max_new_tokens=50, min_new_tokens=3).max_new(bars=4) == 50
    assert SamplingConfig(min_new_tokens=3).min_new(True) == 3


@pytest.mark.parametrize("values, message", [
    (dict(temperature=float("nan")), "temperature=nan: expected a number >= 0"),
    (dict(temperature=float("inf")), "temperature=inf: expected a number >= 0"),
    (dict(temperature=-0.1), "temperature=-0.1: expected a number >= 0"),
    (dict(temperature="hot"), "temperature='hot'"),
    (dict(top_k=-1), "top_k=-1: expected an integer >= 0"),
    (dict(top_k=2.5), "top_k=2.5: expected an integer"),
    (dict(top_k=True), "top_k=True: expected an integer"),
    (dict(top_p=0), "top_p=0: expected a number in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size=-2"),
    (dict(max_new_tokens=0), "max_new_tokens=0: expected an integer >= 1"),
    (dict(min_new_tokens=-1), "min_new_tokens=-1"),
    (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens=10 > max_new_tokens=5"),
    (dict(grammar="yes"), "grammar='yes': expected true or false"),
])
def test_a_bad_value_is_one_line_naming_the_field(values, message):
    with pytest.raises(ConfigError) as e:
        SamplingConfig(**values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_frozen_and_good_edges_pass():
    c = SamplingConfig(temperature=0, top_k=0, top_p=1.0, no_repeat_ngram_size=0, max_new_tokens=1, min_new_tokens=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3
    assert c.replace(top_k=5).top_k == 5 and c.top_k == 0
    with pytest.raises(ConfigError, match="top_k=-5"):
        c.replace(top_k=-5)


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"x.toml: unknown config key 'sample.no_repeat_ngram'; "
                                          r"did you mean 'sample.no_repeat_ngram_size'\?"):
        SamplingConfig.from_dict({"no_repeat_ngram": 3}, "x.toml", "sample.")
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        SamplingConfig().replace(max_new=5)
    with pytest.raises(ConfigError, match="unknown config key 'banana'$"):
        SamplingConfig.from_dict({"banana": 1})
    with pytest.raises(ConfigError, match="sample.top_k=-1"):
        SamplingConfig.from_dict({"top_k": -1}, "x.toml", "sample.")
    assert SamplingConfig.from_dict({"top_k": 3}) == SamplingConfig(top_k=3)


def test_per_call_arguments_are_checked_in_one_place():
    check_call(num_samples=1, seed=None, bars=None, prompt_bars=None)
    for name, value in [("num_samples", 0), ("seed", -1), ("bars", 0), ("prompt_bars", 0), ("bars", True)]:
        with pytest.raises(FieldError, match=f"{name}={value!r}"):
            check_call(**{name: value})


def parser_for(cls):
    p = argparse.ArgumentParser()
    add_arguments(p, cls)
    return p


def test_flags_are_built_from_the_fields():
    p = parser_for(SamplingConfig)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(SamplingConfig)}
    assert flags["grammar"].option_strings == ["--no-grammar"]
    assert all(a.help for a in flags.values())
    help_text = p.format_help()
    assert "(default: None)" not in help_text and "(default: True)" not in help_text
    assert flags["temperature"].help.endswith("(default: 0.7)") and flags["top_k"].help.endswith("(default: 12)")
    assert from_args(SamplingConfig, p.parse_args([])) == SamplingConfig()
    args = p.parse_args(["--temperature", "1.1", "--top-k", "3", "--no-grammar", "--max-new-tokens", "9",
                         "--no-repeat-ngram-size", "4", "--top-p", "0.9"])
    assert from_args(SamplingConfig, args) == SamplingConfig(1.1, 3, 0.9, 4, 9, None, False)
    with pytest.raises(ConfigError, match="^--top-k=-3: expected an integer >= 0$"):
        from_args(SamplingConfig, p.parse_args(["--top-k", "-3"]))
    rejection = parser_for(RejectionLimits)
    assert from_args(RejectionLimits, rejection.parse_args(["--max-loop-score", "0.2"])).max_loop_score == 0.2


def test_one_set_of_defaults_for_every_caller():
    """generate(), controls.accompany, the Sampler, sample.py, the [sample] section and the studio."""
    from midistral import sample
    from midistral import controls
    from midistral.config import SampleConfig, load_config
    from midistral.generate import generate
    from midistral.studio.settings import BOUNDS

    want = {"temperature": SAMPLING.temperature, "top_k": SAMPLING.top_k,
            "no_repeat_ngram_size": SAMPLING.no_repeat_ngram_size}
    for fn in (generate, controls.accompany):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in want} == want, fn.__name__
    args = sample.parse_args(["--ckpt", "run"])
    assert args.sampling == SAMPLING and args.limits == RejectionLimits()
    sc = load_config(None).sample
    assert isinstance(sc, SampleConfig) and all(getattr(sc, k) == v for k, v in want.items())
    assert sc.max_new_tokens == SAMPLING.max_new_tokens and sc.min_new_tokens == SAMPLING.min_new_tokens
    assert (BOUNDS["temperature"][3], BOUNDS["top_k"][3], BOUNDS["no_repeat_ngram"][3]) == tuple(want.values())


def test_every_sample_option_has_help():
    from midistral import sample

    actions = [a for a in sample.build_parser()._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_sample_help_shows_no_empty_defaults():
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--no-grammar" in r.stdout
    assert not any(f"(default: {v})" in r.stdout for v in ("None", "True", "False"))
    assert "--num-samples N" in r.stdout


def test_importing_the_settings_loads_no_torch():
    code = "import sys, midistral.sampling; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_studio_request_carries_a_sampling_config():
    from midistral.errors import MidistralError
    from midistral.studio.settings import parse_request

    form = {"mode": "generate", "temperature": "0.9", "top_k": "0", "no_repeat_ngram": "3", "tokens": "64"}
    r = parse_request(form, None, "", ["generate"], length_in_bars=False)
    assert r.sampling == SamplingConfig(temperature=0.9, top_k=0, no_repeat_ngram_size=3, max_new_tokens=64)
    r = parse_request({"mode": "generate"}, None, "", ["generate"], length_in_bars=True)
    assert r.sampling == SAMPLING and r.bars == 8
    with pytest.raises(MidistralError, match="Temperature must be between"):
        parse_request({**form, "temperature": "5"}, None, "", ["generate"], length_in_bars=False)


def test_train_writes_its_samples_through_the_sampler(tiny_run, tmp_path, capsys):
    import shutil

    from midistral import train
    from midistral.config import SampleConfig

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    train.write_samples(run, SampleConfig(num_samples=2, max_new_tokens=8, seed=0))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["sample_0.mid", "sample_0.png", "sample_1.mid",
                                                                    "sample_1.png"]
    assert capsys.readouterr().out.count(".mid  bars") == 2  # a line per file, as sample.py prints
