"""bf16 autocast against fp32 training, through train.py: the same run twice, loss curves side by side.

    python bench/precision_curve.py --config configs/music21.toml --steps 200 [--window 20] [key=value ...]

Each run is `python train.py --config CONFIG out_dir=TMP train.max_steps=STEPS train.precision=P` in a fresh
process (same seed, so the same weights at step 0 and the same batches), with the extra `key=value` settings
(e.g. `data.prepared_dir="runs/music21/data"` to reuse prepared data). Prints the mean training loss per window
of steps for both, the relative gap, the largest gap, and the wall time per step. train.precision=auto
chooses bf16 on a CPU with AVX512-BF16 or AMX because this curve stayed within 1% (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, steps: int, precision: str, extra: list[str], out: Path) -> tuple[dict[int, float], float]:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", config, f"out_dir={json.dumps(str(out))}",
           f"train.max_steps={steps}", f"train.precision={precision}", "train.eval_every=0",
           "train.sample_after=false", "train.checkpoint_minutes=0", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, wall / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("settings", nargs="*", help="more key=value settings for both runs")
    args = ap.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    curves, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in ("fp32", "bf16"):
            curves[p], walls[p] = run(args.config, args.steps, p, args.settings, Path(tmp) / p)
            print(f"{p}: {walls[p]:.2f} s/step wall (whole run, data loading included)", flush=True)
    print(f"\n| steps | fp32 loss | bf16 loss | gap |\n|---|---|---|---|")
    worst = 0.0
    for a in range(1, args.steps + 1, args.window):
        win = range(a, min(a + args.window, args.steps + 1))
        f, b = (sum(curves[p][s] for s in win) / len(win) for p in ("fp32", "bf16"))
        worst = max(worst, abs(b - f) / f)
        print(f"| {a}-{win[-1]} | {f:.4f} | {b:.4f} | {100 * (b - f) / f:+.2f}% |")
    print(f"\nlargest gap {100 * worst:.2f}% (goal: within 1%); bf16 {walls['fp32'] / walls['bf16']:.2f}x fp32's speed")


if __name__ == "__main__":
    main()
