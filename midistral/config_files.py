"""Run configs by path or by name: `--config runs/mine.toml`, `--config chorales` or `--config chorales.toml`.

The configs shipped with midistral (chorales, report, tiny, ...) live in the package (midistral/configs/,
package data), so an installed midistral finds them by name from any folder. Imports nothing heavy:
every command line calls it before loading torch.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

from midistral.errors import ConfigError


def shipped_folder():
    """The folder of shipped configs (a Traversable; it may not exist in a checkout that keeps them outside)."""
    return importlib.resources.files("midistral").joinpath("configs")


def shipped_configs(folder=None) -> list[str]:
    """The names of the shipped configs, sorted (`chorales`, `report`, ...)."""
    folder = shipped_folder() if folder is None else folder
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def resolve_config(name_or_path, folder=None) -> Path:
    """The config file meant: an existing path wins; else a bare name (`chorales`, `chorales.toml`, or
    `configs/chorales.toml` as the README writes it, from a folder without it) is looked up among the
    shipped configs. Anything else is returned as given, for the loader to report as missing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")
    if not bare:
        return path
    folder = shipped_folder() if folder is None else folder
    name = path.name if path.name.endswith(".toml") else path.name + ".toml"
    found = folder.joinpath(name)
    if found.is_file():
        return Path(str(found))
    names = shipped_configs(folder)
    listed = f"shipped configs: {', '.join(names)}" if names else "this install ships no configs"
    raise ConfigError(f"{name_or_path}: no such config file, nor a shipped config of that name ({listed})")


def command_line(name: str) -> str:
    """How the user calls the command `name` ("train", "sample") in hints: `midistral train` when they run the
    installed `midistral` command, else the checkout's `python train.py`."""
    return f"midistral {name}" if os.path.basename(sys.argv[0]) == "midistral" else f"python {name}.py"
