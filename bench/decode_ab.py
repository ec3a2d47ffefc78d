"""A/B of the fp32 decode step: the current model against an older revision of this repository, in one process.

    python bench/decode_ab.py                       # against 71a44f8, the last tree with `DecodeStep`
    python bench/decode_ab.py --old REV --threads 1 2 --batch 1 8

The older tree's `midistral/` is exported with `git archive` into a temporary folder as the package
`midistral_old` and imported beside the current one. Both get the same weights (the reference 24M model, random),
prefill the same 512 tokens (the ring is full, as in a long piece) and then decode one token per step,
in alternating blocks of 10 steps so that drift in the machine's load hits both alike. It prints
ms/step (min and median over the blocks) and the ratio new / old: below 1 means the current step is faster.
With one thread it times CPU time (`time.thread_time`), which other jobs on the machine disturb less;
with more threads wall time.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF = dict(vocab_size=5000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
           num_attention_heads=4, num_key_value_heads=2, sliding_window=512, max_position_embeddings=8192)


def export_old(rev: str, dest: Path) -> None:
    """`rev`'s midistral/ as the package midistral_old in `dest`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "midistral"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    (dest / "midistral").rename(dest / "midistral_old")
    for f in (dest / "midistral_old").rglob("*.py"):
        f.write_text(re.sub(r"\bmidistral\b", "midistral_old", f.read_text()))


def old_step(old_pkg, model_state, batch: int, ids: torch.Tensor):
    """The old tree's one-token step after a 512-token prefill: step(tok (B,), pos)."""
    om = importlib.import_module(old_pkg + ".model")
    og = importlib.import_module(old_pkg + ".generate")
    old = om.Transformer(om.ModelConfig(**REF)).eval()
    old.load_state_dict(model_state)
    cache = og.RollingKVCache.for_model(old, batch)
    old(ids[:, :512], cache=cache, start_pos=0)
    if hasattr(old, "decoder"):  # the trees with DecodeStep
        return old.decoder(cache)
    return lambda tok, pos: old(tok[:, None], cache=cache, start_pos=pos)[:, -1]


def new_step(model, batch: int, ids: torch.Tensor):
    from midistral.model import RollingKVCache, prepare_for_decode

    runner = prepare_for_decode(model, "fp32")
    cache = RollingKVCache.for_model(runner, batch)
    runner(ids[:, :512], cache=cache, start_pos=0)
    return lambda tok, pos: runner(tok[:, None], cache=cache, start_pos=pos)[:, -1]


def ab(steps: dict, threads: int, tok: torch.Tensor, blocks: int) -> dict[str, list[float]]:
    clock = time.thread_time if threads == 1 else time.perf_counter
    pos = {name: 513 for name in steps}
    times = {name: [] for name in steps}
    for b in range(blocks):
        for name in (list(steps) if b % 2 else list(steps)[::-1]):
            t0 = clock()
            for _ in range(10):
                steps[name](tok, pos[name])
                pos[name] += 1
            times[name].append((clock() - t0) / 10 * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="71a44f8", help="git revision to compare with (default: the last DecodeStep tree)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, default=40, help="blocks of 10 steps per side")
    args = ap.parse_args()

    from midistral.model import ModelConfig, Transformer

    with tempfile.TemporaryDirectory() as tmp:
        export_old(args.old, Path(tmp))
        sys.path.insert(0, tmp)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**REF)).eval()
        print(f"old = {args.old}, new = working tree; CPU capability {torch.backends.cpu.get_cpu_capability()}")
        with torch.inference_mode():
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batch:
                    ids = torch.randint(3, REF["vocab_size"], (batch, 513), generator=torch.Generator().manual_seed(batch))
                    steps = {"old": old_step("midistral_old", model.state_dict(), batch, ids),
                             "new": new_step(model, batch, ids)}
                    tok = ids[:, 512]
                    diff = (steps["old"](tok, 512) - steps["new"](tok, 512)).abs().max().item()
                    t = ab(steps, threads, tok, args.blocks)
                    mins = {k: min(v) for k, v in t.items()}
                    meds = {k: statistics.median(v) for k, v in t.items()}
                    print(f"threads {threads} batch {batch}: old {mins['old']:.2f} / {meds['old']:.2f} ms/step, "
                          f"new {mins['new']:.2f} / {meds['new']:.2f} (min / median); new/old min "
                          f"{mins['new'] / mins['old']:.3f}, median {meds['new'] / meds['old']:.3f}; "
                          f"max logit diff {diff:.1e}")


if __name__ == "__main__":
    main()
