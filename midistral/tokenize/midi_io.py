"""Reading MIDI for the tokenizer: a path, MIDI bytes or a symusic Score in, a checked Score out.

Every MIDI file midistral reads (corpus files, prompts, uploads) comes through `load_score`, which turns
each way a file can be wrong (missing, empty, not MIDI, unreadable, beyond midistral.limits' bounds)
into one `MidiError` line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import symusic

from midistral.errors import MidiError
from midistral.limits import check_midi_size, check_score


def load_score(midi, name: str | None = None) -> symusic.Score:
    """A symusic Score (ticks) from a path, MIDI bytes or a Score; MidiError naming the file otherwise."""
    if isinstance(midi, symusic.Score):
        return midi
    if isinstance(midi, (bytes, bytearray, memoryview)):
        data, label = bytes(midi), name or "<bytes>"
    elif isinstance(midi, (str, os.PathLike)):
        label = str(midi)
        data = _read_file(Path(midi), label)
    else:
        raise MidiError(f"{name or midi!r}: expected a path, MIDI bytes or a symusic.Score, got {type(midi).__name__}")
    if len(data) == 0:
        raise MidiError(f"{label}: empty file")
    check_midi_size(len(data), label)
    if data[:4] != b"MThd":
        what = "a RIFF MIDI" if data[:4] == b"RIFF" else "not a MIDI file"
        raise MidiError(f"{label}: {what} (no MThd header)")
    try:
        score = symusic.Score.from_midi(data)
    except Exception as e:  # symusic raises RuntimeError/ValueError with a short reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise MidiError(f"{label}: unreadable MIDI ({reason})") from None
    check_score(score, label)  # too many notes or tracks to encode in bounded time and memory
    return score


def _read_file(path: Path, label: str) -> bytes:
    try:
        if path.is_file():
            check_midi_size(path.stat().st_size, label)  # before reading it all
        return path.read_bytes()
    except FileNotFoundError:
        raise MidiError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise MidiError(f"{label}: is a folder, not a MIDI file") from None
    except OSError as e:
        raise MidiError(f"{label}: cannot be read ({e.strerror})") from None


def midi_label(midi) -> str:
    """How an error names a MIDI input: its path, or what kind of input it was."""
    return str(midi) if isinstance(midi, (str, os.PathLike)) else "<score>" if isinstance(midi, symusic.Score) else "<bytes>"
