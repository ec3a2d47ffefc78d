"""One exception family for the user's mistakes.

Each message names the file or key and the reason, on one line. Command-line entry points catch
`MidistralError`, print `str(err)` and exit 1; any other exception is our bug and keeps its traceback.
"""

import argparse
import sys


class MidistralError(Exception):
    """A user's mistake (bad input file, bad config, missing checkpoint): a one-line message."""


class MidiError(MidistralError):
    """A MIDI file (or score, or token sequence) that cannot be read or tokenized."""


class ConfigError(MidistralError):
    """A configuration (tokenizer, model, TOML run config) with an unknown key or a bad value."""


class CheckpointError(MidistralError):
    """A checkpoint or tokenizer file that is missing, incomplete or of the wrong kind."""


class DataError(MidistralError):
    """A prepared data folder that is missing, half-written, corrupt, of another version or unusable."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's convention for a mistake on the command line: `error: ...` on one
    line and exit code 1 (argparse's own prints the usage block and exits 2)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)
