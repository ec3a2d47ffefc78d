"""Checkpoint folders: model.safetensors + config.json + tokenizer.json, written whole, read by one loader.

    save_checkpoint(folder, model, tokenizer)        # staged beside the folder, then swapped in by renames
    model, tok = load_model_and_tokenizer(folder)    # or a run folder: its best/ (else last/)
    model = load_model(folder, precision="int8")     # the decode model of a precision, part by part
    load_weights(model, folder)                      # into a model that exists (train.py's --resume)

The loader also reads a transformers `save_pretrained` folder (config.json with "model_type", model.safetensors
or shards listed in model.safetensors.index.json) plus a tokenizer file, ours or MidiTok's. Tensors are read
with safetensors' `safe_open`, one model part at a time; a part is converted to the decode precision by
precision.py's converter before the next is read. What a run folder holds besides checkpoints is runs.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from midistral.errors import CheckpointError
from midistral.io import atomic_write_json, fix_mode, save_tensors
from midistral.memory import map_big_buffers, release_freed_memory
from midistral.model import Transformer
from midistral.model.config import ModelConfig
from midistral.model.model import check_tensors
from midistral.model.precision import check_precision, convert_part, decode_layers, finish_decode
from midistral.tokenizer_file import load_tokenizer
from midistral.config_files import command_line

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"  # a transformers folder's shards
RUN_CHECKPOINTS = ("best", "last")  # a run folder's checkpoints, in the order `--ckpt RUN` picks them
# the model that ships with the package (models/default in the repository; midistral/release.py writes it):
# what sample.py, Sampler.load() and the studio use when no checkpoint is given
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"


def _has_weights(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() or (d / INDEX_FILE).is_file()


def is_checkpoint_dir(d: str | os.PathLike) -> bool:
    d = Path(d)
    return d.is_dir() and (d / CONFIG_FILE).is_file() and _has_weights(d)


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """A checkpoint folder, or a run folder's best/ (else last/) checkpoint; None: the shipped default model."""
    if path is None:
        if not is_checkpoint_dir(DEFAULT_MODEL):
            raise CheckpointError(f"{DEFAULT_MODEL}: the shipped default model is missing from this install; "
                                  f"give a trained run (--ckpt RUN; {command_line('train')} --config ... makes one)")
        return DEFAULT_MODEL
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder "
                              f"(train one first: {command_line('train')} --config ...)")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; --ckpt takes a checkpoint folder or a run folder")
    if is_checkpoint_dir(p):
        return p
    # .<name>.old only exists if a save was interrupted between its two renames
    for sub in (*RUN_CHECKPOINTS, *(f".{name}.old" for name in RUN_CHECKPOINTS)):
        if is_checkpoint_dir(p / sub):
            return p / sub
    if (p / CONFIG_FILE).is_file() or _has_weights(p):
        missing = [f for f in (CONFIG_FILE, MODEL_FILE) if not (p / f).is_file()]
        raise CheckpointError(f"{p}: incomplete checkpoint, missing {', '.join(missing)}")
    raise CheckpointError(
        f"{p}: not a checkpoint (needs {CONFIG_FILE} and {MODEL_FILE}) nor a run folder with best/ or last/"
    )


def find_tokenizer_file(ckpt: Path) -> Path:
    """tokenizer.json in the checkpoint folder, else in its run folder, else any MidiTok tokenizer JSON beside it."""
    for cand in (ckpt / TOKENIZER_FILE, ckpt.parent / TOKENIZER_FILE):
        if cand.is_file():
            return cand
    for cand in sorted(ckpt.glob("*.json")):
        if cand.name in (CONFIG_FILE, "generation_config.json", INDEX_FILE):
            continue
        try:
            if "tokenization" in json.loads(cand.read_text()):
                return cand
        except (OSError, ValueError):
            continue
    raise CheckpointError(f"{ckpt}: no {TOKENIZER_FILE} in the checkpoint or its run folder")


