"""Run configuration: a TOML file with sections, plus `section.key=value` overrides on the command line.

    [data]      DataConfig: where the MIDI files are, filters, split, BPE size, chunking, augmentation
    [tokenizer] MidiTok TokenizerConfig parameter names (optional; default: midistral's REMI+ config)
    [model]     ModelConfig: transformers MistralConfig field names (the vocabulary's size and ids come
                from the tokenizer)
    [train]     TrainConfig: optimiser, schedule, batches, evaluation, checkpoints
    [sample]    SampleConfig: the pieces written when training ends (midistral.sampling's settings)
    out_dir     the run folder (top level)

    cfg = load_config("configs/chorales.toml", ["train.lr=3e-4"])   # a RunConfig
    cfg.train.lr, cfg.data.max_seq, cfg.model.hidden_size

Every section is a typed dataclass whose fields carry their check and help (midistral/fields.py): a key
is one line, e.g. `epochs: int = setting(1, Int(1), "passes over the training data")`. Every key must be
known (a typo is an error naming it, with a "did you mean"); values on the command line are TOML
literals (`train.lr=3e-4`, `data.dir="~/lakh"`, bare words are taken as strings).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from midistral.config_files import resolve_config
from midistral.errors import ConfigError
from midistral.fields import Bool, Choice, Float, Int, Rule, Str, check_fields, from_dict, refuse_unknown, setting, show
from midistral.model.config import ModelConfig
from midistral.sampling import SamplingConfig
from midistral.tokenize import REMI, REMIConfig
from midistral.tokenize.config import DEFAULT_PARAMS

SEED = Int(0, 2**63 - 1)


def _fractions(v) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(Float(0).expected(x) is None for x in v) and sum(v) > 0


def _semitones(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(Int(-60, 60).expected(x) is None for x in v) and v[0] <= v[1]


def _style_repeats(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and k and Int(1, 64).expected(n) is None
                                       for k, n in v.items())


def _betas(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(Float(0, 1).expected(x) is None and x < 1 for x in v)


def _device(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|(cpu|cuda|mps|xpu)(:\d+)?", v) is not None


@dataclass(frozen=True)
class DataConfig:
    dir: str = setting("", Str(), "a folder of .mid/.midi files (recursive); '' with source='chorales': music21's")
    source: str = setting("folder", Choice("folder", "chorales", "music21"),
                          "'folder', 'chorales' (music21's Bach chorales) or 'music21' (all its corpus, with styles)")
    prepared_dir: str = setting("", Str(), "where the shards go ('': OUT_DIR/data)")
    cache_dir: str = setting("", Str(), "the converted MIDI cache ('': ~/.cache/midistral/chorales or .../music21)")
    max_files: int = setting(0, Int(0), "files at most; 0: all")
    only_4_4: bool = setting(False, Bool(), "keep only 4/4 files (the reference setup did)")
    max_bars: int = setting(0, Int(0), "longest piece in bars; 0: no limit (the reference setup: 200)")
    min_notes: int = setting(1, Int(0), "fewest notes of a piece")
    split: list = setting([0.8, 0.1, 0.1],
                          Rule(_fractions, "3 fractions >= 0 with a positive sum, e.g. [0.8, 0.1, 0.1]"),
                          "train, validation and test shares of the files")
    seed: int = setting(0, SEED, "seed of the split and the augmentation")
    bpe_vocab_size: int = setting(0, Int(0, 2**32 - 1), "BPE vocabulary size; 0: base tokens (the reference setup: 5000)")
    transpose: list = setting([0, 0], Rule(_semitones, "[low, high] integers in [-60, 60] with low <= high"),
                              "semitone range of random transpositions of training pieces (drums never shift)")
    transpose_copies: int = setting(0, Int(0, 120), "transposed copies of each training piece")
    ensembles: float = setting(0.0, Float(0, 1), "share of pieces given an ensemble drawn per voice; 0: off")
    ensemble_copies: int = setting(0, Int(0, 16), "with ensembles: more copies of each piece, each another ensemble")
    infill: float = setting(0.0, Float(0, 1), "share of training chunks rearranged for fill-in-the-middle (data/mixes.py)")
    infill_max_bars: int = setting(8, Int(1, 1024), "the most bars a fill-in-the-middle middle holds")
    fim_layout: str = setting("spm", Choice("spm", "psm"), "fill-in-the-middle order: suffix-prefix-middle or "
                              "prefix-suffix-middle (docs/infilling.md)")
    attributes: float = setting(0.0, Float(0, 1), "share of training chunks with attribute-control tokens")
    style: float = setting(0.0, Float(0, 1), "share of training chunks that open with their piece's style token")
    style_repeats: dict = setting({}, Rule(_style_repeats, "a table of style = times (1..64), e.g. {bach = 3}"),
                                  "times each training chunk of a style is seen per epoch (others once)")
    min_seq: int = setting(256, Int(1), "chunks shorter are dropped (a shorter piece is kept whole)")
    max_seq: int = setting(2048, Int(2), "longest training chunk in tokens")
    workers: int = setting(0, Int(0, 1024), "processes for preparation; 0: every core")

    def __post_init__(self):
        check_fields(self, "data.")
        if self.min_seq > self.max_seq:
            raise ConfigError(f"data.min_seq={self.min_seq} > data.max_seq={self.max_seq}: expected min_seq <= max_seq")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(8, Int(1), "chunks per optimiser step and accumulation step, over all processes")
    grad_accum: int = setting(1, Int(1), "gradient accumulation steps per optimiser step")
    lr: float = setting(1e-3, Float(0, 10), "peak learning rate")
    min_lr_ratio: float = setting(0.0, Float(0, 1), "the cosine decays to lr * min_lr_ratio")
    warmup_ratio: float = setting(0.3, Float(0, 1), "share of the schedule spent warming up")
    weight_decay: float = setting(0.01, Float(0), "AdamW weight decay (matrices only)")
    betas: list = setting([0.9, 0.999], Rule(_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"), "AdamW betas")
    grad_clip: float = setting(1.0, Float(0), "gradient norm clip; 0: off")
    epochs: int = setting(1, Int(1), "passes over the training data (the lr schedule spans them)")
    max_steps: int = setting(0, Int(0), "0: epochs * steps per epoch; else stop (and checkpoint) there")
    group_by_length: int = setting(0, Int(0), "batches of like-length chunks, sorted within windows of this "
                                              "many batches (less padding); 0: random batches")
    pack: str = setting("auto", Choice("auto", "on", "off"),
                        "pack a batch's chunks end to end into rows of data.max_seq tokens, each chunk attending "
                        "only to itself (the same loss, no padding); auto: on where attention runs in PyTorch "
                        "(CPU), off where the Triton kernel does (CUDA: it does not read segments)")
    eval_every: int = setting(100, Int(0), "steps between validations; 0: at epoch ends only")
    eval_batches: int = setting(50, Int(1), "validation batches per evaluation")
    patience: int = setting(2, Int(0), "epochs without an improved evaluation before stopping; 0: never")
    seed: int = setting(0, SEED, "seed of the weights and the data order")
    device: str = setting("auto", Rule(_device, "'auto', 'cpu', 'cuda' or 'cuda:N'"), "where to train")
    compile: bool = setting(False, Bool(), "torch.compile the model")
    precision: str = setting("auto", Choice("auto", "fp32", "bf16"),
                             "fp32, bf16 (autocast, fp32 master weights; CUDA or AVX512-BF16 / AMX); auto: bf16 where it runs")
    restart: bool = setting(False, Bool(), "with --resume: weights only, a fresh schedule without warm-up")
    init_from: str = setting("", Rule(lambda v: isinstance(v, str), "a path"),
                             "a checkpoint folder (a run's best/, a released model such as midistral/models/default) "
                             "whose weights start a new run; its tokenizer must be the prepared data's")
    checkpoint_minutes: float = setting(5.0, Float(0), "also write RUN/last this often; 0: only at epoch ends and max_steps")
    log_every: int = setting(1, Int(1), "steps between metric rows")
    sample_after: bool = setting(True, Bool(), "write a few samples when training ends ([sample])")

    def __post_init__(self):
        check_fields(self, "train.")


@dataclass(frozen=True)
class SampleConfig(SamplingConfig):
    """The pieces written to RUN/samples when training ends: SamplingConfig's settings, how many, the seed."""

    num_samples: int = setting(2, Int(0, 1024), "pieces written when training ends; 0: none")
    seed: int = setting(0, SEED, "seed of those pieces")


