"""Resource bounds for the MIDI files midistral reads (prompts, corpus files).

Encoding costs about 25 us and 0.5 KB per note here (a 10^6-note file: 25 s, 630 MB), so a file beyond these
bounds is refused with a line that says why, before any tokenizing. Bars and ticks per quarter need no bound:
silences become Rest tokens (10^4 bars: 0.4 s; a 2^29-tick gap at tpq 1: 12 tokens), and a MIDI header
cannot hold a tpq above 32767.
"""

from __future__ import annotations

from midistral.errors import MidiError

MAX_MIDI_BYTES = 32 * 2**20   # a 10^6-note file is 8 MB
MAX_NOTES = 200_000           # about 5 s to encode on one core; Lakh's largest files hold ~100,000
MAX_TRACKS = 4096


def check_midi_size(n_bytes: int, label: str) -> None:
    """Call before parsing: a file too big to be a piece of music."""
    if n_bytes > MAX_MIDI_BYTES:
        raise MidiError(f"{label}: {n_bytes / 2**20:.0f} MB, more than the {MAX_MIDI_BYTES // 2**20} MB midistral reads")


def check_score(score, label) -> None:
    """Call after parsing, before tokenizing: too many notes or tracks to encode in bounded time and memory."""
    if len(score.tracks) > MAX_TRACKS:
        raise MidiError(f"{label}: {len(score.tracks)} tracks, more than the {MAX_TRACKS} midistral reads")
    n_notes = score.note_num()
    if n_notes > MAX_NOTES:
        raise MidiError(f"{label}: {n_notes:,} notes, more than the {MAX_NOTES:,} midistral encodes "
                        "(about 25 us each: split the file)")
