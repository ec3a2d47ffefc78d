"""Infilling on real music: notes kept outside the span, and the span's quality against continuation's.

    python bench/infill_quality.py keep [--dir FOLDER] [--bars 3-4] [--ckpt CKPT]
    python bench/infill_quality.py oa --reference RUN [--pieces 24] [--seed 3] [--ckpt CKPT]

keep  every MIDI file of FOLDER (default ../shared/midi/dev, else tests/data/dev), cut to its first 12 bars,
      gets `--infill 3-4` (Sampler.infill, the shipped model unless --ckpt): the share of its notes outside
      the span kept exactly (onset and end in seconds, pitch, velocity, instrument), the new notes that start
      outside the span, and whether it wrote notes inside. A file that cannot be read is one line, skipped.
oa    test pieces of RUN with 12 bars or more (their first 12): bars 5-8 regenerated two ways, by infilling
      (prefix and suffix given) and by continuing the first 4 bars for 4 bars; the spans of each, cut out,
      scored against the real bars 5-8 (midistral.evaluate: mean OA over its metrics). Goal: infilling's
      mean OA within 0.05 of continuation's (or above it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import symusic
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midistral.controls import infill_prompt  # noqa: E402
from midistral.errors import MidistralError  # noqa: E402
from midistral.evaluate import compare, measure_set, reference_files  # noqa: E402
from midistral.music import downbeats, first_bars, track_program  # noqa: E402
from midistral.sampler import Sampler  # noqa: E402
from midistral.tokenize import load_score  # noqa: E402


def notes_in_seconds(score) -> set[tuple]:
    """(program, pitch, velocity, onset s, end s) of every note, rounded to 0.1 ms."""
    sec = score.to("second")
    return {(track_program(t), int(n.pitch), int(n.velocity), round(n.time, 4), round(n.time + n.duration, 4))
            for t in sec.tracks for n in t.notes}


def span_seconds(sampler: Sampler, score, first: int, last: int) -> tuple[float, float]:
    """Bars first..last as the infilling reads them (the tokenizer's bars: a meter it cannot write, such as
    8/4, is read as the nearest it can), [start, end) in seconds through symusic's tempo map."""
    ticks = np.array(infill_prompt(sampler.tok, score, first, last)[2], np.int32)
    probe = score.copy()
    probe.tracks = [symusic.Track("probe", 0, False)]
    probe.tracks[0].notes = symusic.Note.from_numpy(ticks, np.ones(2, np.int32), np.full(2, 60, np.int8),
                                                    np.full(2, 64, np.int8), "tick")
    a, b = (round(n.time, 4) for n in probe.to("second").tracks[0].notes)
    return a, b


def keep_part(sampler: Sampler, folder: Path, first: int, last: int, seed: int) -> None:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    print(f"keep: {len(files)} files of {folder}, bars {first}-{last} regenerated (first 12 bars of each)\n")
    print("| file | notes outside span | kept exactly | new notes | new notes outside span |")
    print("|---|---|---|---|---|")
    full, wrote, done = 0, 0, 0
    for path in files:
        try:
            score = first_bars(load_score(path), 12)
            if len(downbeats(score)) < last + 1 or score.note_num() == 0:
                print(f"| {path.name} | skipped: fewer than {last + 1} bars or no notes | | | |")
                continue
            (s,) = sampler.infill(score, (first, last), seed=seed)
        except MidistralError as e:
            print(f"| {path.name} | skipped: {str(e).splitlines()[0][:90]} | | | |")
            continue
        a, b = span_seconds(sampler, score, first, last)
        before, after = notes_in_seconds(score), notes_in_seconds(s.score)
        outside = {n for n in before if not a <= n[3] < b}
        kept = len(outside & after)
        new = after - before
        new_out = sum(1 for n in new if not a <= n[3] < b)
        done += 1
        full += kept == len(outside)
        wrote += len(new) > 0
        print(f"| {path.name[:60]} | {len(outside)} | {kept / max(len(outside), 1):.1%} | {len(new)} | {new_out} |")
    print(f"\n{done} files infilled: all notes outside the span kept in {full}, notes written inside in {wrote}")


def span_of(score, first: int, last: int):
    lines = downbeats(score)
    ends = np.r_[lines, score.end() + 1]
    return score.clip(int(ends[first - 1]), int(ends[last]))


def oa_part(sampler: Sampler, reference: str, pieces: int, seed: int) -> None:
    files, label = reference_files(reference)
    rng = np.random.default_rng(seed)
    chosen, real, filled, continued = [], [], [], []
    for i in rng.permutation(len(files)):
        try:
            score = load_score(files[i])
        except MidistralError:
            continue
        if len(downbeats(score)) < 12:
            continue
        chosen.append(first_bars(score, 12))
        if len(chosen) == pieces:
            break
    print(f"oa: {len(chosen)} test pieces of {label} with 12+ bars; bars 5-8 regenerated, seed {seed}")
    for k, score in enumerate(chosen):
        real.append(span_of(score, 5, 8))
        (f,) = sampler.infill(score, (5, 8), seed=seed + k)
        filled.append(span_of(f.score, 5, 8))
        (c,) = sampler.sample(first_bars(score, 4), bars=4, seed=seed + k)
        continued.append(span_of(c.score, 5, 8))
    ref = measure_set(real)
    rows = {}
    for name, gen in (("infilled", filled), ("continued", continued)):
        result = compare(ref, measure_set(gen))
        low = min(result["rows"], key=lambda r: r["oa"])
        rows[name] = result["mean_oa"]
        print(f"{name:10s} mean OA {result['mean_oa']:.3f}  lowest {low['oa']:.2f} ({low['metric']})")
    print(f"infilled - continued: {rows['infilled'] - rows['continued']:+.3f} (goal: >= -0.05)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["keep", "oa"])
    ap.add_argument("--ckpt", default=None, help="default: the shipped model")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--bars", default="3-4")
    ap.add_argument("--reference", default=None, help="oa: the run folder whose test split is scored against")
    ap.add_argument("--pieces", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    sampler = Sampler.load(args.ckpt)
    print(f"model {sampler.ckpt}, precision {sampler.precision}")
    if args.part == "keep":
        shared = ROOT.parent / "shared" / "midi" / "dev"
        folder = Path(args.dir) if args.dir else shared if shared.is_dir() else ROOT / "tests" / "data" / "dev"
        first, last = (int(x) for x in args.bars.split("-"))
        keep_part(sampler, folder, first, last, args.seed)
    else:
        if not args.reference:
            sys.exit("error: oa needs --reference RUN (a run folder with its test split)")
        oa_part(sampler, args.reference, args.pieces, args.seed)


if __name__ == "__main__":
    main()
