"""Instruments as a control: names a user types (the General MIDI table, midistral.general_midi) and the
instruments a trained model knows.

    parse_programs("piano,bass,drums")          # [0, 33, -1]
    known = known_programs("runs/chorales")     # {68, 70, 71, 73}: the programs of its training split
    unknown_instruments_note([33], known)       # 'the model never learned Electric Bass (finger) ...'

A model writes only instruments it saw in training: asked for another, it stays silent. The note says so
before anyone wonders why, naming the instruments it does know.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from midistral.errors import MidistralError
from midistral.general_midi import (DRUMS, GM_FAMILIES, GM_NAMES, SHORT_NAMES, parse_program, parse_programs,
                                    program_family, program_name)

__all__ = ["DRUMS", "GM_FAMILIES", "GM_NAMES", "SHORT_NAMES", "known_programs", "parse_program", "parse_programs",
           "program_family", "program_name", "unknown_instruments_note"]

MAX_NAMED = 12  # instruments a note lists by name; the rest are counted


def data_folder(path: Path) -> Path | None:
    """The prepared data folder of a run folder, of a checkpoint folder in one (best/, last/), or the
    prepared data folder itself: the one with a manifest.json."""
    runs = [path.parent, path] if path.name in ("best", "last") else [path]
    candidates = [path]
    for run in runs:
        candidates.append(run / "data")
        cfg_file = run / "last" / "train_config.json"  # where the run's config names its prepared data
        try:
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            prepared = (cfg.get("data") or {}).get("prepared_dir") or Path(cfg.get("out_dir", run)) / "data"
            candidates.append(Path(prepared))
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


def known_programs(run_dir, tok=None) -> frozenset[int] | None:
    """The programs (-1 = drums) the training split of `run_dir` plays: from its data manifest's `programs`
    (program -> training files), else by scanning the train shard's Program tokens (`tok`: the run's
    tokenizer, else the data folder's). None when the run's training data cannot be found."""
    if run_dir is None:
        return None
    folder = data_folder(Path(run_dir))
    if folder is None:
        return None
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    programs = man.get("programs") if isinstance(man, dict) else None
    if isinstance(programs, dict):
        return frozenset(int(p) for p, n in programs.items() if int(n) > 0)
    return _scan_train_shard(folder, man, tok)


def _scan_train_shard(folder: Path, man: dict, tok) -> frozenset[int] | None:
    """The programs whose Program token occurs in train.bin (its ids expanded to base ids if BPE)."""
    path = folder / "train.bin"
    try:
        if tok is None:
            from midistral.tokenize import REMI  # only on this path: a run without a programs table

            tok = REMI.load(folder / "tokenizer.json")
        ids = np.memmap(path, dtype=np.dtype(man["dtype"]), mode="r") if path.stat().st_size else np.zeros(0, int)
    except (OSError, KeyError, TypeError, ValueError, MidistralError):  # a damaged folder tells nothing
        return None
    present = np.flatnonzero(np.bincount(np.asarray(ids), minlength=1))
    base = set(tok.base_ids(present).tolist())
    return frozenset(p for i, p in tok.program_of.items() if i in base)


def unknown_instruments_note(programs, known) -> str | None:
    """One line naming the instruments among `programs` the model never learned, and those it knows; None
    when it knows them all (or when what it knows is unknown)."""
    if known is None or programs is None:
        return None
    missing = [p for p in programs if p not in known]
    if not missing:
        return None
    names = [program_name(p) for p in sorted(known)]
    listed = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")
    never = ", ".join(program_name(p) for p in missing)
    if not names:
        return f"the model never learned {never}: its training data has no instrument"
    return f"the model never learned {never} (it may stay silent); it knows {listed}"