# ----------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    dir: str | os.PathLike,
    model,
    tokenizer=None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a whole checkpoint folder atomically: stage it beside `dir`, then swap it in.

    `extra(staging_dir)` may write more files (training state) into the same folder before the swap.
    """
    dir = Path(dir)
    dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dir.name}.", suffix=".tmp", dir=dir.parent))
    fix_mode(staging, 0o777)  # mkdtemp makes it 0700: give the folder the umask's permissions
    try:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_tensors(staging / MODEL_FILE, state, metadata={"format": "pt"})
        atomic_write_json(staging / CONFIG_FILE, model.config.to_dict())
        if tokenizer is not None:
            tokenizer.save(staging / TOKENIZER_FILE)
        if extra is not None:
            extra(staging)
        old = None
        if dir.exists():
            old = dir.parent / f".{dir.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(dir, old)
        os.replace(staging, dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dir


# ----------------------------------------------------------------------------------------------------
# Reading: config and weight files of our folders and transformers' save_pretrained folders


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: checkpoint is missing {path.name}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _hf_shards(ckpt: Path) -> list[Path]:
    """The weight files of a transformers folder: model.safetensors, or the shards its index lists."""
    if (ckpt / MODEL_FILE).is_file():
        return [ckpt / MODEL_FILE]
    if not (ckpt / INDEX_FILE).is_file():
        raise CheckpointError(f"{ckpt}: missing {MODEL_FILE} (only safetensors weights are read)")
    try:
        shards = [ckpt / f for f in sorted(set(_read_json(ckpt / INDEX_FILE)["weight_map"].values()))]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt / INDEX_FILE}: not a safetensors index ({e.__class__.__name__})") from None
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{ckpt}: missing weight shard {shard.name}")
    return shards


def _weight_files(ckpt: Path) -> tuple[ModelConfig, list[Path], str, Path]:
    """(model config, weight files, the prefix of their tensor names, the source errors name)."""
    cfg = _read_json(ckpt / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: not a model config (expected a JSON object)")
    if "model_type" in cfg:  # transformers' names are ours with a leading "model."
        if cfg["model_type"] != "mistral":
            raise CheckpointError(f"{ckpt / CONFIG_FILE}: model_type is {cfg['model_type']!r}, expected 'mistral'")
        return ModelConfig.from_dict(cfg), _hf_shards(ckpt), "model.", ckpt
    if not (ckpt / MODEL_FILE).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint is missing {MODEL_FILE}")
    return ModelConfig.from_dict(cfg), [ckpt / MODEL_FILE], "", ckpt / MODEL_FILE


def read_model_config(ckpt: str | os.PathLike) -> ModelConfig:
    """The model config of a checkpoint folder (ours or transformers'), without reading its weights."""
    return _weight_files(resolve_checkpoint(ckpt))[0]


def _open(path: Path):
    """safe_open, its errors (truncated, bad header, bad dtype or offsets) one CheckpointError line naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or damaged safetensors file ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = (str(e).splitlines() or [e.__class__.__name__])[0]
    return text.removeprefix("Error while deserializing header: ")[:120]


def _tensor_files(files: list[Path], prefix: str) -> dict[str, tuple[Path, str, tuple]]:
    """Our tensor name -> (its file, its name there, its shape), from the files' headers."""
    where = {}
    for f in files:
        with _open(f) as g:
            for k in g.keys():
                where[k.removeprefix(prefix)] = (f, k, tuple(g.get_slice(k).get_shape()))
    return where


def iter_tensors(path: Path, names: dict[str, str]):
    """(our name, tensor) for `names` (our name -> the file's name), each copied out of the file. The file is
    mapped only while these are read: pages of a mapping stay resident until it is closed."""
    with _open(path) as g:
        for ours, theirs in names.items():
            try:
                tensor = g.get_tensor(theirs).clone()  # its own memory: a view would keep the whole mapping
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: truncated or damaged safetensors file ({_reason(e)})") from None
            yield ours, tensor


def _read(where: dict[str, tuple[Path, str, tuple]], names: list[str]) -> dict:
    """name -> tensor for `names` (see _tensor_files), read file by file."""
    out = {}
    for f in dict.fromkeys(where[k][0] for k in names):
        out.update(iter_tensors(f, {k: where[k][1] for k in names if where[k][0] == f}))
    return {k: out[k] for k in names}


# ----------------------------------------------------------------------------------------------------
# The loader


def load_model(ckpt: str | os.PathLike, device: str = "cpu", precision: str | None = None):
    """The model of a checkpoint folder (ours or transformers'): in fp32 as trained (`precision` None), else
    the decode model `prepare_for_decode(model, precision)` gives, the same to the bit, built without ever
    holding the fp32 state dict or the fp32 linear weights: the skeleton on the meta device, then part by
    part (the LM head, each block, the embedding, the final norm) its tensors read, loaded by the part's own
    load_state_dict (which joins q/k/v and gate/up), converted (precision.convert_part), and the fp32
    tensors dropped before the next part."""
    ckpt = resolve_checkpoint(ckpt)
    layer, head, kv_dtype = decode_layers(check_precision(precision, device) if precision else "fp32", device)
    if precision is None:
        layer = head = None
    else:
        map_big_buffers()  # a process that samples: freed activations do not stay resident (process-wide)
    cfg, files, prefix, source = _weight_files(ckpt)
    with torch.device("meta"), _NoInit():
        model = Transformer(cfg)
    own = model.checkpoint_shapes()
    where = _tensor_files(files, prefix)
    if cfg.tie_word_embeddings:
        where.pop("lm_head.weight", None)
    check_tensors(own, {k: shape for k, (_, _, shape) in where.items()}, source)
    # the parts that shrink when converted first, the kept ones (embedding, norm) last: the least held at once
    parts = [(model, "lm_head"), *((model.layers, str(i)) for i in range(len(model.layers))),
             *((model, n) for n, _ in model.named_children() if n not in ("lm_head", "layers", "rope"))]
    for parent, attr in parts:
        start = f"layers.{attr}." if parent is model.layers else f"{attr}."
        names = [k for k in own if k.startswith(start)]
        if names:  # (a tied LM head has none: it is the embedding)
            state = {k.removeprefix(start): v.to(device=device, dtype=torch.float32)
                     for k, v in _read(where, names).items()}
            getattr(parent, attr).load_state_dict(state, assign=True)
            del state
            setattr(parent, attr, convert_part(getattr(parent, attr), head if attr == "lm_head" else layer))
            release_freed_memory()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        model.lm_head = convert_part(model.lm_head, head)
    for m in model.modules():  # built buffers (RoPE's inv_freq, the norms' eps) are on the CPU even on meta
        m._buffers.update({n: b.to(device) for n, b in m._buffers.items() if b is not None})
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not left, f"not loaded: {left}"
    if precision is None or (layer is None and kv_dtype == torch.float32):  # as precision.convert: as it is
        return model
    model = finish_decode(model, precision)
    release_freed_memory()
    return model


def load_weights(model, ckpt: str | os.PathLike) -> None:
    """Our checkpoint folder's weights into `model` (which keeps its tensors: an optimiser holds them)."""
    ckpt = Path(ckpt)
    cfg, files, prefix, source = _weight_files(ckpt)
    where = _tensor_files(files, prefix)
    model.load_weights(_read(where, list(where)), source)


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's functions (the skeleton's weights are all replaced): on the meta device their
    Python decompositions would import torch._refs and sympy, 150 MB and 3 s (measured)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def load_model_and_tokenizer(path: str | os.PathLike, device: str = "cpu", precision: str | None = None):
    """The model (in `precision`, see load_model) and the tokenizer of a checkpoint or run folder."""
    ckpt = resolve_checkpoint(path)
    tok = load_tokenizer(find_tokenizer_file(ckpt))
    model = load_model(ckpt, device, precision)
    if len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"{ckpt}: tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok
