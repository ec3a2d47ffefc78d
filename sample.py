"""Continue a MIDI prompt (or start from nothing) with a trained midistral model.

    python sample.py prompt.mid --ckpt runs/chorales --num-samples 4 --max-new-tokens 1024

Defaults are the report's best setting: temperature 0.5, top-k 6, no-repeat-6-gram. Writes, per sample,
OUT/<name>_<i>.mid (prompt + continuation, one track per program named by General MIDI instrument,
tempo and time signatures kept) and OUT/<name>_<i>.png (piano roll), and prints one line per file.
The work is done by midistral.sampler.Sampler (docs/sampling.md); this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from midistral.errors import MidistralError
from midistral.music import write_midi, write_piano_roll
from midistral.sampler import SAMPLE_DEFAULTS, Sampler
from midistral.tokenize import load_score

D = SAMPLE_DEFAULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="MIDI file to continue (omit to start from BOS)")
    p.add_argument("--ckpt", required=True, help="run folder (best/, else last/) or checkpoint folder")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=D["max_new_tokens"])
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS is masked before this many tokens")
    p.add_argument("--temperature", type=float, default=D["temperature"], help="0 = greedy")
    p.add_argument("--top-k", type=int, default=D["top_k"], help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-repeat-ngram", type=int, default=D["no_repeat_ngram"], help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt-bars", type=int, default=None, help="keep only the first K bars of the prompt")
    p.add_argument("--device", default="cpu")
    g = p.add_argument_group("rejection of failure modes")
    g.add_argument("--reject", action="store_true",
                   help="generate a sample again (other seed) while a failure mode is over its threshold")
    g.add_argument("--reject-tries", type=int, default=D["reject_tries"], help="generations per sample at most")
    g.add_argument("--max-silent-share", type=float, default=D["max_silent_share"],
                   help="share of bars in which a prompt instrument is silent")
    g.add_argument("--max-loop-score", type=float, default=D["max_loop_score"],
                   help="share of bars that repeat one of the previous two")
    g.add_argument("--max-out-of-key", type=float, default=D["max_out_of_key"],
                   help="share of pitched notes outside the key")
    args = p.parse_args(argv)
    check_numbers(p, args)
    return args


def check_numbers(p: argparse.ArgumentParser, args) -> None:
    """One-line argparse errors (exit 2) for values out of range."""
    for name in ("num_samples", "max_new_tokens", "reject_tries"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("min_new_tokens", "top_k", "no_repeat_ngram", "temperature"):
        if not getattr(args, name) >= 0:  # `not >=` also catches nan
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.temperature == float("inf"):
        p.error("--temperature must be finite")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt_bars is not None and args.prompt_bars < 1:
        p.error(f"--prompt-bars must be >= 1, got {args.prompt_bars}")
    for name in ("max_silent_share", "max_loop_score", "max_out_of_key"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    # a bad prompt is reported before any work on the model
    prompt = load_score(args.prompt) if args.prompt is not None else None
    sampler = Sampler.load(args.ckpt, device=args.device, log=log)
    log(f"checkpoint {sampler.ckpt}; {args.num_samples} sample(s) of up to {args.max_new_tokens} tokens")
    limits = {k: getattr(args, k) for k in ("reject_tries", "max_silent_share", "max_loop_score", "max_out_of_key")}
    progress = ProgressBar()
    try:
        samples = sampler.sample(
            prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, no_repeat_ngram=args.no_repeat_ngram,
            seed=args.seed, reject=args.reject, min_new_tokens=args.min_new_tokens, limits=limits,
            prompt_bars=args.prompt_bars, prompt_name=args.prompt, on_progress=progress)
    finally:
        progress.close()
    write_samples(samples, Path(args.out), Path(args.prompt).stem if args.prompt else "sample", sampler.ckpt)
    return 0


class ProgressBar:
    """on_progress for Sampler.sample: a tqdm bar on stderr per generation (rejection may run several)."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        if step == 1:
            self.close()
            self.bar = tqdm(total=total, desc="generating", unit="tok", leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_samples(samples, out_dir: Path, stem: str, ckpt) -> None:
    """OUT/<stem>_<i>.mid and .png per sample, and its two lines on stdout."""
    width = len(str(len(samples) - 1))
    for i, s in enumerate(samples):
        base = out_dir / (f"{stem}_{i:0{width}d}" if len(samples) > 1 else stem)
        midi_path, png_path = base.with_suffix(".mid"), base.with_suffix(".png")
        write_midi(s.score, midi_path)
        write_piano_roll(s.score, png_path, f"{midi_path.name} ({ckpt})", s.start_tick, s.new_track)
        print(f"{midi_path}  {s.line}  (+ {png_path.name})")
        print(f"    {s.report}")


if __name__ == "__main__":
    sys.exit(main())
