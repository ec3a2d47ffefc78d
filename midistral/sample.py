"""Continue a MIDI prompt (or start from nothing) with a trained midistral model.

    python sample.py prompt.mid                          # the shipped default model (models/default)
    python sample.py --style folk --bars 16              # from nothing, in a style (--list-styles)
    python sample.py prompt.mid --ckpt runs/chorales --num-samples 4 --max-new-tokens 1024
    python sample.py song.mid --infill 5-8 [--tracks bass]                        # rewrite bars 5-8

Writes, per sample, OUT/<name>_<i>.mid (prompt + continuation, one track per program named by General MIDI
instrument, tempo and time signatures kept) and OUT/<name>_<i>.png (piano roll), and prints one line per file.
Files already there are kept: a run that would overwrite one writes under the next free name
(OUT/<name>-2_<i>.mid, ...) unless --force. The sampling flags and their defaults are those of
midistral.sampling.SamplingConfig; the work is done by midistral.sampler.Sampler (docs/sampling.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from midistral.errors import ArgumentParser, ConfigError, MidistralError
from midistral.fields import FieldError, add_arguments, from_args
from midistral.model.precision import PRECISIONS
from midistral.sampler import Sampler, sample_paths, write_sample_files
from midistral.sampling import RejectionLimits, SamplingConfig, check_call
from midistral.tokenize import load_score
from midistral.config_files import command_line
from midistral.controls.flags import add_control_arguments, check_control_combinations, control_kwargs, sample_kwargs


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", help="MIDI file to continue (omit to start from nothing)")
    p.add_argument("--ckpt", default=None,
                   help="run folder (best/, else last/) or checkpoint folder (default: the shipped model, "
                        "models/default)")
    p.add_argument("--style", default=None,
                   help="the style to write in, for a model trained with style tokens (--list-styles)")
    p.add_argument("--list-styles", action="store_true", help="print the model's styles, one per line, and exit")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--force", action="store_true", help="overwrite files of an earlier run with the same names")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="pieces to write, generated as one batch (default: 1)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="same seed, same model: same pieces (default: random)")
    p.add_argument("--prompt-bars", type=int, default=None, metavar="K",
                   help="keep only the first K bars of the prompt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", type=precision_value, default=None,
                   help="weights for sampling: fp32 (exact), fp16, bf16 or int8 (default: the fastest at equal "
                        "quality on this machine for this model; fp32 for a small model)")
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled static-shape step (pays off over many tokens: the first "
                        "call compiles, or traces from the disk cache)")
    add_arguments(p.add_argument_group("sampling"), SamplingConfig)
    c = p.add_argument_group("instruments and length")
    c.add_argument("--programs", type=programs_value, default=None,
                   help="continue with only these instruments, each playing in every new bar: GM numbers or "
                        "names, -1 = drums (e.g. 0,33,-1 or piano,bass,drums)")
    c.add_argument("--bars", type=bars_value, default=None,
                   help="continue for exactly N bars; with --add-track/--replace-track, the bars A:B to write "
                        "(counted from 1, both included; A: or :B)")
    c.add_argument("--add-track", type=program_value, default=None, metavar="PROGRAM",
                   help="add a track for this instrument to the prompt, keeping its notes exactly")
    c.add_argument("--replace-track", type=program_value, default=None, metavar="PROGRAM",
                   help="write this instrument's track anew, keeping the other tracks")
    f = p.add_argument_group("infilling (a model trained with data.infill > 0; docs/infilling.md)")
    f.add_argument("--infill", type=infill_value, default=None, metavar="A-B",
                   help="regenerate bars A to B of the piece (counted from 1, both included), keeping every "
                        "note outside them")
    f.add_argument("--tracks", type=programs_value, default=None, metavar="NAMES",
                   help="with --infill: regenerate only these instruments in the span (GM numbers or names, "
                        "-1 = drums), keeping the others exactly")
    add_control_arguments(p)
    g = p.add_argument_group("rejection of failure modes")
    g.add_argument("--reject", action="store_true",
                   help="generate a sample again (other seed) while a failure mode is over its threshold")
    add_arguments(g, RejectionLimits)
    return p


def parse_args(argv=None):
    """The flags, checked: args.sampling (a SamplingConfig) and args.limits (RejectionLimits) built from them."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.sampling = from_args(SamplingConfig, args)
        args.limits = from_args(RejectionLimits, args)
        check_call(num_samples=args.num_samples, seed=args.seed, prompt_bars=args.prompt_bars)
    except FieldError as e:
        p.error(str(e if e.name.startswith("--") else e.as_flag()))
    except ConfigError as e:
        p.error(str(e))
    check_combinations(p, args)
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
        try:
            Sampler.parse_bar_range(text)
        except MidistralError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of bars >= 1 (or a span A:B with --add-track)")
    return int(text)


def infill_value(text: str) -> tuple[int, int]:
    """"A-B" (or "A") -> (A, B): bars counted from 1, both included."""
    first, _, last = text.partition("-")
    last = last or first
    if not (first.isdigit() and last.isdigit()) or int(first) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bars A-B, counted from 1 (e.g. 5-8)")
    if int(first) > int(last):
        raise argparse.ArgumentTypeError(f"{text!r}: the first bar is after the last")
    return int(first), int(last)


