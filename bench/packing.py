"""Packed batches (train.pack) against padded ones, through train.py's own step, on a prepared corpus.

    python bench/packing.py --config configs/chorales.toml
    python bench/packing.py --config configs/music21.toml 'data.prepared_dir="runs/music21/data"' --steps 12

For each way of batching, the same optimiser steps (the same chunks, drawn in train.py's order) from the same
weights, interleaved in rounds so that load drifts hit every variant alike:
    padded      train.pack=off, the config's train.group_by_length
    packed      train.pack=on (rows of data.max_seq - 1 tokens, each chunk attending only to itself)
    padded/grouped and packed/grouped are added when the config groups by length.
Prints seconds per step, real tokens (inputs that are not padding) per second and its ratio to padded random
batches (grouped batches hold more tokens in some steps than in others, so only tokens/s compares them), the
rows x length actually computed, the share of real tokens, and the first step's
loss (packed and padded must agree: the same chunks, the same loss). Each variant runs a warm-up step first.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    import midistral.train as mt
    from midistral.config import load_config

    cfg = load_config(args.config, ["out_dir=\"/tmp/midistral-bench-packing\""] + args.overrides)
    job = mt.setup(cfg, argparse.Namespace(resume=False, overwrite=True))
    start = {k: v.clone() for k, v in job.raw_model.state_dict().items()}
    opt_start = job.opt.state_dict()
    groups = sorted({0, cfg.train.group_by_length})
    variants = [(p, g) for g in groups for p in ("padded", "packed")]
    row_len = cfg.data.max_seq - 1
    times = {v: [] for v in variants}
    shapes, first_loss = {}, {}
    job.model.train()

    def run(variant, steps):
        pack, group = variant
        job.pack_len = row_len if pack == "packed" else 0
        job.cfg = dataclasses.replace(job.cfg, train=dataclasses.replace(job.cfg.train, group_by_length=group))
        job.raw_model.load_state_dict(start)
        job.opt.load_state_dict(opt_start)
        job.train_set.draws[:] = 0  # each chunk's fill-in-the-middle draw as in a fresh run
        for s in steps:
            loss, _ = mt.train_step(job, s)
            first_loss.setdefault(variant, loss)

    for v in variants:
        pack, group = v
        run(v, [0])  # warm-up, and the first step's loss from the same weights
        job.pack_len = row_len if pack == "packed" else 0
        job.cfg = dataclasses.replace(job.cfg, train=dataclasses.replace(job.cfg.train, group_by_length=group))
        job.train_set.draws[:] = 0
        real = total = 0
        rows = []
        for s in range(1, 1 + args.steps):
            x, y, _ = mt.batch_at(job, s, 0)
            real += int((y != -100).sum()) + int(((y == -100) & (x != job.tok.pad_id)).sum())
            total += x.numel()
            rows.append(tuple(x.shape))
        shapes[v] = (rows, real / total, real / args.steps)
    for _ in range(args.rounds):
        for v in variants:
            t = time.perf_counter()
            run(v, range(1, 1 + args.steps))
            times[v].append((time.perf_counter() - t) / args.steps)

    cap = torch.backends.cpu.get_cpu_capability()
    print(f"{args.config} {' '.join(args.overrides)}: {job.raw_model.num_params():,} parameters, batch "
          f"{cfg.train.batch_size}, data.max_seq {cfg.data.max_seq}, {args.steps} steps x {args.rounds} rounds, "
          f"precision {cfg.train.precision}, CPU capability {cap}, {torch.get_num_threads()} threads")
    def per_token(v):  # seconds per real token: grouped batches hold fewer tokens in some steps than others
        return statistics.median(times[v]) / shapes[v][2]

    base = per_token(("padded", 0))
    for v in variants:
        rows, real, per_step = shapes[v]
        med = statistics.median(times[v])
        mean_rows = sum(r for r, _ in rows) / len(rows)
        mean_len = sum(n for _, n in rows) / len(rows)
        print(f"  {v[0]:7s} group_by_length {v[1]:3d}: {med:.3f} s/step (rounds {', '.join(f'{t:.3f}' for t in times[v])}), "
              f"{per_step / med:,.0f} real tokens/s, x{base / per_token(v):.2f} vs padded random; {mean_rows:.1f} rows x "
              f"{mean_len:.0f}, real tokens {100 * real:.1f}%; "
              f"first loss {first_loss[v]:.6f}")


if __name__ == "__main__":
    main()