# The model keys a run config does not set: the tokenizer decides them.
FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = setting("runs/default", Str("a folder path"), "the run folder")
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: dict = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        check_fields(self)
        if self.model.max_position_embeddings < self.data.max_seq:
            raise ConfigError(f"model.max_position_embeddings={self.model.max_position_embeddings} < "
                              f"data.max_seq={self.data.max_seq}: the model must see a whole chunk")
        if not isinstance(self.tokenizer, dict):
            raise ConfigError(f"tokenizer={show(self.tokenizer)}: expected a section")
        check_tokenizer_params(self.tokenizer, "tokenizer.")

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "RunConfig":
        """From the TOML form (sections as tables): unknown keys refused, every value checked."""
        check_keys(d, source)
        sections = {name: from_dict(kind, d[name], source, f"{name}.") for name, kind in SECTIONS.items() if name in d}
        top = {k: v for k, v in d.items() if k not in SECTIONS}
        return cls(**top, **sections)

    def to_dict(self) -> dict:
        """The TOML form (what a run folder's train_config.json holds)."""
        d = dataclasses.asdict(self)
        d["model"] = {k: v for k, v in d["model"].items() if k not in FROM_TOKENIZER}
        return d

    @property
    def tokenizer_params(self) -> dict:
        """The [tokenizer] section, else midistral's default REMI+ parameters."""
        return self.tokenizer or dict(DEFAULT_PARAMS)


