"""Training curves as a PNG (the piano rolls are in music.py, the evaluation's distributions in evaluate.py)."""

from __future__ import annotations

import io


def loss_curves_png(rows: list[dict], title: str) -> bytes:
    """Training and validation loss, and the learning rate, per step, from metrics.jsonl rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train", lw=0.8)
    a.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
    a.set_xlabel("step"), a.set_ylabel("cross-entropy"), a.legend()
    a.set_title(title.replace("$", r"\$"))  # a folder name is text, not matplotlib math
    b.plot([r["step"] for r in tr], [r["lr"] for r in tr])
    b.set_xlabel("step"), b.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
