"""kill -9 at random moments across data preparation and training, then run again: the same final weights?

    python bench/killtest.py --trials 20 [--dir ../shared/midi/dev] [--seed 0]

One uninterrupted run (configs/tiny.toml, 6 files prepared inside the run folder, 3 epochs of batch 32,
a checkpoint at each epoch end) gives the reference weights and its duration T. Each trial starts the same
run in a fresh folder, sends SIGKILL to its process group at a uniform random moment in [0, T], then runs it
again as a user would: `--resume` when a checkpoint exists, else the same command from the start (repeated
if that second run is killed too, which never happens here). A trial passes when the final last/ weights
equal the reference bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ("data.max_files=6", "train.batch_size=32", "train.epochs=3", "train.max_steps=0", "train.eval_every=0",
            "train.patience=0")


def command(out: Path, data_dir: str, resume: bool) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
            f"out_dir={json.dumps(str(out))}", f"data.dir={json.dumps(data_dir)}", *RUN_ARGS] + (["--resume"] if resume else [])


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run(out: Path, data_dir: str, resume: bool, kill_after: float | None = None) -> tuple[int | None, str]:
    """Run train.py (killed after `kill_after` seconds if given): (exit code or None if killed, stderr)."""
    p = subprocess.Popen(command(out, data_dir, resume), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=kill_after)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the whole group: data-preparation workers too
        p.communicate()
        return None, ""


def phase(out: Path) -> str:
    """Where the kill landed, judged from what the folder holds."""
    if not (out / "data" / "manifest.json").is_file():
        return "preparing data"
    if not (out / "last").is_dir() and not (out / ".last.old").is_dir():
        return "training, before the first checkpoint"
    step = torch.load(next(d for d in (out / "last", out / ".last.old") if d.is_dir()) / "state.pt",
                      weights_only=True)["step"]
    return f"training, last checkpoint at step {step}"


def finish(out: Path, data_dir: str) -> str:
    """Run the killed run to its end as a user would; returns how."""
    resumable = any((d / "state.pt").is_file() for d in (out / "last", out / ".last.old"))
    code, err = run(out, data_dir, resume=resumable)
    if code == 1 and "nothing to train" in err:  # killed after its final checkpoint: already finished
        return "already finished"
    if code != 0:
        raise SystemExit(f"the run after the kill failed ({code}): {err.strip().splitlines()[-1:]}")
    return "resumed" if resumable else "started again"


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=str(ROOT.parent / "shared" / "midi" / "dev"))
    ap.add_argument("--work", default="/tmp/midistral-killtest")
    ap.add_argument("--json", action="store_true", help="print one JSON summary line at the end")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    code, err = run(work / "reference", args.dir, resume=False)
    duration = time.time() - t0
    if code != 0:
        raise SystemExit(f"the reference run failed: {err[-500:]}")
    ref = load_file(str(work / "reference" / "last" / "model.safetensors"))
    print(f"reference: {duration:.1f} s")
    rng = random.Random(args.seed)
    results = []
    for k in range(args.trials):
        out = work / f"trial{k:02d}"
        at = rng.uniform(0, duration)
        code, _ = run(out, args.dir, resume=False, kill_after=at)
        where = phase(out) if code is None else "(finished before the kill)"
        how = finish(out, args.dir) if code is None else "-"
        diff = max_diff(ref, load_file(str(out / "last" / "model.safetensors")))
        results.append({"kill_at": round(at, 2), "phase": where, "then": how, "max_abs_diff": diff})
        print(f"trial {k:2d}: kill at {at:5.1f} s ({where}); {how}; max |w - w_ref| = {diff:.3g}", flush=True)
        shutil.rmtree(out)
    same = sum(r["max_abs_diff"] == 0.0 for r in results)
    print(f"{same}/{len(results)} trials end with the reference weights bit for bit")
    if args.json:
        print(json.dumps({"same": same, "trials": len(results), "results": results}))
    return 0 if same == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