def check_keys(d: dict, source: str, where: str = "") -> None:
    """Every key of `d` (a run config in TOML form, or part of one) known, every section a table."""
    refuse_unknown(RunConfig, d, source, where)
    for name, value in d.items():
        if name in SECTIONS or name == "tokenizer":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name!r} must be a section")
        if name in SECTIONS:
            refuse_unknown(SECTIONS[name], value, source, f"{name}.")
            if name == "model" and set(value) & set(FROM_TOKENIZER):
                key = next(k for k in value if k in FROM_TOKENIZER)
                raise ConfigError(f"{source}: model.{key} is set from the tokenizer, not in a run config")


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The run config of the TOML file `path` (None: the defaults) with `section.key=value` overrides."""
    merged: dict = {}
    if path is not None:
        path = resolve_config(path)  # a path, or the name of a shipped config (`chorales`)
        merged = read_toml(path)
        check_keys(merged, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        nested = _parse_value(text.strip())
        for p in reversed(key.strip().split(".")):
            nested = {p: nested}
        check_keys(nested, "command line")
        _merge(merged, nested)
    return RunConfig.from_dict(merged, "command line" if path is None else str(path))


def default_values() -> dict:
    """Every key of a run config (`section.key`, or a top-level key) with its default: for tests and docs."""
    out = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    for name, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            if not (name == "model" and f.name in FROM_TOKENIZER):
                out[f"{name}.{f.name}"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


# The tokenizer's own config (REMIConfig) checks names and pitch ranges; these bound the vocabulary it builds.
TOKENIZER_BOUNDS = {"num_velocities": (1, 127), "num_tempos": (1, 1000), "max_bar_embedding": (1, 100_000)}


def check_tokenizer_params(params: dict, where: str) -> None:
    """Build the tokenizer a [tokenizer] section (or a tokenizer file's "config") describes, or a ConfigError
    naming the key: `where` prefixes it ("tokenizer." or "FILE: ")."""
    for key, (lo, hi) in TOKENIZER_BOUNDS.items():
        v = params.get(key)
        if v is not None and Int(lo, hi).expected(v) is not None:
            raise ConfigError(f"{where}{key}={show(v)}: expected an integer in [{lo}, {hi}]")
    programs = params.get("programs", [])
    if not isinstance(programs, list) or any(not isinstance(p, int) or not -1 <= p <= 127 for p in programs):
        raise ConfigError(f"{where}programs={show(programs)}: expected a list of MIDI programs in [-1, 127]")
    for key in ("beat_res", "beat_res_rest"):
        values = params.get(key, {}).values() if isinstance(params.get(key), dict) else []
        if any(Int(1, 128).expected(v) is not None for v in values):
            raise ConfigError(f"{where}{key}={show(params[key])}: expected positions per beat in [1, 128]")

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
        shown = f"{bad}={show(params[bad])}" if bad else "config"
        raise ConfigError(f"{where}{shown}: not a valid value ({e.__class__.__name__}: {str(e)[:80]})") from None


def _builds(build, params: dict) -> bool:
    try:
        build(params)
        return True
    except Exception:  # noqa: BLE001
        return False

