"""midistral: learn to write MIDI with REMIPlus tokens, BPE and a small Mistral-style decoder.

Data flows one way (see README): MIDI -> tokenize -> data -> model (+kernels) -> generate -> MIDI.
"""

from midistral.errors import CheckpointError, ConfigError, MidiError, MidistralError

__version__ = "0.1.0"
__all__ = ["MidistralError", "MidiError", "ConfigError", "CheckpointError", "__version__"]
