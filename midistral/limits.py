"""Resource bounds for the MIDI files midistral reads (prompts, corpus files).

Encoding costs about 25 us and 0.5 KB per note here (a 10^6-note file: 25 s, 630 MB), so a file beyond these
bounds is refused with a line that says why, before any tokenizing. The tokenizer needs no bound on bars or
ticks per quarter (silences become Rest tokens: 10^4 bars, 0.4 s; a 2^29-tick gap at tpq 1, 12 tokens), but the
analysis of a score does (bar lines, seconds, piano rolls: midistral.music): check_timeline bounds its end in
quarter notes and bars, and its ticks per quarter. symusic's own bar lines never return past tick 2^24 (float32
ticks), so midistral.music computes them itself, in int64, after this check.
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
    """Call after parsing, before tokenizing: too many notes or tracks to encode in bounded time and memory,
    or a timeline past check_timeline's bounds."""
    if len(score.tracks) > MAX_TRACKS:
        raise MidiError(f"{label}: {len(score.tracks)} tracks, more than the {MAX_TRACKS} midistral reads")
    n_notes = score.note_num()
    if n_notes > MAX_NOTES:
        raise MidiError(f"{label}: {n_notes:,} notes, more than the {MAX_NOTES:,} midistral encodes "
                        "(about 25 us each: split the file)")
    check_timeline(score, label)  # every reader's score: bar and second analyses stay bounded


MAX_TPQ = 32767               # the largest a MIDI header can hold
MAX_BEATS = 2**16             # the end of a score in quarter notes: 9 hours at 120 bpm
MAX_BARS = 2**16              # bar lines analysed (a meter of 1/16 has 4 bars per quarter note)
MAX_TICKS = 2**31 - 1         # symusic's ticks are int32


def check_timeline(score, label) -> None:
    """Call before analysing a score's bars or seconds: ticks per quarter in 1..MAX_TPQ and an end within
    MAX_BEATS quarter notes (notes, tempos, meters and controllers all count)."""
    tpq = int(score.tpq)
    if not 1 <= tpq <= MAX_TPQ:
        raise MidiError(f"{label}: {tpq} ticks per quarter note; a MIDI file has 1 to {MAX_TPQ}")
    end = int(score.end())
    if end > MAX_BEATS * tpq or not 0 <= end <= MAX_TICKS:
        raise MidiError(f"{label}: lasts {end / tpq:,.0f} quarter notes (an event at tick {end:,}); "
                        f"midistral reads at most {MAX_BEATS:,}")
