"""A tokenizer file read back: ours or one saved by MidiTok 3.1, its values bounded before it is built.

The prepared data (data/), every checkpoint folder and a run folder hold one; this is the one reader of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from midistral.config import check_tokenizer_params
from midistral.errors import CheckpointError, MidistralError
from midistral.io import read_tokenizer_json
from midistral.tokenize import REMI


def load_tokenizer(path: str | os.PathLike) -> REMI:
    """Our tokenizer JSON, or one saved by MidiTok 3.1 (`tokenizer.save`): REMI.load reads both. A file
    whose values do not build a tokenizer (tampered, another version) is a CheckpointError naming it."""
    d = read_tokenizer_json(Path(path))
    if d.get("tokenizer") == "midistral.REMI":  # bound the vocabulary before building it
        check_tokenizer_params(d.get("config") or {}, f"{path}: ")
    try:
        return REMI.load(path)
    except MidistralError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a file's values the tokenizer cannot build from, whatever breaks
        reason = str(e).splitlines()[0][:100] if str(e) else ""
        raise CheckpointError(f"{path}: not a tokenizer this version reads ({e.__class__.__name__}: {reason})") from None
