"""Run configuration: a TOML file with sections, plus `section.key=value` overrides on the command line.

    [data]      where the MIDI files are, filters, split, BPE size, chunking, augmentation
    [tokenizer] MidiTok TokenizerConfig parameter names (optional; default: midistral's REMI+ config)
    [model]     transformers MistralConfig field names
    [train]     optimiser, schedule, batches, evaluation, checkpoints
    [sample]    sampling after training
    out_dir     the run folder (top level)

Every key must be known (a typo is an error naming it); values on the command line are TOML literals
(`train.lr=3e-4`, `data.dir="~/lakh"`, bare words are taken as strings).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from midistral.errors import ConfigError
from midistral.model.config import ModelConfig
from midistral.tokenize.config import DEFAULT_PARAMS

DEFAULTS = {
    "out_dir": "runs/default",
    "data": {
        "dir": "",                 # a folder of .mid/.midi files (recursive); "" with source="chorales" uses music21
        "source": "folder",        # "folder" or "chorales" (music21's Bach chorales, converted once and cached)
        "prepared_dir": "",        # where shards go; default OUT_DIR/data
        "cache_dir": "",           # chorale MIDI cache; default ~/.cache/midistral/chorales
        "max_files": 0,            # 0: all
        "only_4_4": False,         # the report kept only 4/4 files
        "max_bars": 0,             # 0: no limit (report: 200)
        "min_notes": 1,
        "split": [0.8, 0.1, 0.1],
        "seed": 0,
        "bpe_vocab_size": 0,       # 0: no BPE (base tokens); report: 5000
        "transpose": [0, 0],       # semitone range of random transpositions of training pieces (drums never shift)
        "transpose_copies": 0,     # how many transposed copies of each training piece
        "min_seq": 256,            # chunks shorter than this are dropped (a piece shorter than it is kept whole)
        "max_seq": 2048,
        "workers": 0,              # 0: every core
    },
    "tokenizer": {},
    "model": {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.name not in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")},
    "train": {
        "batch_size": 8,
        "grad_accum": 1,
        "lr": 1e-3,
        "min_lr_ratio": 0.0,       # cosine decays to lr * min_lr_ratio
        "warmup_ratio": 0.3,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "grad_clip": 1.0,
        "epochs": 1,
        "max_steps": 0,            # 0: epochs * steps per epoch; else stop (and checkpoint) there
        "eval_every": 100,
        "eval_batches": 50,
        "patience": 2,             # epochs in which no evaluation improved before stopping; 0: never
        "seed": 0,
        "device": "auto",
        "compile": False,
        "restart": False,          # with --resume: weights only, a fresh schedule without warm-up
        "log_every": 1,
        "sample_after": True,      # write a few samples when training ends
    },
    "sample": {"num_samples": 2, "max_new_tokens": 512, "min_new_tokens": 0, "temperature": 0.5, "top_k": 6,
               "no_repeat_ngram": 6, "seed": 0},
}


def _merge(base: dict, new: dict, where: str, source: str) -> None:
    for k, v in new.items():
        name = f"{where}.{k}" if where else k
        if where == "tokenizer":
            base[k] = v  # checked by REMIConfig, which names unknown keys
            continue
        if k not in base:
            raise ConfigError(f"{source}: unknown config key {name!r}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {name!r} must be a section")
            _merge(base[k], v, name, source)
        else:
            base[k] = v


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        _merge(cfg, data, "", str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        nested = _parse_value(text.strip())
        for p in reversed(parts):
            nested = {p: nested}
        _merge(cfg, nested, "", "command line")
    try:
        ModelConfig(**cfg["model"])  # fail early, naming the bad value
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None
    return cfg


def tokenizer_params(cfg: dict) -> dict:
    return cfg["tokenizer"] or dict(DEFAULT_PARAMS)
