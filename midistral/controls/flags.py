"""sample.py's attribute-control flags (--key, --density, --polyphony, --gapless, --no-style-defaults): the
argument group, its value checks and the keyword arguments it gives Sampler.sample / accompany / infill.
Kept apart from sample.py so that the flags live in one place."""

from __future__ import annotations

import argparse

from midistral.controls.attributes import parse_density, parse_polyphony
from midistral.controls.key import parse_key
from midistral.errors import MidistralError


def _checked(parse):
    def value(text: str):
        try:
            parse(text, flag="")
        except MidistralError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text.strip()
    value.__name__ = parse.__name__.replace("parse_", "")  # argparse names the type in its messages
    return value


key_value, density_value, polyphony_value = _checked(parse_key), _checked(parse_density), _checked(parse_polyphony)


def add_control_arguments(parser) -> None:
    g = parser.add_argument_group("attribute controls (docs/sampling.md)")
    g.add_argument("--key", type=key_value, default=None, metavar="KEY",
                   help='new pitched notes only in this key: "E major", "D minor" (raised 6th and 7th allowed), '
                        '"F# minor", "Bb major"; drums are free')
    g.add_argument("--density", type=density_value, default=None, metavar="LEVEL",
                   help="notes starting per bar, all instruments together: low (4), medium (8), high (16) or a "
                        "number (the model's tokens count 0-17 and 18+); a model trained with attribute tokens")
    g.add_argument("--polyphony", type=polyphony_value, default=None, metavar="N",
                   help="the most notes starting together in a bar (1-6); a model trained with attribute tokens")
    g.add_argument("--gapless", action=argparse.BooleanOptionalAction, default=None,
                   help="no beat in which every instrument is silent, once the music has started "
                        "(default: the style's default, else off)")
    g.add_argument("--no-style-defaults", dest="style_defaults", action="store_false",
                   help="with --style, do not apply the style's default controls (the model card lists them)")


def control_kwargs(args) -> dict:
    """The controls given, as Sampler keyword arguments."""
    return {k: getattr(args, k) for k in ("key", "density", "polyphony") if getattr(args, k) is not None}


def sample_kwargs(args) -> dict:
    """The controls only Sampler.sample takes (a continuation or a piece from nothing)."""
    return {"gapless": args.gapless, "style_defaults": args.style_defaults}


def check_control_combinations(p, args) -> None:
    """One-line errors (exit 1) for controls that do not apply to the mode asked for."""
    mode = ("--infill" if args.infill is not None else "--add-track" if args.add_track is not None
            else "--replace-track" if args.replace_track is not None else None)
    for flag in ("--density", "--polyphony"):
        if mode not in (None, "--infill") and getattr(args, flag[2:]) is not None:
            p.error(f"{flag} steers new bars (their attribute tokens): it does not apply to {mode}")
    if mode is not None and args.gapless is not None:
        p.error(f"--{'no-' * (not args.gapless)}gapless: continuations and pieces from nothing only, not {mode}")
