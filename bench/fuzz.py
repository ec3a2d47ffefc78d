"""Fuzz the MIDI path with byte-mutated real files: read -> limits -> encode -> decode -> write.

    python bench/fuzz.py --n 10000 --timeout 5 [--dir PATH (a folder of MIDI files; default: tests/data/dev)] [--workers 2] [--bpe]

Each case is a real file with one to three seeded mutations (tests/fuzzing.py). Cases run in worker
processes. A case whose CPU time exceeds --timeout seconds is too slow; one that gives no answer within
--hang seconds of wall time is a hang (its worker is killed and replaced; the wall bound is looser because
on a shared machine a case waits for the CPU); a worker that dies is a crash (segfault, abort, out of memory).
The goal: 0 exceptions other than the project's one-line MidistralError, 0 slow cases, 0 hangs, 0 crashes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def worker(conn, files: list[str], bpe_files: list[str]) -> None:
    from fuzzing import mutate
    from midistral.errors import MidistralError
    from midistral.limits import check_midi_size, check_score
    from midistral.tokenize import REMI, load_score

    tok = REMI()
    if bpe_files:
        tok.train_bpe(bpe_files, 700, workers=1)
    sources = [Path(f).read_bytes() for f in files]
    conn.send("ready")
    while True:
        case = conn.recv()
        if case is None:
            return
        i, seed = case
        data = mutate(sources[i % len(sources)], seed * 1_000_003 + i)
        t0 = time.process_time()
        try:
            check_midi_size(len(data), "<case>")
            score = load_score(data, f"<case {i}>")
            check_score(score, f"<case {i}>")
            ids = tok.encode(score)
            tok.decode(ids).dumps_midi()
            status, detail = "ok", ""
        except MidistralError as e:
            status, detail = ("refused", "") if "\n" not in str(e) else ("multiline", str(e)[:300])
        except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
            status, detail = "exception", f"{e.__class__.__name__}: {str(e)[:300]}"
        conn.send((i, status, detail, time.process_time() - t0))


class Pool:
    """Worker processes, each running one case at a time, replaced when one hangs or dies."""

    def __init__(self, n: int, files: list[str], bpe_files: list[str]):
        self.ctx = mp.get_context("spawn")
        self.args = (files, bpe_files)
        self.slots = [self._start() for _ in range(n)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=worker, args=(child, *self.args), daemon=True)
        p.start()
        child.close()
        assert parent.recv() == "ready"  # the case clock starts once the worker has imported and set up
        return {"proc": p, "conn": parent, "case": None, "since": 0.0}

    def replace(self, k: int) -> None:
        self.slots[k]["proc"].kill()
        self.slots[k]["proc"].join()
        self.slots[k] = self._start()


def run(n: int, seed: int, timeout: float, hang: float, files: list[str], bpe_files: list[str], workers: int) -> dict:
    pool = Pool(workers, files, bpe_files)
    todo = list(range(n))[::-1]
    counts = {"ok": 0, "refused": 0, "exception": 0, "multiline": 0, "slow": 0, "hang": 0, "crash": 0}
    examples: list[str] = []
    slowest = (0.0, -1)
    while todo or any(s["case"] is not None for s in pool.slots):
        for s in pool.slots:
            if s["case"] is None and todo:
                s["case"], s["since"] = todo.pop(), time.time()
                s["conn"].send((s["case"], seed))
        ready = wait([s["conn"] for s in pool.slots if s["case"] is not None], timeout=0.2)
        now = time.time()
        for k, s in enumerate(pool.slots):
            if s["case"] is None:
                continue
            if s["conn"] in ready:
                try:
                    i, status, detail, secs = s["conn"].recv()
                except EOFError:  # the worker died during the case
                    counts["crash"] += 1
                    examples.append(f"case {s['case']}: crash (exit code {s['proc'].exitcode})")
                    pool.replace(k)
                    continue
                counts[status] += 1
                slowest = max(slowest, (secs, i))
                if secs > timeout:
                    counts["slow"] += 1
                    examples.append(f"case {i}: {secs:.1f} s of CPU")
                if detail:
                    examples.append(f"case {i}: {status}: {detail}")
                s["case"] = None
            elif now - s["since"] > hang:
                counts["hang"] += 1
                examples.append(f"case {s['case']}: no answer in {hang} s")
                pool.replace(k)
    for s in pool.slots:
        s["conn"].send(None)
    return {"counts": counts, "slowest": slowest, "examples": examples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="CPU seconds a case may take")
    ap.add_argument("--hang", type=float, default=60.0, help="wall seconds without an answer that make a hang")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=str(ROOT / "tests" / "data" / "dev"))
    ap.add_argument("--bpe", action="store_true", help="encode with a small BPE (700) learned on 8 of the files")
    args = ap.parse_args()
    files = sorted(str(p) for p in Path(args.dir).glob("*.mid*"))
    if not files:
        sys.exit(f"error: no MIDI files in {args.dir}")
    bpe_files = files[:8] if args.bpe else []
    t0 = time.time()
    res = run(args.n, args.seed, args.timeout, args.hang, files, bpe_files, args.workers)
    c = res["counts"]
    print(f"{args.n} mutated files from {len(files)} real ones in {args.dir} (seed {args.seed}, "
          f"{'BPE 700' if args.bpe else 'base tokens'}), {time.time() - t0:.0f} s, {args.workers} workers")
    print(f"  encoded+decoded {c['ok']}, refused with a one-line error {c['refused']}, other exceptions "
          f"{c['exception']}, multi-line errors {c['multiline']}, over {args.timeout} s of CPU {c['slow']}, "
          f"hangs (no answer in {args.hang} s) {c['hang']}, crashes {c['crash']}")
    print(f"  slowest case: {res['slowest'][0]:.2f} s of CPU (case {res['slowest'][1]})")
    for line in res["examples"][:20]:
        print("  " + line)
    return 0 if c["exception"] + c["multiline"] + c["slow"] + c["hang"] + c["crash"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
