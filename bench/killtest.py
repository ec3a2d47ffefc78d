"""kill -9 at random moments across data preparation and training, or Ctrl-C at random steps, then run
again: the same final weights?

    python bench/killtest.py --trials 20 [--dir tests/data/dev] [--seed 0]
    python bench/killtest.py --signal INT --trials 10

One uninterrupted run (configs/tiny.toml, 6 files prepared inside the run folder, 3 epochs of batch 32,
a checkpoint at each epoch end) gives the reference weights, its duration T and its number of steps S.
Each trial starts the same run in a fresh folder and stops it:
- KILL (default): SIGKILL to its process group at a uniform random moment in [0, T];
- INT / TERM: that signal to its process group (as Ctrl-C in a terminal sends SIGINT) once it has logged a
  uniform random step in [1, S - 5]; the run must save its state, exit with one line and no traceback.
Then it runs it again as a user would: `--resume` when a checkpoint exists, else `--overwrite` (a best/
without last/ is refused otherwise). A trial passes when the final last/ weights equal the reference bit for
bit (and, for a signal, the run stopped with one line naming --resume and no traceback).
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
import threading
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


def run_until_step(out: Path, data_dir: str, sig: signal.Signals, step: int) -> tuple[int, str]:
    """Run train.py and send `sig` to its process group once metrics.jsonl logs `step`: (exit code, stderr)."""
    p = subprocess.Popen(command(out, data_dir, False), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)  # a full pipe would block it
    reader.start()
    metrics = out / "metrics.jsonl"
    while p.poll() is None:
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(line.startswith(f'{{"step": {step},') for line in rows):
            os.killpg(p.pid, sig)
            break
        time.sleep(0.005)
    p.wait()
    reader.join()
    return p.returncode, err[0]


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
    p = subprocess.run(command(out, data_dir, resumable) + ([] if resumable else ["--overwrite"]), cwd=ROOT, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    code, err = p.returncode, p.stderr
    if code == 1 and "nothing to train" in err:  # killed after its final checkpoint: already finished
        return "already finished"
    if code != 0:
        raise SystemExit(f"the run after the kill failed ({code}): {err.strip().splitlines()[-1:]}")
    return "resumed" if resumable else "started again"


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def signal_trial(out: Path, data_dir: str, sig: signal.Signals, step: int) -> dict:
    """Send `sig` once `step` is logged, then --resume: what happened, as a result row."""
    code, err = run_until_step(out, data_dir, sig, step)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]
    said = lines[-1] if lines else ""
    clean = code == 128 + sig and "Traceback" not in err and said.startswith(f"{sig.name} at step ") \
        and said.endswith("--resume")
    stopped = int(said.split(" at step ")[1].split(":")[0]) if said.startswith(f"{sig.name} at step ") else None
    how = finish(out, data_dir) if code != 0 else "-"
    return {"signal_at": step, "stopped_at": stopped, "exit": code, "one_line_no_traceback": clean, "then": how,
            "tracebacks": err.count("Traceback"), "said": said[:200]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--signal", choices=("KILL", "INT", "TERM"), default="KILL",
                    help="KILL at a random moment (default), or INT / TERM at a random step")
    ap.add_argument("--dir", default=str(ROOT / "tests" / "data" / "dev"))
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
    steps = max(json.loads(line)["step"] for line in (work / "reference" / "metrics.jsonl").read_text().splitlines())
    print(f"reference: {duration:.1f} s, {steps} steps")
    rng = random.Random(args.seed)
    results = []
    for k in range(args.trials):
        out = work / f"trial{k:02d}"
        if args.signal == "KILL":
            at = rng.uniform(0, duration)
            code, _ = run(out, args.dir, resume=False, kill_after=at)
            where = phase(out) if code is None else "(finished before the kill)"
            how = finish(out, args.dir) if code is None else "-"
            row = {"kill_at": round(at, 2), "phase": where, "then": how}
            said = f"kill at {at:5.1f} s ({where}); {how}"
        else:
            row = signal_trial(out, args.dir, signal.Signals[f"SIG{args.signal}"], rng.randint(1, steps - 5))
            said = (f"SIG{args.signal} at step {row['signal_at']:3d}: stopped at {row['stopped_at']}, exit "
                    f"{row['exit']}, one line {row['one_line_no_traceback']}, {row['tracebacks']} tracebacks; "
                    f"{row['then']}")
        row["max_abs_diff"] = max_diff(ref, load_file(str(out / "last" / "model.safetensors")))
        results.append(row)
        print(f"trial {k:2d}: {said}; max |w - w_ref| = {row['max_abs_diff']:.3g}", flush=True)
        shutil.rmtree(out)
    same = sum(r["max_abs_diff"] == 0.0 for r in results)
    clean = sum(r.get("one_line_no_traceback", True) for r in results)
    print(f"{same}/{len(results)} trials end with the reference weights bit for bit"
          + ("" if args.signal == "KILL" else f"; {clean}/{len(results)} stopped with one line and no traceback"))
    if args.json:
        print(json.dumps({"same": same, "clean": clean, "trials": len(results), "results": results}))
    return 0 if same == clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
