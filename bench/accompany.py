"""Accompaniment quality and speed: rewrite the bass of test-split chorales, add a track to a 32-bar piece.

    python bench/accompany.py --ckpt RUN_OR_CHECKPOINT [--pieces 8] [--png docs/accompaniment.png]

Quality (per piece, then averaged): the share of bars where the other tracks play in which the new track
has notes (goal >= 80%), and the share of onsets on the eighth-note grid for the new track and for the
other tracks (goal: within 10 points). Speed: accompany() on a 32-bar, 4-track piece against generate()
of the same number of sampled tokens from BOS, side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import symusic
import torch

from midistral.checkpoint import load_model_and_tokenizer
from midistral.controls import _Walk, accompany
from midistral.generate import generate
from midistral.tokenize import load_score


def bars_covered(score, new_idx: int) -> float:
    """Share of bars where another track starts a note in which the new track starts one too."""
    downbeats = score.get_downbeats()
    def bars_of(tracks):
        ons = [t.notes.numpy()["time"] for t in tracks]
        ons = np.concatenate(ons) if ons else np.zeros(0, int)
        return set((np.searchsorted(downbeats, ons, side="right") - 1).tolist())
    others = bars_of([t for i, t in enumerate(score.tracks) if i != new_idx])
    new = bars_of([score.tracks[new_idx]])
    return len(others & new) / max(len(others), 1)


def on_grid(tracks, tpq: int) -> float:
    ons = np.concatenate([t.notes.numpy()["time"] for t in tracks])
    return float(np.mean(ons % (tpq // 2) == 0)) if len(ons) else float("nan")


def thirty_two_bars(paths) -> symusic.Score:
    """4-voice chorales laid end to end (each from the bar after the previous one ends) up to 32 bars of 4/4."""
    first, parts, offset = None, [[] for _ in range(4)], 0
    for p in paths:
        s = load_score(p)
        if len(s.tracks) != 4 or [(x.numerator, x.denominator) for x in s.time_signatures] != [(4, 4)]:
            continue
        s = s.resample(480)
        first = first or s
        for voice, t in zip(parts, s.tracks):
            n = t.notes.numpy()
            voice.append({**n, "time": n["time"] + offset})
        offset += (s.end() + 4 * 480 - 1) // (4 * 480) * 4 * 480
        if offset >= 32 * 4 * 480:
            break
    out = first.copy()
    for t, voice in zip(out.tracks, parts):
        cat = {k: np.concatenate([v[k] for v in voice]) for k in ("time", "duration", "pitch", "velocity")}
        t.notes = symusic.Note.from_numpy(cat["time"].astype(np.int32), cat["duration"].astype(np.int32),
                                          cat["pitch"].astype(np.int8), cat["velocity"].astype(np.int8), "tick")
    return out.clip(0, 32 * 4 * 480, clip_end=True)


def piano_roll(score, new_idx: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    for i, t in enumerate(score.tracks):
        n = t.notes.numpy()
        new = i == new_idx
        ax.barh(n["pitch"], n["duration"] / score.tpq, left=n["time"] / score.tpq, height=0.8,
                color="tab:red" if new else "0.6", alpha=0.9 if new else 0.6,
                label=f"{t.name} (new)" if new else None)
    for b in score.get_downbeats():
        ax.axvline(b / score.tpq, color="0.9", lw=0.5, zorder=0)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("pitch")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default=None, help="run folder whose data/manifest.json lists the test split")
    ap.add_argument("--pieces", type=int, default=8)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer(args.ckpt)
    manifest = json.loads((Path(args.data or args.ckpt) / "data" / "manifest.json").read_text())
    test = manifest["counts"]["test"]["files_list"]

    rows = []
    for i, path in enumerate(test[:args.pieces]):
        score = load_score(path)
        out = accompany(model, tok, score, 70, replace=True, seed=i)  # a new bass (bassoon) line
        new_idx = len(out.tracks) - 1
        others = out.tracks[:new_idx]
        rows.append((bars_covered(out, new_idx), on_grid([out.tracks[new_idx]], out.tpq), on_grid(others, out.tpq),
                     len(out.tracks[new_idx].notes)))
        print(f"{Path(path).name}: bars covered {rows[-1][0]:.0%}, new on 8th grid {rows[-1][1]:.0%}, "
              f"others {rows[-1][2]:.0%}, {rows[-1][3]} notes", flush=True)
        if i == 0 and args.png:
            piano_roll(out, new_idx, Path(args.png), f"{Path(path).stem}: a new bass line (red) under the "
                       "other three voices (grey), python bench/accompany.py")
    cov, g_new, g_old, _ = map(np.nanmean, zip(*rows))
    print(f"mean over {len(rows)} chorales: bars covered {cov:.1%}, new track on the 8th grid {g_new:.1%}, "
          f"other tracks {g_old:.1%}")

    piece = thirty_two_bars(test)
    walk = _Walk(model, tok, piece, 42, None, 0.5, 6, 6, 0, 6)
    t0 = time.perf_counter()
    stream = walk.run()
    t_walk = time.perf_counter() - t0
    n = walk.n_sampled
    bos = torch.tensor([[tok.bos_id]])
    t0 = time.perf_counter()
    generate(model, bos, n, min_new_tokens=n, eos_id=tok.eos_id, seed=0)
    t_free = time.perf_counter() - t0
    print(f"32-bar 4-track piece, add a cello: {t_walk:.2f} s for {n} sampled ids ({len(stream)} base tokens in "
          f"the stream); free generation of {n} ids: {t_free:.2f} s; ratio {t_walk / t_free:.2f}")


if __name__ == "__main__":
    main()
