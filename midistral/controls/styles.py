"""The styles' default controls: what `Sampler.sample(style=...)` uses where the call leaves a control open.

A model folder's manifest.json may hold, per style, `"style_defaults": {"bach": {"polyphony": 4, "gapless":
true}, ...}` (the shipped model's were chosen on the validation split: its MODEL_CARD.md). `gapless` applies
to every call in that style; `density` and `polyphony` only to a piece from nothing (a prompt sets its own
texture) and only when the call asks for neither. Any control the call gives wins; `style_defaults=False`
(`--no-style-defaults`) leaves them all out.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_style_defaults(folder, styles) -> dict[str, dict]:
    """Per style of `styles`, its default controls from FOLDER/manifest.json; {} where there are none."""
    try:
        man = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}
    found = man.get("style_defaults") if isinstance(man, dict) else None
    if not isinstance(found, dict):
        return {}
    return {s: dict(v) for s, v in found.items() if s in styles and isinstance(v, dict)}


def with_style_defaults(preset: dict, from_scratch: bool, density, polyphony, gapless):
    """(density, polyphony, gapless, applied): the call's controls with `preset` filling what it left as None,
    and what was filled in as flags ("--polyphony 4 --gapless"; "" for nothing)."""
    applied = {}
    if from_scratch and density is None and polyphony is None:
        density, polyphony = preset.get("density"), preset.get("polyphony")
        applied.update({k: v for k, v in (("density", density), ("polyphony", polyphony)) if v is not None})
    if gapless is None and preset.get("gapless"):
        gapless = applied["gapless"] = True
    flags = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in applied.items())
    return density, polyphony, bool(gapless), flags
