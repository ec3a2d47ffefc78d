"""Load a transformers `MistralForCausalLM.save_pretrained` folder without importing transformers.

The folder holds config.json and model.safetensors (or shards listed in model.safetensors.index.json).
Our checkpoint names are transformers' without the leading "model." (model.py fuses q/k/v and gate/up on
load), so the mapping is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from midistral.errors import CheckpointError
from midistral.model.config import ModelConfig
from midistral.model.model import Transformer


def read_hf_folder(path: str | Path) -> tuple[ModelConfig, list[Path]]:
    """The config and the weight files (model.safetensors or the shards of its index) of a save_pretrained
    folder; CheckpointError naming what is missing or malformed."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json (not a save_pretrained folder)")
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if d.get("model_type", "mistral") != "mistral":
        raise CheckpointError(f"{path / 'config.json'}: model_type is {d['model_type']!r}, expected 'mistral'")
    cfg = ModelConfig.from_dict(d)

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
    elif index.is_file():
        try:
            shards = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e.__class__.__name__})") from None
    else:
        raise CheckpointError(f"{path}: missing model.safetensors (only safetensors weights are read)")
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{path}: missing weight shard {shard.name}")
    return cfg, shards


def from_hf(path: str | Path, device: str | None = None) -> Transformer:
    path = Path(path)
    cfg, shards = read_hf_folder(path)
    state = {}
    for shard in shards:
        try:
            state.update(load_file(str(shard), device=device or "cpu"))
        except Exception as e:
            raise CheckpointError(f"{shard}: cannot be read ({e})") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    model = Transformer(cfg)
    model.load_weights(state, source=path)
    return model.to(device) if device else model
