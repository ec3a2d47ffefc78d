"""One exception family for the user's mistakes.

Each message names the file or key and the reason, on one line. Command-line entry points catch
`MidistralError`, print `str(err)` and exit 1; any other exception is our bug and keeps its traceback.
"""


class MidistralError(Exception):
    """A user's mistake (bad input file, bad config, missing checkpoint): a one-line message."""


class MidiError(MidistralError):
    """A MIDI file (or score, or token sequence) that cannot be read or tokenized."""


class ConfigError(MidistralError):
    """A configuration (tokenizer, model, TOML run config) with an unknown key or a bad value."""


class CheckpointError(MidistralError):
    """A checkpoint or tokenizer file that is missing, incomplete or of the wrong kind."""
