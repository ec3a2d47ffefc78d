"""What real music scores against real music: the ceiling of the quality goals' overlapped area (OA).

    python bench/real_ceiling.py --reference RUN [--style S[,S...]] [--pieces 24] [--draws 40] [--bars 16]
                                 [--pool train] [--goal 0.8] [--floor 0.6] [--seed 0]

The quality goals compare a set of N samples with a run's test split (`midistral.evaluate`, nine metrics,
mean OA and lowest metric). Here the "samples" are N real pieces drawn at random from another split of the
same run (`--pool`, the training split by default; never the test split), scored exactly as samples are:
the first `--bars` bars of each (0 = whole pieces) against the same bars of the test pieces. Repeated for
`--draws` independent draws, it prints per style the spread of mean OA and of the lowest metric, and the
share of draws that meet the goal (mean OA >= --goal, no metric below --floor). A model whose samples were
indistinguishable from real pieces of the style would meet the goal on about that share of draws.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midistral.evaluate import SUMMARY_METRICS, PieceSet, compare, measure_set, opening, reference_files  # noqa: E402


def subset(pieces: PieceSet, index: list[int]) -> PieceSet:
    return PieceSet({k: v[index] for k, v in pieces.values.items()}, pieces.pitch_class_hist[index], [])


def measured(files, bars: int) -> PieceSet:
    return measure_set([opening(f, bars) for f in files] if bars else files)


def ceiling(reference, style, pieces, draws, bars, pool_split, goal, floor, rng) -> dict:
    test, _ = reference_files(reference, style, "test")
    pool_files, _ = reference_files(reference, style, pool_split)
    # Only the pieces some draw uses are measured (folk's training split has 10,156).
    draws_idx = [rng.sample(range(len(pool_files)), min(pieces, len(pool_files))) for _ in range(draws)]
    used = sorted({i for d in draws_idx for i in d})
    pool = measured([pool_files[i] for i in used], bars)
    if pool.unreadable:
        raise SystemExit(f"{len(pool.unreadable)} unreadable pool files, first: {pool.unreadable[0]}")
    where = {i: k for k, i in enumerate(used)}
    real = measured(test, bars)
    means, mins, lowest = [], [], {}
    for d in draws_idx:
        result = compare(real, subset(pool, [where[i] for i in d]), distances=False)
        means.append(result["mean_oa"])
        mins.append(result["min_oa"])
        worst = min((r for r in result["rows"] if r["metric"] in SUMMARY_METRICS), key=lambda r: r["oa"])["metric"]
        lowest[worst] = lowest.get(worst, 0) + 1
    means, mins = np.array(means), np.array(mins)
    return {"style": style or "all", "test": len(test), "pool": len(pool_files), "pieces": len(draws_idx[0]),
            "mean": means.mean(), "sd": means.std(ddof=1) if draws > 1 else 0.0, "lo": means.min(),
            "hi": means.max(), "min_mean": mins.mean(), "meets_mean": float((means >= goal).mean()),
            "meets_both": float(((means >= goal) & (mins >= floor)).mean()),
            "lowest": max(lowest, key=lowest.get)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a run folder (its manifest has the splits and styles)")
    ap.add_argument("--style", default=None, help="comma-separated styles (default: the whole test split)")
    ap.add_argument("--pieces", type=int, default=24, help="real pieces per draw, as samples per draw")
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--bars", type=int, default=0, help="score the first N bars of each piece (0 = whole)")
    ap.add_argument("--pool", default="train", choices=("train", "val"))
    ap.add_argument("--goal", type=float, default=0.8)
    ap.add_argument("--floor", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"reference {args.reference}, {args.pieces} real pieces from the {args.pool} split per draw, "
          f"{args.draws} draws, {'first %d bars' % args.bars if args.bars else 'whole pieces'}; "
          f"goal: mean OA >= {args.goal}, no metric below {args.floor}\n")
    print("| style | test pieces | pool | mean OA over draws (sd) | lowest draw - highest | mean of the lowest "
          "metric | draws with mean >= goal | draws meeting both | most often lowest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for style in (args.style.split(",") if args.style else [None]):
        c = ceiling(args.reference, style, args.pieces, args.draws, args.bars, args.pool, args.goal,
                    args.floor, rng)
        print(f"| {c['style']} | {c['test']} | {c['pool']} | {c['mean']:.3f} ({c['sd']:.3f}) | {c['lo']:.2f} - "
              f"{c['hi']:.2f} | {c['min_mean']:.2f} | {c['meets_mean']:.0%} | {c['meets_both']:.0%} | "
              f"{c['lowest']} |", flush=True)


if __name__ == "__main__":
    main()
