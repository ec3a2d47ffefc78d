"""Typed settings: a dataclass field carries its help text and its check, so one declaration gives the
default, the validation (one ConfigError line naming the key), the TOML section reader (unknown keys
refused with a "did you mean") and the command-line flag.

    @dataclass(frozen=True)
    class Knobs:
        top_k: int = setting(12, Int(0), "keep the k most likely tokens; 0 = off")

        def __post_init__(self):
            check_fields(self)

Imports no torch: the tokenizer, the sampling settings and the run config all build on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

from midistral.errors import ConfigError

INF = math.inf


class Check:
    """What a value must be: `expected(v)` is None when `v` is fine, else what it should be ("an integer >= 1").
    `parse` turns a command-line word into the value (argparse's `type`)."""

    parse: Callable[[str], Any] = str

    def expected(self, v) -> str | None:
        raise NotImplementedError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo, hi, open_lo: bool = False) -> str:
    if hi == INF:
        return f"> {lo}" if open_lo else f">= {lo}"
    return f"in {'(' if open_lo else '['}{lo}, {hi}]"


class Int(Check):
    parse = int

    def __init__(self, lo=0, hi=INF, unset: bool = False):
        self.lo, self.hi, self.unset = lo, hi, unset

    def expected(self, v):
        if v is None and self.unset:
            return None
        if _is_int(v) and self.lo <= v <= self.hi:
            return None
        return f"an integer {_bounds(self.lo, self.hi)}" + (" (or unset)" if self.unset else "")


class Float(Check):
    parse = float

    def __init__(self, lo=0.0, hi=INF, open_lo: bool = False, unset: bool = False):
        self.lo, self.hi, self.open_lo, self.unset = lo, hi, open_lo, unset

    def expected(self, v):
        if v is None and self.unset:
            return None
        if _is_num(v) and (self.lo < v if self.open_lo else self.lo <= v) and v <= self.hi:
            return None
        return f"a number {_bounds(self.lo, self.hi, self.open_lo)}" + (" (or unset)" if self.unset else "")


class Bool(Check):
    def expected(self, v):
        return None if isinstance(v, bool) else "true or false"


class Str(Check):
    def __init__(self, nonblank: str | None = None):
        self.nonblank = nonblank  # what a blank value should have been, e.g. "a folder path"; None: blank is fine

    def expected(self, v):
        if not isinstance(v, str):
            return "a string"
        return self.nonblank if self.nonblank and not v.strip() else None


class Choice(Check):
    def __init__(self, *values):
        self.values = values

    def expected(self, v):
        return None if v in self.values else " or ".join(repr(a) for a in self.values)


class Rule(Check):
    """Any predicate, with the words saying what passes it."""

    def __init__(self, ok: Callable[[Any], bool], why: str):
        self.ok, self.why = ok, why

    def expected(self, v):
        try:
            return None if self.ok(v) else self.why
        except (TypeError, ValueError):
            return self.why


class FieldError(ConfigError):
    """A value its field's check refuses: `NAME=VALUE: expected WHY`; `named` renames it (a flag, a config key)."""

    def __init__(self, name: str, value, why: str):
        self.name, self.value, self.why = name, value, why
        super().__init__(f"{name}={show(value)}: expected {why}")

    def named(self, name: str) -> "FieldError":
        return FieldError(name, self.value, self.why)

    def as_flag(self) -> "FieldError":
        """Named as the command-line flag of the field (where "unset" means leaving the flag out)."""
        return FieldError(flag_name(self.name), self.value, self.why.replace(" (or unset)", ""))


def setting(default, check: Check | None, help: str, *, flag: bool = True, off_help: str | None = None,
            metavar: str | None = None):
    """A dataclass field with its check and help text; `flag=False` keeps it off the command line; `off_help`:
    the help of the `--no-NAME` flag of a boolean that defaults to true. A list or table default is copied per
    instance."""
    meta = {"check": check, "help": help, "flag": flag, "off_help": off_help, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj, where: str = "") -> None:
    """Every field of `obj` against its check; a ConfigError `{where}{name}={value}: expected ...`."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        why = check.expected(value) if check is not None else None
        if why is not None:
            raise FieldError(where + f.name, value, why)


def suggestion(key: str, known, prefix: str = "") -> str:
    """'; did you mean 'train.epochs'?' for a near miss, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def refuse_unknown(cls, d: dict, source: str, where: str = "") -> None:
    """A ConfigError naming the first key of `d` that is not a field of `cls`, with a near miss."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ConfigError(f"{source}: unknown config key {where + key!r}{suggestion(key, names, where)}")


def from_dict(cls, d: dict, source: str, where: str = ""):
    """`cls(**d)` with unknown keys refused ("did you mean") and every value checked by the class."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {where.rstrip('.') or 'config'}={show(d)}: expected a section")
    refuse_unknown(cls, d, source, where)
    try:
        return cls(**d)
    except FieldError as e:
        raise (e if e.name.startswith(where) else e.named(where + e.name)) from None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser, cls, defaults=None) -> None:
    """One flag per field of `cls` (not `flag=False` ones): its type, its default (from `defaults`, an instance,
    else the class), help with the default where it says something. A True boolean gives `--no-NAME`."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", False):
            continue
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = f.metadata["help"]
        check = f.metadata.get("check")
        if isinstance(check, Bool):
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f.metadata.get("off_help") or f"off: {help_}")
            else:
                parser.add_argument(flag_name(f.name), dest=f.name, action="store_true", help=help_)
            continue
        if default is not None and "default" not in help_:
            help_ = f"{help_} (default: {default})"
        metavar = f.metadata.get("metavar") or {int: "N", float: "X"}.get(getattr(check, "parse", None))
        parser.add_argument(flag_name(f.name), dest=f.name, type=check.parse if check else str, default=default,
                            help=help_, metavar=metavar)


def from_args(cls, args, **extra):
    """An instance of `cls` from parsed flags (fields without a flag take `extra` or their default);
    a bad value is a ConfigError naming the flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**values, **extra)
    except FieldError as e:
        raise (e.as_flag() if e.name in values else e) from None
