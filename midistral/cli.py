"""The `midistral` command: `midistral train|sample|studio|evaluate|prepare [ARGS...]`.

Each subcommand is the module's own command line, given the rest of the arguments unchanged and imported
only when chosen (`midistral --help` loads no torch). A `--config` value may name a shipped config
(`midistral train --config chorales`); see midistral.config_files.
"""

from __future__ import annotations

import importlib
import sys

from midistral import __version__
from midistral.config_files import resolve_config
from midistral.errors import MidistralError

# name: (module whose main(argv) runs it, arguments put first, one line of help)
COMMANDS = {
    "train": ("midistral.train", [], "train a model from a run config (--config chorales)"),
    "sample": ("midistral.sample", [], "continue a MIDI prompt, or write from nothing, with a trained model"),
    "studio": ("midistral.studio.__main__", [], "the local web page: generate, hear, look, download"),
    "evaluate": ("midistral.evaluate", [], "compare generated MIDI with real music (overlapped areas)"),
    "prepare": ("midistral.data.__main__", ["prepare"], "tokenize a corpus into shards (done by train too)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: midistral {{{','.join(COMMANDS)}}} [ARGS...]", "",
             "Learn to write multi-track MIDI with a small Mistral-style model.", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, _, helptext) in COMMANDS.items()]
    lines += ["", "`midistral COMMAND --help` shows a command's options; `midistral --version` the version."]
    return "\n".join(lines)


def resolve_config_args(argv: list[str]) -> list[str]:
    """argv with each `--config NAME` (or `--config=NAME`) made the path of the config it names."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, str(resolve_config(argv[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"midistral {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)} (see midistral --help)",
              file=sys.stderr)
        return 1
    module_name, first, _ = COMMANDS[name]
    try:
        rest = resolve_config_args(rest)
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # a missing dependency is not this command's absence
        print(f"error: `midistral {name}` needs {module_name}, which this install lacks", file=sys.stderr)
        return 1
    sys.argv[0] = f"midistral {name}"  # what argparse prints as the program in usage lines
    return module.main(first + rest) or 0


if __name__ == "__main__":
    sys.exit(main())
