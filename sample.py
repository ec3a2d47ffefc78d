"""Continue a MIDI prompt (or start from nothing) with a trained midistral model.

    python sample.py prompt.mid --ckpt runs/chorales --num-samples 4 --max-new-tokens 1024

Defaults: temperature 0.7, top-k 12, no-repeat-6-gram (the report's 0.5 / 6 sample too narrowly: bench/RESULTS.md,
issue 14); from scratch at least 128 new tokens. Writes, per sample,
OUT/<name>_<i>.mid (prompt + continuation, one track per program named by General MIDI instrument,
tempo and time signatures kept) and OUT/<name>_<i>.png (piano roll), and prints one line per file.
The work is done by midistral.sampler.Sampler (docs/sampling.md); this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from midistral.errors import ArgumentParser, MidistralError
from midistral.music import write_midi, write_piano_roll
from midistral.model.precision import PRECISIONS
from midistral.sampler import SAMPLE_DEFAULTS, Sampler
from midistral.tokenize import load_score

D = SAMPLE_DEFAULTS


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="MIDI file to continue (omit to start from BOS)")
    p.add_argument("--ckpt", required=True, help="run folder (best/, else last/) or checkpoint folder")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {D['max_new_tokens']}; with --bars, as many as the context holds")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="EOS is masked before this many tokens (default: 128 from scratch without --bars, else 0)")
    p.add_argument("--temperature", type=float, default=D["temperature"], help="0 = greedy")
    p.add_argument("--top-k", type=int, default=D["top_k"], help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-repeat-ngram", type=int, default=D["no_repeat_ngram"], help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt-bars", type=int, default=None, help="keep only the first K bars of the prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", type=precision_value, default=None,
                   help="weights for sampling: fp32 (exact), fp16, bf16 or int8 (default: the fastest at equal "
                        "quality on this machine for this model; fp32 for a small model)")
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled static-shape step (pays off over many tokens: the first "
                        "call compiles, or traces from the disk cache)")
    p.add_argument("--no-grammar", dest="grammar", action="store_false",
                   help="do not mask tokens that break the token grammar")
    c = p.add_argument_group("instruments and length")
    c.add_argument("--programs", type=programs_value, default=None,
                   help="continue with only these instruments: GM numbers or names, -1 = drums "
                        "(e.g. 0,33,-1 or piano,bass,drums)")
    c.add_argument("--bars", type=bars_value, default=None,
                   help="continue for exactly N bars; with --add-track/--replace-track, the bars A:B to write "
                        "(counted from 1, both included; A: or :B)")
    c.add_argument("--add-track", type=program_value, default=None, metavar="PROGRAM",
                   help="add a track for this instrument to the prompt, keeping its notes exactly")
    c.add_argument("--replace-track", type=program_value, default=None, metavar="PROGRAM",
                   help="write this instrument's track anew, keeping the other tracks")
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


def precision_value(text: str) -> str:
    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(PRECISIONS)}")
    return text


def programs_value(text: str) -> list[int]:
    try:
        return Sampler.parse_programs(text)
    except MidistralError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def program_value(text: str) -> int:
    try:
        return Sampler.parse_program(text)
    except MidistralError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bars_value(text: str) -> int | str:
    """N (bars to continue), or a span A:B, A: or :B of the piece, counted from 1 (--add-track / --replace-track)."""
    if ":" in text:
        span = text.split(":")
        a, b = (int(x) if x.isdigit() else None for x in span) if len(span) == 2 else (None, None)
        if len(span) != 2 or not any(span) or any(x and not x.isdigit() for x in span) \
                or (a is not None and a < 1) or (a is not None and b is not None and b < a):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a span of bars A:B, A: or :B, counted from 1, A <= B")
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of bars >= 1 (or a span A:B with --add-track)")
    return int(text)


def check_numbers(p: argparse.ArgumentParser, args) -> None:
    """One-line errors (exit 1) for values out of range and flags that do not go together."""
    for name in ("num_samples", "max_new_tokens", "reject_tries"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("min_new_tokens", "top_k", "no_repeat_ngram", "temperature", "seed"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # `not >=` also catches nan
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
    track = "--add-track" if args.add_track is not None else "--replace-track" if args.replace_track is not None else None
    if args.add_track is not None and args.replace_track is not None:
        p.error("--add-track and --replace-track do not go together: choose one")
    if track and args.prompt is None:
        p.error(f"{track} needs a prompt: the MIDI file to add the track to")
    if track and args.programs is not None:
        p.error(f"{track} writes one instrument: --programs does not apply")
    if track and (args.prompt_bars is not None or args.min_new_tokens or args.max_new_tokens is not None):
        p.error(f"{track} walks the whole piece: --prompt-bars, --min-new-tokens and --max-new-tokens do not apply")
    if not track and isinstance(args.bars, str):
        p.error("--bars A:B (a span of the piece) is for --add-track / --replace-track; continue with --bars N")
    if track and isinstance(args.bars, int):
        p.error(f"{track} writes over a span of the piece: --bars A:B (bars A to B, from 1), A: or :B")


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
    # a bad prompt or output folder is reported before any work on the model
    if args.prompt is not None and not Path(args.prompt).exists():
        raise MidistralError(f"{args.prompt}: no such prompt file")
    prompt = load_score(args.prompt) if args.prompt is not None else None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MidistralError(f"{out}: cannot be the output folder (--out): {e.strerror}") from None
    sampler = Sampler.load(args.ckpt, device=args.device, precision=args.precision, log=log, compile=args.compile)
    log(f"checkpoint {sampler.ckpt}; {args.num_samples} sample(s); precision {sampler.precision}")
    limits = {k: getattr(args, k) for k in ("reject_tries", "max_silent_share", "max_loop_score", "max_out_of_key")}
    common = dict(num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                  no_repeat_ngram=args.no_repeat_ngram, seed=args.seed, grammar=args.grammar, reject=args.reject,
                  limits=limits, prompt_name=args.prompt, bars=args.bars)
    progress = ProgressBar()
    try:
        if args.add_track is not None or args.replace_track is not None:
            program = args.add_track if args.add_track is not None else args.replace_track
            samples = sampler.accompany(prompt, program, replace=args.replace_track is not None,
                                        on_progress=progress, **common)
        else:
            samples = sampler.sample(prompt, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                                     min_new_tokens=args.min_new_tokens, prompt_bars=args.prompt_bars,
                                     programs=args.programs, on_progress=progress, **common)
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
