"""Does the model use the right side? Mean NLL of real middle bars given prefix and suffix vs prefix alone.

    python bench/infill.py --run RUN [--bars 2] [--spans 2] [--context 256] [--split test]

For each piece of the run's split (RUN/data, as prepared for training) and `--spans` spans of `--bars`
whole bars drawn per piece (seeded), with the same prefix (up to context/2 ids of whole bars before the
span) and suffix (up to context/2 after it):

    with suffix:   BOS prefix Infill_Bar x k suffix FillBar_Start middle    (the run's layout: psm; spm has
                   BOS Infill_Bar x k suffix FillBar_Start prefix middle)
    prefix alone:  BOS prefix middle
    wrong suffix:  as with suffix, with suffix' (the previous piece's)
    suffix alone:  BOS Infill_Bar x k suffix FillBar_Start middle           (training's FIM chunks with no prefix)

the mean negative log-likelihood per id of the real middle's ids. Prints both, and how much lower the
first is (goal: at least 10% with a model trained with the fill-in-the-middle mix). The wrong suffix is the
control: a model that reads the right side does worse with another piece's suffix than with its own. The suffix
alone says how much of what the prefix tells the model the suffix tells it too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midistral.checkpoint import load_model_and_tokenizer, resolve_checkpoint  # noqa: E402
from midistral.data.dataset import _read_shard, read_manifest  # noqa: E402
from midistral.controls.infill import context_bars  # noqa: E402
from midistral.tokenize.extra import BarStats  # noqa: E402


def middle_nll(model, ids: np.ndarray, n_middle: int) -> tuple[float, int]:
    """(sum of NLL, count) over the last n_middle ids of `ids`, each predicted from what precedes it."""
    x = torch.tensor(ids[None, :-1])
    with torch.no_grad():
        logits = model(x).float()
    logp = torch.log_softmax(logits[0, -n_middle:], -1)
    target = torch.tensor(ids[-n_middle:])
    return float(-logp.gather(1, target[:, None]).sum()), n_middle


def spans(stats: BarStats, ids: np.ndarray, k: int, n: int, rng) -> list[tuple[int, int]]:
    """Up to n spans [start, end) of k whole bars with at least one bar before and after."""
    starts = stats.bar_starts(ids)
    bounds = np.r_[starts, len(ids)]
    if len(starts) < k + 2:
        return []
    firsts = rng.choice(np.arange(1, len(starts) - k), size=min(n, len(starts) - k - 1), replace=False)
    return [(int(bounds[a]), int(bounds[a + k])) for a in sorted(firsts)]


def run(args) -> None:
    ckpt = resolve_checkpoint(args.run)
    model, tok = load_model_and_tokenizer(ckpt)
    model.eval()
    if tok.extra is None:
        sys.exit("error: this run's tokenizer has no infilling tokens (train with data.infill > 0)")
    data = Path(args.data) if args.data else Path(args.run) / "data"
    tokens, offsets = _read_shard(data, args.split, read_manifest(data))
    stats, e, rng = BarStats(tok), tok.extra, np.random.default_rng(args.seed)
    totals = {k: [0.0, 0] for k in ("with suffix", "prefix alone", "wrong suffix", "suffix alone")}
    other = None  # the previous piece's suffix (the control)
    half = args.context // 2
    n_spans = 0
    for p in range(len(offsets) - 1):
        ids = np.asarray(tokens[offsets[p]:offsets[p + 1]], dtype=np.int64)
        suffix = None
        for a, b in spans(stats, ids, args.bars, args.spans, rng):
            prefix, suffix = context_bars(tok, ids[:a], ids[b:], args.context)
            middle = ids[a:b]
            fim = np.r_[tok.bos_id, e.fim(prefix, args.bars, suffix, middle)]
            left = np.r_[tok.bos_id, prefix, middle]
            right = np.r_[tok.bos_id, e.fim([], args.bars, suffix, middle)]
            wrong = None if other is None else np.r_[tok.bos_id, e.fim(prefix, args.bars, other, middle)]
            if max(len(fim), len(wrong if wrong is not None else fim)) > model.config.max_position_embeddings:
                continue  # a middle longer than the model's positions
            for name, seq in (("with suffix", fim), ("prefix alone", left), ("wrong suffix", wrong),
                              ("suffix alone", right)):
                if seq is None:
                    continue
                s, c = middle_nll(model, seq, len(middle))
                totals[name][0] += s
                totals[name][1] += c
            n_spans += 1
        other = suffix if suffix is not None else other
    if not n_spans:
        sys.exit(f"error: no piece of the {args.split} split has {args.bars + 2} bars or more")
    fim, left, wrong, right = (totals[k][0] / totals[k][1]
                               for k in ("with suffix", "prefix alone", "wrong suffix", "suffix alone"))
    print(f"{ckpt}: {e.fim_layout} layout, {args.split} split, {n_spans} spans of {args.bars} bars, {totals['with suffix'][1]} middle ids, "
          f"context {half} + {half} ids")
    print(f"mean NLL of the middle  with suffix {fim:.4f}   prefix alone {left:.4f}   "
          f"{100 * (1 - fim / left):.1f}% lower with the suffix   (another piece's suffix: {wrong:.4f}; "
          f"the suffix alone: {right:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run folder (or checkpoint) trained with data.infill > 0")
    ap.add_argument("--data", default="", help="its prepared data (default RUN/data)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--bars", type=int, default=2)
    ap.add_argument("--spans", type=int, default=2, help="spans per piece")
    ap.add_argument("--context", type=int, default=256, help="ids of prefix + suffix (half each)")
    ap.add_argument("--seed", type=int, default=0)
    torch.set_num_threads(2)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
