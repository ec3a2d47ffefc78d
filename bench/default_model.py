"""The shipped model's goals, measured: per-style quality, instruments on request, density steering, speed.

    python bench/default_model.py [--ckpt models/default] --reference runs/music21 [--samples 16] [--seed 3]
                                  [--only style,programs,density,speed] [--no-style-defaults]

style     per style: `--samples` pieces of 16 bars from scratch (sample.py's defaults), scored with
          midistral.evaluate against the 16-bar openings of that style's test pieces (mean OA, lowest metric,
          copying: share of bars found in the training split, longest copied run), with the styles' default
          controls of the model folder (`--no-style-defaults`: without).
programs  `--programs piano,bass --bars 8`, 8 samples: the share of bars in which both instruments sound.
density   `--density low|medium|high --bars 8`, 8 samples each: mean notes per bar; and a numeric sweep
          (2, 4, 6, ..., 16) with the Spearman correlation of requested and achieved.
speed     a fresh process: load the model and write 16 bars (`sample.py --bars 16`), wall time.
Prints one table per part; the machine's CPU capability first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from midistral.evaluate import SUMMARY_METRICS, compare, compare_copying, copy_index_for, measure_set, opening, reference_files
from midistral.music import downbeats, track_program
from midistral.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]


def bar_onsets(score, start_tick: int, programs=None) -> np.ndarray:
    """(instruments, bars) onset counts of the new music, in the score's own bars (its meters) from the first
    bar line at or after `start_tick`."""
    lines = downbeats(score)
    lines = lines[lines >= start_tick] if len(lines) else lines
    n = max(1, len(lines))
    tracks = [t for t in score.tracks if programs is None or track_program(t) in programs]
    out = np.zeros((len(programs) if programs else len(tracks), n), int)
    for t in tracks:
        row = programs.index(track_program(t)) if programs else tracks.index(t)
        starts = t.notes.numpy()["time"]
        k = np.searchsorted(lines, starts[starts >= start_tick], side="right") - 1
        np.add.at(out[row], k[(k >= 0) & (k < n)], 1)
    return out


def styles_part(sampler, reference, samples, seed, out, style_defaults=True):
    print(f"\nstyle defaults {'on: ' + str(sampler.style_defaults) if style_defaults else 'off'}")
    print("\n| style | real pieces | mean OA | lowest metric | copied bars | longest copied run |")
    print("|---|---|---|---|---|---|")
    index = copy_index_for(reference)
    for style in sampler.styles:
        t = time.perf_counter()
        gen = sampler.sample(None, style=style, bars=16, num_samples=samples, seed=seed, style_defaults=style_defaults)
        folder = out / style
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i, s in enumerate(gen):
            files.append(folder / f"{style}_{i}.mid")
            files[-1].write_bytes(s.midi_bytes())
        ref, _ = reference_files(reference, style)
        result = compare(measure_set([opening(f, 16) for f in ref]), measure_set(files), distances=False)
        low = min((r for r in result["rows"] if r["metric"] in SUMMARY_METRICS), key=lambda r: r["oa"])
        copying = compare_copying(index, files, ref) if index is not None else None
        g, r = (copying["generated"], copying["real"]) if copying else ({}, {})
        nan = float("nan")
        print(f"| {style} | {len(ref)} | {result['mean_oa']:.2f} | {low['oa']:.2f} ({low['metric']}) | "
              f"{g.get('copied_bars', nan):.3f} (real {r.get('copied_bars', nan):.3f}) | "
              f"{g.get('max_run', nan):.0f} (real {r.get('max_run', nan):.0f}) |  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)


def programs_part(sampler, seed):
    programs = sampler.parse_programs("piano,bass")
    gen = sampler.sample(None, programs=programs, bars=8, num_samples=8, seed=seed)
    shares = []
    for s in gen:
        on = bar_onsets(s.score, s.start_tick, programs)[:, :8]
        shares.append(float((on > 0).all(axis=0).mean()))
    print(f"\n--programs piano,bass --bars 8, 8 samples: both sound in {np.mean(shares):.0%} of bars "
          f"(per sample: {', '.join(f'{x:.0%}' for x in shares)})")


def density_part(sampler, seed):
    print("\n| density | mean notes per bar (8 samples x 8 bars) |")
    print("|---|---|")
    for level in ("low", "medium", "high"):
        gen = sampler.sample(None, density=level, bars=8, num_samples=8, seed=seed)
        per_bar = [bar_onsets(s.score, s.start_tick).sum(axis=0)[:8].mean() for s in gen]
        print(f"| {level} | {np.mean(per_bar):.1f} |", flush=True)
    asked, got = [], []
    for d in range(2, 17, 2):
        gen = sampler.sample(None, density=d, bars=8, num_samples=4, seed=seed)
        for s in gen:
            asked.append(d)
            got.append(bar_onsets(s.score, s.start_tick).sum(axis=0)[:8].mean())
    rank = lambda x: np.argsort(np.argsort(x)).astype(float)  # noqa: E731
    rho = np.corrcoef(rank(np.array(asked) + 1e-9 * np.arange(len(asked))), rank(np.array(got)))[0, 1]
    print(f"numeric sweep 2..16 (4 samples each): Spearman {rho:.3f}; achieved means "
          + ", ".join(f"{d}: {np.mean([g for a, g in zip(asked, got) if a == d]):.1f}" for d in range(2, 17, 2)))


def speed_part(ckpt, out):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--style", "folk", "--bars", "16", "--seed", "0",
           "--out", str(out / "speed")] + (["--ckpt", ckpt] if ckpt else [])
    for k in range(2):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        print(f"load + 16 bars, fresh process, run {k + 1}: {time.perf_counter() - t:.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None, help="default: the shipped model")
    ap.add_argument("--reference", required=True, help="the run folder the model was trained in (its test split)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--only", default="style,programs,density,speed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-style-defaults", dest="style_defaults", action="store_false",
                    help="sample the styles without their default controls (the model folder's manifest)")
    args = ap.parse_args()
    parts = args.only.split(",")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    out = Path(args.out or tempfile.mkdtemp(prefix="default-model-"))
    sampler = Sampler.load(args.ckpt)
    print(f"model {sampler.ckpt}, precision {sampler.precision}, samples in {out}")
    if "style" in parts:
        styles_part(sampler, args.reference, args.samples, args.seed, out, args.style_defaults)
    if "programs" in parts:
        programs_part(sampler, args.seed)
    if "density" in parts:
        density_part(sampler, args.seed)
    if "speed" in parts:
        speed_part(args.ckpt, out)


if __name__ == "__main__":
    main()
