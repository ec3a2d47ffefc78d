"""General MIDI instruments: the one table of names, families and short names that the tokenizer's decoder
(track names), the controls (instrument names a user types) and the studio (its instrument menu) read.

    program_name(33)          # 'Electric Bass (finger)'   (-1 is the drum kit: 'Drums')
    program_family(33)        # 'Bass'
    parse_programs("piano,bass,drums")   # [0, 33, -1]

A leaf module (it imports only midistral.errors), so the tokenizer can read it without reaching up.
"""

from __future__ import annotations

import difflib
import re

from midistral.errors import MidistralError

DRUMS = -1  # the drum kit's program number here (General MIDI plays drums on channel 10, not by program)

GM_NAMES = [
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavi", "Celesta", "Glockenspiel", "Music Box",
    "Vibraphone", "Marimba", "Xylophone", "Tubular Bells", "Dulcimer", "Drawbar Organ", "Percussive Organ",
    "Rock Organ", "Church Organ", "Reed Organ", "Accordion", "Harmonica", "Tango Accordion",
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)", "Electric Guitar (clean)",
    "Electric Guitar (muted)", "Overdriven Guitar", "Distortion Guitar", "Guitar Harmonics", "Acoustic Bass",
    "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass", "Slap Bass 1", "Slap Bass 2",
    "Synth Bass 1", "Synth Bass 2", "Violin", "Viola", "Cello", "Contrabass", "Tremolo Strings",
    "Pizzicato Strings", "Orchestral Harp", "Timpani", "String Ensembles 1", "String Ensemble 2",
    "SynthStrings 1", "SynthStrings 2", "Choir Aahs", "Voice Oohs", "Synth Voice", "Orchestra Hit", "Trumpet",
    "Trombone", "Tuba", "Muted Trumpet", "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax", "Oboe", "English Horn", "Bassoon", "Clarinet",
    "Piccolo", "Flute", "Recorder", "Pan Flute", "Blown bottle", "Shakuhachi", "Whistle", "Ocarina",
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)", "Lead 5 (charang)",
    "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)", "Pad 1 (new age)", "Pad 2 (warm)",
    "Pad 3 (polysynth)", "Pad 4 (choir)", "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)", "FX 5 (brightness)",
    "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)", "Sitar", "Banjo", "Shamisen", "Koto", "Kalimba",
    "Bag pipe", "Fiddle", "Shanai", "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock", "Taiko Drum",
    "Melodic Tom", "Synth Drum", "Reverse Cymbal", "Guitar Fret Noise", "Breath Noise", "Seashore",
    "Bird Tweet", "Telephone Ring", "Helicopter", "Applause", "Gunshot",
]

# the General MIDI families: programs 8 * i .. 8 * i + 7 form GM_FAMILIES[i]
GM_FAMILIES = ("Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Ensemble", "Brass", "Reed",
               "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic", "Percussive", "Sound Effects")

# names people type, beside the General MIDI names
SHORT_NAMES = {
    "piano": 0, "grand piano": 0, "bright piano": 1, "electric piano": 4, "epiano": 4, "harpsichord": 6,
    "celesta": 8, "glockenspiel": 9, "music box": 10, "vibraphone": 11, "vibes": 11, "marimba": 12,
    "xylophone": 13, "bells": 14, "organ": 19, "church organ": 19, "drawbar organ": 16, "rock organ": 18,
    "accordion": 21, "harmonica": 22, "guitar": 24, "nylon guitar": 24, "classical guitar": 24,
    "acoustic guitar": 25, "steel guitar": 25, "electric guitar": 27, "jazz guitar": 26, "clean guitar": 27,
    "overdriven guitar": 29, "distortion guitar": 30, "bass": 33, "electric bass": 33, "acoustic bass": 32,
    "upright bass": 32, "fretless bass": 35, "slap bass": 36, "synth bass": 38, "violin": 40, "viola": 41,
    "cello": 42, "contrabass": 43, "double bass": 43, "strings": 48, "string ensemble": 48,
    "pizzicato": 45, "harp": 46, "timpani": 47, "synth strings": 50, "choir": 52, "voice": 53, "voices": 53,
    "trumpet": 56, "trombone": 57, "tuba": 58, "horn": 60, "french horn": 60, "brass": 61, "sax": 65,
    "saxophone": 65, "soprano sax": 64, "alto sax": 65, "tenor sax": 66, "baritone sax": 67, "oboe": 68,
    "english horn": 69, "bassoon": 70, "clarinet": 71, "piccolo": 72, "flute": 73, "recorder": 74,
    "pan flute": 75, "whistle": 78, "ocarina": 79, "lead": 80, "synth lead": 80, "synth": 80, "pad": 88,
    "synth pad": 88, "sitar": 104, "banjo": 105, "koto": 107, "kalimba": 108, "bagpipe": 109, "fiddle": 110,
    "steel drums": 114, "drums": -1, "drum": -1, "drum kit": -1, "percussion": -1,
}


def program_name(program: int) -> str:
    """The track name midistral gives a program: its General MIDI name, 'Drums' for -1."""
    return "Drums" if program == DRUMS else GM_NAMES[program]


def program_family(program: int) -> str:
    """The General MIDI family of a program ('Drums' for -1)."""
    return "Drums" if program == DRUMS else GM_FAMILIES[program // 8]


def _norm(name: str) -> str:
    return " ".join(re.sub(r"[()_\-+]", " ", name.lower()).split())


_NAMES = {**{_norm(n): i for i, n in enumerate(GM_NAMES)}, **{_norm(n): p for n, p in SHORT_NAMES.items()}}


def parse_program(value, what: str = "program") -> int:
    """One program: an int -1..127 (-1 = drums) or an instrument name; MidistralError naming the value."""
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        p = int(text)
        if not -1 <= p <= 127:
            raise MidistralError(f"{what}: {text} is outside -1..127 (General MIDI programs 0..127, -1 = drums)")
        return p
    p = _NAMES.get(_norm(text))
    if p is None:
        close = difflib.get_close_matches(_norm(text), list(_NAMES), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (a number -1..127 or a name: piano, bass, drums, ...)"
        raise MidistralError(f"{what}: unknown instrument {text!r}{hint}")
    return p


def parse_programs(spec) -> list[int]:
    """"0,33,-1" or "piano,bass,drums" (or a list of those) -> [0, 33, -1], duplicates dropped, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [x for x in items if str(x).strip()]
    if not items:
        raise MidistralError(f"programs: {spec!r} names no instrument")
    return list(dict.fromkeys(parse_program(x, "programs") for x in items))
