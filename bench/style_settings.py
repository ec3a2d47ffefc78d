"""Sampling settings per style: mean OA of samples from scratch against one split's openings, per (temperature,
top-k), to choose each style's defaults on the validation split and check them on the test split.

    python bench/style_settings.py --reference runs/music21 [--ckpt models/default] [--split val]
                                   [--grid 0.5:6 0.7:12 0.9:24] [--styles bach,folk] [--samples 16] [--seeds 3 4]

For each style: the 16-bar openings of that style's pieces of `--split` are measured once; then for each
setting and seed, `--samples` pieces of 16 bars (sample.py's other defaults: int8 where the CPU pays, no-repeat
n-gram, grammar) are scored against them with midistral.evaluate's nine metrics. Prints one row per style and
setting: mean OA per seed, their mean, and the lowest metric.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from midistral.evaluate import compare, measure_set, opening, reference_files
from midistral.sampler import Sampler


def setting(text: str) -> tuple[float, int]:
    t, k = text.split(":")
    return float(t), int(k)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="default: the shipped model")
    ap.add_argument("--reference", required=True, help="the run folder the model was trained in (its splits)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--grid", nargs="+", default=["0.5:6", "0.7:12", "0.9:24"], help="temperature:top_k ...")
    ap.add_argument("--styles", default="", help="comma-separated (default: all the model's styles)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--bars", type=int, default=16)
    args = ap.parse_args()
    sampler = Sampler.load(args.ckpt)
    styles = args.styles.split(",") if args.styles else sampler.styles
    print(f"{args.ckpt or 'the shipped model'}, {args.split} split of {args.reference}, {args.samples} samples of "
          f"{args.bars} bars per seed, seeds {args.seeds}")
    print("\n| style | temperature / top-k | mean OA per seed | mean | lowest metric (mean over seeds) |")
    print("|---|---|---|---|---|")
    for style in styles:
        ref, _ = reference_files(args.reference, style, args.split)
        real = measure_set([opening(f, args.bars) for f in ref])
        for t, k in map(setting, args.grid):
            start, oas, lows = time.perf_counter(), [], {}
            for seed in args.seeds:
                gen = sampler.sample(None, style=style, bars=args.bars, num_samples=args.samples, seed=seed,
                                     temperature=t, top_k=k)
                result = compare(real, measure_set([s.score for s in gen]))
                oas.append(result["mean_oa"])
                for r in result["rows"]:
                    lows.setdefault(r["metric"], []).append(r["oa"])
            low = min(lows, key=lambda m: np.mean(lows[m]))
            print(f"| {style} | {t} / {k} | {' / '.join(f'{x:.2f}' for x in oas)} | {np.mean(oas):.3f} | "
                  f"{np.mean(lows[low]):.2f} {low} |  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
