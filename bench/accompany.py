"""Accompaniment quality and speed: rewrite the bass of test-split chorales, add a track to a 32-bar piece.

    python bench/accompany.py --ckpt RUN_OR_CHECKPOINT [--pieces 8] [--png docs/accompaniment.png]
    python bench/accompany.py --ckpt RUN --pieces 0 --repeats 5 [--report-size]     # speed only
    python bench/accompany.py --ckpt RUN --pieces 0 --repeats 0 --add 20 --seeds 2 [--png-add samples/add.png]

--add N: a true addition (a voice the piece lacks). The first N four-voice test-split chorales, each in the ensemble the data
preparation gives it (data.ensembles; midistral.data.chorales.ensemble_for, copy 0), without their lowest
voice: Sampler.accompany (sample.py's defaults: temperature 0.7, top-k 12, the default precision) adds a cello
and a bass ("bass": Electric Bass (finger)) with each seed, skipping an instrument the trio already plays;
then the same for examples/prompt.mid (four winds, no cello or bass) and examples/trio.mid.

Quality (per piece, then averaged): the share of bars where the other tracks play in which the new track
has notes (goal >= 80%), and the share of onsets on the eighth-note grid for the new track and for the
other tracks (goal: within 10 points).

Speed, on a 32-bar, 4-track piece (test-split chorales laid end to end): accompany() (adding a cello; and
rewriting the bass, where the model writes a whole part) against generate() from BOS of the same number of
new tokens, with the walk's settings (temperature 0.5, top-k 6, no-repeat-6-gram, the same precision) and
the token grammar (sample.py's default; the walk only offers ids that keep the grammar too), EOS masked so
the count is exact; the result decoded to a Score in both. Runs alternate (walk, free, walk, free, ...)
in one process so load on the machine hits both alike (the order flips every repeat); the ratio is the
median of the per-repeat ratios (wall and CPU time), and the ratio of the best runs. Two
counts of "the same number of new tokens": the ids the walk sampled (one model decision each: a note's
tokens or the choice to go on to the next tick of the piece), and the ids the new track adds to the
piece's encoding (encode(result) - encode(piece)). `--report-size` times the reference 24M model
(bench/generate.py's shape, random weights, this tokenizer's vocabulary) instead of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import symusic
import torch

from midistral.checkpoint import load_model_and_tokenizer
from midistral.controls import accompany
from midistral.controls.accompany import Walk, new_track
from midistral.generate import generate
from midistral.model import ModelConfig, Transformer
from midistral.tokenize import load_score
from midistral.tokenize.grammar import GrammarConstraint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import REF, SETTINGS  # noqa: E402  (bench/generate.py: the reference model and sampling settings)


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
    ap.add_argument("--repeats", type=int, default=5, help="speed: alternating walk/free runs")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--report-size", action="store_true", help="speed of the reference 24M model (random weights)")
    ap.add_argument("--add", type=int, default=0, help="true addition: this many test chorales without their bass")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--png-add", default=None, help="piano roll of the first true addition")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer(args.ckpt)
    manifest = json.loads((Path(args.data or args.ckpt) / "data" / "manifest.json").read_text())
    test = manifest["counts"]["test"]["files_list"]
    if args.add:
        true_addition(args.ckpt, test, args.add, args.seeds, args.png_add)

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
    if rows:
        cov, g_new, g_old, _ = map(np.nanmean, zip(*rows))
        print(f"mean over {len(rows)} chorales: bars covered {cov:.1%}, new track on the 8th grid {g_new:.1%}, "
              f"other tracks {g_old:.1%}")

    if not args.repeats:
        return
    piece = thirty_two_bars(test)
    if args.report_size:
        model = report_size_model(len(tok))
    for label, program, replace in (("add a cello", 42, False), ("rewrite the bass", 70, True)):
        speed(model, tok, piece, program, replace, args.repeats, args.precision, label)


def trio(path) -> symusic.Score | None:
    """A four-voice chorale in the ensemble its data preparation gives it, without its lowest voice."""
    from midistral.data.chorales import ensemble_for

    score = load_score(path)
    programs = ensemble_for(score, Path(path).name, 0, 1.0)
    if programs is None or len(score.tracks) != 4:
        return None
    for t, p in zip(score.tracks, programs):
        t.program = p
    low = min(range(4), key=lambda i: np.mean(score.tracks[i].notes.numpy()["pitch"]))
    score.tracks = [t for i, t in enumerate(score.tracks) if i != low]
    return score


def true_addition(ckpt, test, n_pieces: int, seeds: int, png) -> None:
    """Add a cello and a bass to trios (test chorales without their bass) and to the examples, as a user would
    (Sampler.accompany with sample.py's defaults); per instrument: bars covered, onsets on the 8th grid."""
    from midistral.sampler import Sampler

    sampler = Sampler.load(ckpt)
    root = Path(__file__).resolve().parents[1] / "examples"
    pieces = [(Path(p).name, t) for p in test if (t := trio(p)) is not None][:n_pieces]
    examples = [(p.name, load_score(p)) for p in (root / "prompt.mid", root / "trio.mid") if p.is_file()]
    for group, items in (("test-split trios", pieces), ("examples", examples)):
        for program in (42, 33):
            rows, skipped = [], 0
            for name, score in items:
                if program in {t.program for t in score.tracks}:
                    skipped += 1
                    continue
                for seed in range(seeds):
                    sample = sampler.accompany(score, program, seed=seed)[0]
                    out, k = sample.score, sample.new_track
                    others = [t for i, t in enumerate(out.tracks) if i != k]
                    rows.append((bars_covered(out, k), on_grid([out.tracks[k]], out.tpq), on_grid(others, out.tpq),
                                 len(out.tracks[k].notes)))
                    print(f"  {name} + {out.tracks[k].name} (seed {seed}): bars covered {rows[-1][0]:.0%}, on the 8th "
                          f"grid {rows[-1][1]:.0%} vs others {rows[-1][2]:.0%}, {rows[-1][3]} notes", flush=True)
                    if png and group == "test-split trios" and len(rows) == 1:
                        piano_roll(out, k, Path(png), f"{name} without its bass + a new {out.tracks[k].name} "
                                   "(red), python bench/accompany.py --add")
            if rows:
                cov, g_new, g_old, notes = map(np.nanmean, zip(*rows))
                empty = sum(r[3] == 0 for r in rows)
                print(f"{group} + program {program}: {len(rows)} runs ({skipped} pieces skipped: already playing it), "
                      f"bars covered {cov:.1%} (min {min(r[0] for r in rows):.0%}), new track on the 8th grid "
                      f"{g_new:.1%} vs others {g_old:.1%}, {notes:.0f} notes per run, {empty} empty", flush=True)


def report_size_model(vocab: int) -> Transformer:
    """bench/generate.py's 24M model (random weights, seed 0) with the tokenizer's vocabulary."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**REF, "vocab_size": vocab})
    model = Transformer(cfg).eval()
    print(f"report-size model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {cfg}")
    return model


def speed(model, tok, piece, program, replace, repeats, precision, label) -> None:
    """accompany() vs free generate() of the same number of new tokens, alternating; prints the medians."""
    context = piece.copy()
    if replace:
        context.tracks = [t for t in piece.tracks if t.program != program]
    with torch.inference_mode():  # the counts, from the same walk accompany() runs (same seed)
        walk = Walk(model, tok, context, program, None, 0.5, 6, 6, 0, 6, precision)
        stream = walk.run()
    out = context.copy()
    out.tracks.append(new_track(tok, stream, program, piece.tpq))
    counts = {"sampled ids": walk.n_sampled, "new-track ids": len(tok.encode(out)) - len(tok.encode(context))}
    bos = torch.tensor([[tok.bos_id]])

    def free(n):
        ids = generate(model, bos, n, min_new_tokens=n, eos_id=tok.eos_id, seed=0, precision=precision,
                       constraints=[GrammarConstraint(tok, n)], **SETTINGS)
        return tok.decode(ids[0].numpy())

    def timed(fn):  # (wall, CPU) seconds: the process's CPU time is less sensitive to the other jobs' load
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return np.array([time.perf_counter() - w0, time.process_time() - c0])

    walk_once = lambda: accompany(model, tok, piece, program, replace=replace, seed=0, precision=precision)
    free(8)  # warm up both paths (weights converted once per precision)
    walk_once()
    times = {"walk": [], **{k: [] for k in counts}}
    runs = [("walk", walk_once)] + [(k, lambda n=n: free(n)) for k, n in counts.items()]
    for r in range(repeats):  # the order flips every repeat, so drifting load favours neither side
        for k, fn in (runs if r % 2 == 0 else runs[::-1]):
            times[k].append(timed(fn))
    times = {k: np.array(v) for k, v in times.items()}
    w, c = np.median(times["walk"], 0)
    print(f"32-bar 4-track piece, {label}: {len(out.tracks[-1].notes)} new notes, {len(stream)} base tokens in "
          f"the stream, {walk.feeder.calls} model calls; accompany() median {w:.2f} s wall, {c:.2f} s CPU over "
          f"{repeats} runs ({precision})")
    for k, n in counts.items():
        ratios = times["walk"] / times[k]
        print(f"  free generation of the same {n} {k}: median {np.median(times[k][:, 0]):.2f} s; ratio per run "
              f"{', '.join(f'{r:.2f}' for r in ratios[:, 0])}; median ratio {np.median(ratios[:, 0]):.2f} wall, "
              f"{np.median(ratios[:, 1]):.2f} CPU; best walk / best free {times['walk'][:, 0].min() / times[k][:, 0].min():.2f}",
              flush=True)

if __name__ == "__main__":
    main()