def check_infill_combinations(p, args) -> None:
    """One-line errors for --infill / --tracks with flags they do not go with."""
    if args.infill is None:
        if args.tracks is not None:
            p.error("--tracks chooses the instruments --infill regenerates: give --infill A-B too")
        return
    if args.prompt is None:
        p.error("--infill needs a piece: the MIDI file whose bars to regenerate")
    for flag, given in [("--add-track", args.add_track is not None), ("--replace-track", args.replace_track is not None),
                        ("--bars", args.bars is not None), ("--prompt-bars", args.prompt_bars is not None),
                        ("--min-new-tokens", bool(args.min_new_tokens)), ("--reject", args.reject)]:
        if given:
            p.error(f"--infill regenerates bars of the piece: {flag} does not apply")
    if args.programs is not None:
        p.error("--infill regenerates bars of the piece: --programs does not apply (--tracks chooses the "
                "instruments to regenerate)")


def check_combinations(p, args) -> None:
    """One-line errors (exit 1) for flags that do not go together."""
    check_infill_combinations(p, args)
    check_control_combinations(p, args)
    track = "--add-track" if args.add_track is not None else "--replace-track" if args.replace_track is not None else None
    if args.add_track is not None and args.replace_track is not None:
        p.error("--add-track and --replace-track do not go together: choose one")
    if track and args.prompt is None:
        p.error(f"{track} needs a prompt: the MIDI file to add the track to")
    if track and args.programs is not None:
        p.error(f"{track} writes one instrument: --programs does not apply")
    if track and args.style is not None:
        p.error(f"{track} follows the piece's own style: --style does not apply")
    if track and (args.prompt_bars is not None or args.min_new_tokens or args.max_new_tokens is not None
                  or args.top_p is not None):
        p.error(f"{track} walks the whole piece: --prompt-bars, --min-new-tokens, --max-new-tokens and --top-p "
                "do not apply")
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


def list_styles(ckpt) -> int:
    """Print the styles of the model at `ckpt` (None: the default), one per line, reading only its tokenizer."""
    from midistral.checkpoint import find_tokenizer_file, resolve_checkpoint
    from midistral.tokenizer_file import load_tokenizer

    tok = load_tokenizer(find_tokenizer_file(resolve_checkpoint(ckpt)))
    styles = tok.extra.styles if tok.extra is not None else []
    if not styles:
        log(f"note: {resolve_checkpoint(ckpt)} was trained without style tokens")
    for s in styles:
        print(s)
    return 0


def run(args) -> int:
    if args.list_styles:
        return list_styles(args.ckpt)
    # a bad prompt or output folder is reported before any work on the model
    if args.prompt is not None and not Path(args.prompt).exists():
        raise MidistralError(f"{args.prompt}: no such prompt file")
    prompt = load_score(args.prompt) if args.prompt is not None else None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MidistralError(f"{out}: cannot be the output folder (--out): {e.strerror}") from None
    if args.ckpt is not None and not Path(args.ckpt).exists():
        raise MidistralError(f"{args.ckpt}: no such checkpoint or run folder; train first: {train_command(args.ckpt)}")
    sampler = Sampler.load(args.ckpt, device=args.device, precision=args.precision, log=log, compile=args.compile)
    log(f"checkpoint {sampler.ckpt}; {args.num_samples} sample(s); precision {sampler.precision}")
    common = dict(num_samples=args.num_samples, seed=args.seed, reject=args.reject, limits=args.limits,
                  prompt_name=args.prompt, bars=args.bars)
    progress = ProgressBar(args.bars if isinstance(args.bars, int) else None)
    try:
        if args.infill is not None:
            samples = sampler.infill(prompt, args.infill, args.tracks, args.sampling, num_samples=args.num_samples,
                                     seed=args.seed, style=args.style, prompt_name=args.prompt, on_progress=progress,
                                     **control_kwargs(args))
        elif args.add_track is not None or args.replace_track is not None:
            program = args.add_track if args.add_track is not None else args.replace_track
            samples = sampler.accompany(prompt, program, args.sampling, replace=args.replace_track is not None,
                                        on_progress=progress, **common, **control_kwargs(args))
        else:
            samples = sampler.sample(prompt, args.sampling, prompt_bars=args.prompt_bars, programs=args.programs,
                                     style=args.style, on_progress=progress, **common, **control_kwargs(args),
                                     **sample_kwargs(args))
    finally:
        progress.close()
    stem = Path(args.prompt).stem if args.prompt else "sample"
    write_sample_files(samples, out, stem if args.force else free_stem(out, stem, len(samples)), sampler.ckpt)
    return 0


def train_command(ckpt: str) -> str:
    """The command that trains the run `ckpt` names: the shipped config it is named after, else the default's."""
    name = Path(ckpt).name
    shipped = Path(__file__).resolve().parent / "configs" / f"{name}.toml"
    config = f"configs/{name}.toml" if shipped.is_file() else "configs/chorales.toml"
    same_place = shipped.is_file() and Path(ckpt) == Path("runs", name)
    return f"{command_line('train')} --config {config}" + ("" if same_place else f" out_dir={ckpt}")


def free_stem(out_dir: Path, stem: str, n: int) -> str:
    """`stem`, else `stem-2`, `stem-3`, ...: the first whose files (MIDI and piano roll) are all new."""
    k, name = 1, stem
    while any(p.exists() or p.with_suffix(".png").exists() for p in sample_paths(out_dir, name, n)):
        k += 1
        name = f"{stem}-{k}"
    return name


class ProgressBar:
    """on_progress for Sampler.sample: a tqdm bar on stderr per generation (rejection may run several).
    With a length in bars the token budget is only a bound: the bar counts tokens without a total."""

    def __init__(self, bars: int | None = None):
        self.bar, self.bars = None, bars

    def __call__(self, step: int, total: int) -> None:
        if step == 1:
            self.close()
            desc = f"generating {self.bars} bar{'s' * (self.bars != 1)}" if self.bars else "generating"
            self.bar = tqdm(total=None if self.bars else total, desc=desc, unit="tok", leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


if __name__ == "__main__":
    sys.exit(main())
