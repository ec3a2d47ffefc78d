"""sample.py's attribute-control flags (--key, --density, --polyphony): the argument group, its value checks
and the keyword arguments it gives Sampler.sample / accompany / infill. Kept apart from sample.py so that
the flags live in one place."""

from __future__ import annotations

import argparse

from midistral.controls.key import parse_key
from midistral.errors import MidistralError


def key_value(text: str):
    try:
        return parse_key(text, flag="")
    except MidistralError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_control_arguments(parser) -> None:
    g = parser.add_argument_group("attribute controls (docs/sampling.md)")
    g.add_argument("--key", type=key_value, default=None, metavar="KEY",
                   help='new pitched notes only in this key: "E major", "D minor" (raised 6th and 7th allowed), '
                        '"F# minor", "Bb major"; drums are free')


def control_kwargs(args) -> dict:
    """The controls given, as Sampler keyword arguments."""
    return {"key": args.key} if args.key is not None else {}


def check_control_combinations(p, args) -> None:
    """One-line errors (exit 1) for controls that do not apply to the mode asked for."""
