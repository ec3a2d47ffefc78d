"""The token families of REMIPlus (the part of a token string before "_")."""

from __future__ import annotations

from enum import IntEnum


class Family(IntEnum):
    """Token families (the part of a token string before "_"); SPECIAL covers PAD, BOS, EOS and MASK."""

    SPECIAL = 0
    BAR = 1
    POSITION = 2
    PITCH = 3
    PITCH_DRUM = 4
    VELOCITY = 5
    DURATION = 6
    PROGRAM = 7
    TEMPO = 8
    TIME_SIG = 9
    REST = 10
    CHORD = 11


FAMILY_OF_PREFIX = {"Bar": Family.BAR, "Position": Family.POSITION, "Pitch": Family.PITCH,
                     "PitchDrum": Family.PITCH_DRUM, "Velocity": Family.VELOCITY, "Duration": Family.DURATION,
                     "Program": Family.PROGRAM, "Tempo": Family.TEMPO, "TimeSig": Family.TIME_SIG,
                     "Rest": Family.REST, "Chord": Family.CHORD}
"""The family of each token-string prefix; a prefix not listed is SPECIAL."""
