"""`python -m midistral.data stats --config CFG`: histograms of the prepared corpus (as the reference study's corpus figure)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from midistral.data.dataset import read_manifest
from midistral.errors import DataError
from midistral.io import atomic_path


def stats(folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    man = read_manifest(folder)
    try:
        rows = json.loads((folder / "stats.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{folder / 'stats.json'}: missing or corrupt ({e.__class__.__name__}): prepare again") from None
    keys = [("bars", "bars per piece"), ("tempo", "tempo (qpm, median per piece)"),
            ("instruments", "instruments per piece"), ("notes_per_second", "note density (notes/s)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    lines = [f"{folder}: {man['files_found']} files found, {len(rows)} kept, {len(man['skipped'])} skipped; "
             f"vocab {man['vocab_size']}"]
    for s, c in man["counts"].items():
        lines.append(f"  {s:5s}: {c['files']:6d} files {c['pieces']:6d} pieces {c['tokens']:10d} tokens")
    for ax, (k, title) in zip(axes.flat, keys):
        v = np.array([r[k] for r in rows], dtype=float)
        ax.hist(v, bins=min(40, max(5, len(set(v.tolist())))), color="#4c72b0")
        ax.set_title(title)
        if len(v):
            lines.append(f"  {title:32s} median {np.median(v):8.1f}  min {v.min():8.1f}  max {v.max():8.1f}")
    fig.tight_layout()
    out = folder / "stats.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    reasons = {}
    for s in man["skipped"]:
        reasons[s["reason"].split("(")[0].strip()[:60]] = reasons.get(s["reason"].split("(")[0].strip()[:60], 0) + 1
    for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:8]:
        lines.append(f"  skipped {n:5d}: {r}")
    print("\n".join(lines))
    print(f"histograms: {out}")
    return out
