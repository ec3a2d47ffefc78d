"""Checkpoints: one folder = model.safetensors + config.json + tokenizer.json (+ training state).

A run folder written by train.py holds `best/` (lowest validation loss) and `last/` (latest), each a
checkpoint folder. `resolve_checkpoint` turns whatever the user passed (a checkpoint folder or a run
folder) into one checkpoint folder. Folders are written whole: into a staging folder beside the
target, then swapped in by renames, so a crash mid-save never leaves a half-written checkpoint.

Also reads a transformers `save_pretrained` folder (config.json with "model_type") plus a tokenizer
file, ours or MidiTok's, for users who trained with the report's pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from midistral.errors import CheckpointError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def _has_weights(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() or (d / "model.safetensors.index.json").is_file()


def is_checkpoint_dir(d: str | os.PathLike) -> bool:
    d = Path(d)
    return d.is_dir() and (d / CONFIG_FILE).is_file() and _has_weights(d)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder's best/ (else last/) checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file; --ckpt takes a checkpoint folder or a run folder")
    if is_checkpoint_dir(p):
        return p
    # .<name>.old only exists if a save was interrupted between its two renames
    for sub in ("best", "last", ".best.old", ".last.old"):
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
        if cand.name in (CONFIG_FILE, "generation_config.json", "model.safetensors.index.json"):
            continue
        try:
            if "tokenization" in json.loads(cand.read_text()):
                return cand
        except (OSError, ValueError):
            continue
    raise CheckpointError(f"{ckpt}: no {TOKENIZER_FILE} in the checkpoint or its run folder")


def load_tokenizer(path: str | os.PathLike):
    """Our tokenizer JSON, or one saved by MidiTok 3.1 (`tokenizer.save`): REMI.load reads both."""
    from midistral.tokenize import REMI

    return REMI.load(path)


def load_model(ckpt: str | os.PathLike, device: str = "cpu"):
    """Our checkpoint, or a transformers MistralForCausalLM `save_pretrained` folder."""
    from midistral.model import Transformer, from_hf

    ckpt = resolve_checkpoint(ckpt)
    try:
        cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: not valid JSON ({e})") from None
    model = from_hf(ckpt) if "model_type" in cfg else Transformer.load(ckpt)
    return model.to(device)


def load_model_and_tokenizer(path: str | os.PathLike, device: str = "cpu"):
    ckpt = resolve_checkpoint(path)
    tok = load_tokenizer(find_tokenizer_file(ckpt))
    model = load_model(ckpt, device)
    if len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"{ckpt}: tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok


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
    try:
        model.save(staging)
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
