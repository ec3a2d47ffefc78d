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
import warnings
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from midistral.errors import ConfigError
from midistral.model.config import ModelConfig
from midistral.tokenize import REMI, REMIConfig
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
        "ensembles": 0.0,          # share of pieces (and copies) given an ensemble drawn per voice (chorales.py); 0: off
        "ensemble_copies": 0,      # with ensembles: more copies of each training piece, each in another drawn ensemble
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
        "precision": "auto",       # fp32, bf16 (autocast; CUDA or AVX512-BF16 / AMX), auto: bf16 on CUDA
        "restart": False,          # with --resume: weights only, a fresh schedule without warm-up
        "log_every": 1,
        "sample_after": True,      # write a few samples when training ends
    },
    "sample": {"num_samples": 2, "max_new_tokens": 512, "min_new_tokens": 0, "temperature": 0.7, "top_k": 12,
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
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a TOML config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
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
    check_config(cfg)
    ModelConfig(**cfg["model"])  # fail early on the model's own rules (divisibility, even head_dim)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Types and ranges of every value: (kind, low, high); a value outside is refused naming key, value, rule.

INF = float("inf")
RULES: dict[str, tuple] = {
    "out_dir": ("path",),
    "data.dir": ("str",), "data.source": ("choice", "folder", "chorales"), "data.prepared_dir": ("str",),
    "data.cache_dir": ("str",), "data.max_files": ("int", 0, INF), "data.only_4_4": ("bool",),
    "data.max_bars": ("int", 0, INF), "data.min_notes": ("int", 0, INF), "data.split": ("fractions", 3),
    "data.seed": ("int", 0, 2**63 - 1), "data.bpe_vocab_size": ("int", 0, 2**32 - 1),
    "data.transpose": ("range", -60, 60), "data.transpose_copies": ("int", 0, 120), "data.ensembles": ("float", 0, 1),
    "data.ensemble_copies": ("int", 0, 16),
    "data.min_seq": ("int", 1, INF), "data.max_seq": ("int", 2, INF), "data.workers": ("int", 0, 1024),
    "train.batch_size": ("int", 1, INF), "train.grad_accum": ("int", 1, INF), "train.lr": ("float", 0, 10),
    "train.min_lr_ratio": ("float", 0, 1), "train.warmup_ratio": ("float", 0, 1),
    "train.weight_decay": ("float", 0, INF), "train.betas": ("betas",), "train.grad_clip": ("float", 0, INF),
    "train.epochs": ("int", 1, INF), "train.max_steps": ("int", 0, INF), "train.eval_every": ("int", 0, INF),
    "train.eval_batches": ("int", 1, INF), "train.patience": ("int", 0, INF), "train.seed": ("int", 0, 2**63 - 1),
    "train.device": ("device",), "train.compile": ("bool",), "train.precision": ("choice", "auto", "fp32", "bf16"), "train.restart": ("bool",),
    "train.log_every": ("int", 1, INF), "train.sample_after": ("bool",),
    "sample.num_samples": ("int", 0, 1024), "sample.max_new_tokens": ("int", 1, INF),
    "sample.min_new_tokens": ("int", 0, INF), "sample.temperature": ("float", 0, INF),
    "sample.top_k": ("int", 0, INF), "sample.no_repeat_ngram": ("int", 0, INF), "sample.seed": ("int", 0, 2**63 - 1),
    "model.hidden_size": ("int", 1, INF), "model.intermediate_size": ("int", 1, INF),
    "model.num_hidden_layers": ("int", 1, INF), "model.num_attention_heads": ("int", 1, INF),
    "model.num_key_value_heads": ("int", 1, INF), "model.head_dim": ("int", 2, INF),
    "model.sliding_window": ("int", 1, INF), "model.max_position_embeddings": ("int", 2, INF),
    "model.rope_theta": ("float", 1e-9, INF), "model.rms_norm_eps": ("float", 0, 1),
    "model.tie_word_embeddings": ("bool",), "model.initializer_range": ("float", 0, INF),
}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != INF


def _expected(key: str, v) -> str | None:
    """What `v` should be, or None when it is fine."""
    kind, *args = RULES[key]
    if kind in ("int", "float"):
        lo, hi = args
        ok_type = isinstance(v, int) and not isinstance(v, bool) if kind == "int" else _is_num(v)
        if not ok_type or not lo <= v <= hi:
            what = "an integer" if kind == "int" else "a number"
            return what + (f" >= {lo}" if hi == INF else f" in [{lo}, {hi}]")
    elif kind == "bool" and not isinstance(v, bool):
        return "true or false"
    elif kind in ("str", "path", "device") and not isinstance(v, str):
        return "a string"
    elif kind == "path" and not v.strip():
        return "a folder path"
    elif kind == "device" and v != "auto" and not _is_device(v):
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"
    elif kind == "choice" and v not in args:
        return " or ".join(repr(a) for a in args)
    elif kind == "fractions" and not (isinstance(v, list) and len(v) == args[0] and all(_is_num(x) and x >= 0 for x in v)
                                      and sum(v) > 0):
        return f"{args[0]} fractions >= 0 with a positive sum, e.g. [0.8, 0.1, 0.1]"
    elif kind == "range" and not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                  and args[0] <= x <= args[1] for x in v) and v[0] <= v[1]):
        return f"[low, high] integers in [{args[0]}, {args[1]}] with low <= high"
    elif kind == "betas" and not (isinstance(v, list) and len(v) == 2 and all(_is_num(x) and 0 <= x < 1 for x in v)):
        return "two numbers in [0, 1), e.g. [0.9, 0.999]"
    return None


