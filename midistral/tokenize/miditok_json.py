"""Reading a MidiTok 3.1 tokenizer JSON (`tokenizer.save`): its config and, if trained, its BPE model.

REMI.from_miditok(path) builds the tokenizer from what `read_miditok` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from midistral.errors import CheckpointError, ConfigError
from midistral.io import read_tokenizer_json
from midistral.tokenize.config import REMIConfig


def read_miditok(path) -> tuple[REMIConfig, dict | None, Tokenizer | None]:
    """(config, MidiTok's base vocabulary token -> id or None, HF BPE tokenizer or None) of a MidiTok JSON."""
    path = Path(path)
    d = read_tokenizer_json(path)
    if "config" not in d:
        raise CheckpointError(f"{path}: not a MidiTok tokenizer file (no field 'config')")
    kind = d.get("tokenization")
    if kind != "REMI":
        raise CheckpointError(f"{path}: field 'tokenization' is {kind!r}; midistral reads MidiTok 'REMI' tokenizers")
    try:
        config = REMIConfig.from_miditok_dict(d["config"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    hf = None
    if d.get("_model"):
        try:
            hf = Tokenizer.from_str(d["_model"])
        except Exception as e:
            raise CheckpointError(f"{path}: field '_model' is not a tokenizers model ({e.__class__.__name__})") from None
        if json.loads(d["_model"]).get("model", {}).get("type") != "BPE":
            raise CheckpointError(f"{path}: field '_model' is not a BPE model (only BPE is supported)")
    return config, d.get("_vocab_base"), hf
