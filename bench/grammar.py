"""Grammar-constrained sampling: skipped tokens and MidiTok `tokens_errors` over many samples, and the cost.

    python bench/grammar.py --ckpt RUN          # 100 samples with and without the grammar, then speed
    python bench/grammar.py                     # trains a tiny BPE run in a temporary folder first

Samples: from BOS, the reference settings (temperature 0.5, top-k 6, no-repeat-6-gram), up to
--max-new-tokens each, cut at EOS. For each sample: tokens the decoder skips (`decode_with_report`) and
MidiTok's `tokens_errors` (a test-only oracle: a MidiTok REMI with the same config, fed our base tokens).

Speed: tokens/s of `generate` at batch 1 with and without the constraint on the same model, EOS never
stopping a row; the two are measured alternately (best of --repeats each) so the machine's load hits both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midistral.checkpoint import load_model_and_tokenizer, resolve_checkpoint  # noqa: E402
from midistral.generate import generate  # noqa: E402
from midistral.tokenize.grammar import GrammarConstraint  # noqa: E402

SETTINGS = dict(temperature=0.5, top_k=6, no_repeat_ngram_size=6)


def tiny_run(folder: Path) -> Path:
    """A tiny model with BPE trained on the dev files (a couple of minutes)."""
    out = folder / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.toml", f"out_dir={out}",
           "data.bpe_vocab_size=1000", "data.max_files=40", "train.max_steps=150", "train.eval_every=75"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def miditok_oracle(tok):
    from miditok import REMI as MidiTokREMI
    from miditok import TokenizerConfig

    params = tok.config.to_dict()
    c = tok.config  # MidiTok wants the tuple-keyed spelling
    params.update(beat_res=c.beat_res, beat_res_rest=c.beat_res_rest, time_signature_range=c.time_signature_range,
                  pitch_range=c.pitch_range, drums_pitch_range=c.drums_pitch_range, tempo_range=c.tempo_range,
                  use_time_signatures=True, use_rests=True, use_programs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = MidiTokREMI(TokenizerConfig(**params))
    assert list(oracle.vocab) == tok.id_to_token, "MidiTok's vocabulary differs from ours"
    return oracle


def samples(model, tok, n, batch, max_new, grammar: bool, seed: int) -> list[list[int]]:
    rows = []
    for b in range(0, n, batch):
        prompt = torch.full((min(batch, n - b), 1), tok.bos_id)
        constraints = [GrammarConstraint(tok, max_new)] if grammar else []
        out = generate(model, prompt, max_new, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=seed + b,
                       constraints=constraints, **SETTINGS)
        for row in out[:, 1:].tolist():
            rows.append(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
    return rows


def quality(rows, tok, oracle) -> dict:
    from miditok import TokSequence

    skipped = [tok.decode_with_report(r)[1] for r in rows]
    errors = [oracle.tokens_errors(TokSequence(tokens=[tok.id_to_token[i] for i in tok.base_ids(r).tolist()]))
              if r else 0.0 for r in rows]
    return dict(samples=len(rows), tokens=sum(map(len, rows)), skipped=sum(skipped),
                with_skips=sum(s > 0 for s in skipped), with_errors=sum(e > 0 for e in errors),
                mean_error_ratio=float(np.mean(errors)))


def speed(model, tok, new: int, repeats: int) -> tuple[float, float]:
    """Best tokens/s without and with the grammar, batch 1, measured alternately."""
    prompt = torch.tensor([[tok.bos_id]])
    best = {False: 0.0, True: 0.0}
    for _ in range(repeats):
        for grammar in (False, True):
            constraints = [GrammarConstraint(tok, new)] if grammar else []
            t0 = time.perf_counter()
            generate(model, prompt, new, min_new_tokens=new, eos_id=tok.eos_id, seed=0, constraints=constraints,
                     **SETTINGS)
            best[grammar] = max(best[grammar], new / (time.perf_counter() - t0))
    return best[False], best[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="run or checkpoint folder (default: train a tiny BPE run in a temp folder)")
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--speed-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = resolve_checkpoint(args.ckpt or tiny_run(Path(tmp)))
        model, tok = load_model_and_tokenizer(ckpt)
    print(f"checkpoint {ckpt}: {model.num_params():,} parameters, vocabulary {len(tok)} "
          f"({'BPE' if tok.bpe is not None else 'base tokens'})")
    oracle = miditok_oracle(tok)
    for grammar in (False, True):
        t0 = time.perf_counter()
        rows = samples(model, tok, args.num_samples, args.batch, args.max_new_tokens, grammar, args.seed)
        q = quality(rows, tok, oracle)
        print(f"grammar {'on ' if grammar else 'off'}: {q['samples']} samples, {q['tokens']} tokens, "
              f"skipped {q['skipped']} (in {q['with_skips']} samples), MidiTok tokens_errors > 0 in "
              f"{q['with_errors']} samples (mean ratio {q['mean_error_ratio']:.4f}); {time.perf_counter() - t0:.0f}s")
    off, on = speed(model, tok, args.speed_tokens, args.repeats)
    print(f"speed, batch 1, {args.speed_tokens} tokens, best of {args.repeats}: without {off:.0f} tok/s, "
          f"with grammar {on:.0f} tok/s (ratio {on / off:.2f})")


if __name__ == "__main__":
    main()