def _is_device(name: str) -> bool:
    try:
        return torch.device(name).type in ("cpu", "cuda", "mps", "xpu")
    except (RuntimeError, ValueError):
        return False


def check_config(cfg: dict) -> None:
    """Every value of a merged config against RULES, then the rules that tie two values together."""
    for key in RULES:
        section, _, name = key.rpartition(".")
        table = cfg[section] if section else cfg
        if name in table and not (section == "model" and table[name] is None):
            why = _expected(key, table[name])
            if why is not None:
                raise ConfigError(f"{key}={_show(table[name])}: expected {why}")
    d, m = cfg["data"], cfg["model"]
    if d["min_seq"] > d["max_seq"]:
        raise ConfigError(f"data.min_seq={d['min_seq']} > data.max_seq={d['max_seq']}: expected min_seq <= max_seq")
    if m["max_position_embeddings"] < d["max_seq"]:
        raise ConfigError(f"model.max_position_embeddings={m['max_position_embeddings']} < data.max_seq={d['max_seq']}: "
                          "the model must see a whole chunk")
    if not isinstance(cfg["tokenizer"], dict):
        raise ConfigError(f"tokenizer={_show(cfg['tokenizer'])}: expected a section")
    check_tokenizer_params(cfg["tokenizer"], "tokenizer.")


# The tokenizer's own config (REMIConfig) checks names and pitch ranges; these bound the vocabulary it builds.
TOKENIZER_BOUNDS = {"num_velocities": (1, 127), "num_tempos": (1, 1000), "max_bar_embedding": (1, 100_000)}


def check_tokenizer_params(params: dict, where: str) -> None:
    """Build the tokenizer a [tokenizer] section (or a tokenizer file's "config") describes, or a ConfigError
    naming the key: `where` prefixes it ("tokenizer." or "FILE: ")."""
    for key, (lo, hi) in TOKENIZER_BOUNDS.items():
        v = params.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ConfigError(f"{where}{key}={_show(v)}: expected an integer in [{lo}, {hi}]")
    programs = params.get("programs", [])
    if not isinstance(programs, list) or any(not isinstance(p, int) or not -1 <= p <= 127 for p in programs):
        raise ConfigError(f"{where}programs={_show(programs)}: expected a list of MIDI programs in [-1, 127]")
    for key in ("beat_res", "beat_res_rest"):
        values = params.get(key, {}).values() if isinstance(params.get(key), dict) else []
        if any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 128 for v in values):
            raise ConfigError(f"{where}{key}={_show(params[key])}: expected positions per beat in [1, 128]")

    def build(p: dict) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            REMI(REMIConfig(**p))

    try:
        build(params)
    except ConfigError as e:
        if where.endswith(": "):  # a file: name it
            raise ConfigError(f"{where}{e}") from None
        raise
    except Exception as e:  # noqa: BLE001 - values the tokenizer cannot build from, whatever breaks
        bad = next((k for k in params if not _builds(build, {k: params[k]})), None)
        shown = f"{bad}={_show(params[bad])}" if bad else "config"
        raise ConfigError(f"{where}{shown}: not a valid value ({e.__class__.__name__}: {str(e)[:80]})") from None


def _builds(build, params: dict) -> bool:
    try:
        build(params)
        return True
    except Exception:  # noqa: BLE001
        return False


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def tokenizer_params(cfg: dict) -> dict:
    return cfg["tokenizer"] or dict(DEFAULT_PARAMS)
