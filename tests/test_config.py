"""midistral.config: the run config as typed sections from the TOML files, `section.key=value` overrides,
unknown keys refused with a "did you mean", each value checked once by its section."""

import dataclasses
import json

import pytest

from conftest import ROOT
from midistral.config import (DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig, default_values,
                              load_config)
from midistral.errors import ConfigError

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_as_typed_sections(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert (type(cfg.data), type(cfg.train), type(cfg.model), type(cfg.sample)) == (
        DataConfig, TrainConfig, ModelConfig, SampleConfig)
    assert json.loads(json.dumps(cfg.to_dict()))["out_dir"] == cfg.out_dir  # the JSON train_config.json holds


def test_values_from_the_file_and_the_command_line():
    cfg = load_config(ROOT / "configs" / "chorales.toml", ["train.lr=3e-4", 'data.dir="~/x"', "out_dir=somewhere",
                                                             "sample.top_k=20", "model.hidden_size=256"])
    assert cfg.train.lr == 3e-4 and cfg.data.dir == "~/x" and cfg.out_dir == "somewhere"
    assert cfg.sample.top_k == 20 and cfg.sample.max_new_tokens == 512 and cfg.sample.num_samples == 2
    assert cfg.model.hidden_size == 256 and cfg.model.head_dim == 64 and cfg.data.source == "chorales"
    assert cfg.train.epochs == 16 and cfg.train.batch_size == 16  # from the file
    assert load_config(None) == RunConfig()


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "command line: unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
    ("data.prepared=1", "did you mean 'data.prepared_dir'?"),
    ("sample.no_repeat_ngram=3", "did you mean 'sample.no_repeat_ngram_size'?"),
    ("model.hiden_size=3", "did you mean 'model.hidden_size'?"),
    ("model.vocab_size=99", "model.vocab_size is set from the tokenizer"),
    ("train.zzz=1", "unknown config key 'train.zzz'"),
    ("train=1", "'train' must be a section"),
    ("train.lr=abc", "train.lr='abc': expected a number in [0, 10]"),
    ("train.device=gpu", "train.device='gpu'"),
    ("data.split=[1, 2]", "data.split=[1, 2]: expected 3 fractions"),
    ("data.min_seq=4096", "data.min_seq=4096 > data.max_seq=512"),
    ("model.hidden_size=30", "not divisible"),
    ("model.num_hidden_layers=0", "model.num_hidden_layers=0: expected an integer >= 1"),
    ("model.max_position_embeddings=64", "model.max_position_embeddings=64 < data.max_seq=512"),
    ("sample.temperature=-1", "sample.temperature=-1: expected a number >= 0"),
    ("sample.num_samples=-1", "sample.num_samples=-1"),
    ("tokenizer.num_velocities=0", "tokenizer.num_velocities=0"),
    ("tokenizer.num_velocity=3", "unknown tokenizer config key 'num_velocity'; did you mean 'num_velocities'?"),
])
def test_mistakes_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "chorales.toml", [override])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_file_keys_name_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(path)


def test_sections_are_frozen_and_check_themselves():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(ConfigError, match="train.patience=-1"):
        dataclasses.replace(cfg.train, patience=-1)
    with pytest.raises(ConfigError, match="data.transpose"):
        DataConfig(transpose=[3, -3])
    assert DataConfig().split is not DataConfig().split  # list defaults are not shared


def test_every_key_has_a_default_a_check_and_help():
    values = default_values()
    assert "train.epochs" in values and "sample.no_repeat_ngram_size" in values and "model.vocab_size" not in values
    for kind in (DataConfig, TrainConfig, SampleConfig, ModelConfig):
        for f in dataclasses.fields(kind):
            assert f.metadata.get("help") and f.metadata.get("check") is not None, (kind.__name__, f.name)
