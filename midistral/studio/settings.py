"""What one press of Generate asks for, read from the page's form and checked against the studio's limits.

Every value a user can type is bounded here (lengths, variations, sampling settings, upload size), and
a wrong one is a MidistralError whose one-line message the page shows as is.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import PurePath

import symusic

from midistral.controls.attributes import parse_density, parse_polyphony
from midistral.controls.key import parse_key
from midistral.errors import MidiError, MidistralError
from midistral.limits import check_timeline
from midistral.general_midi import DRUMS, program_family, program_name
from midistral.music import n_bars, track_program
from midistral.sampling import SAMPLING, SamplingConfig
from midistral.tokenize import load_score

MODES = {
    "generate": "Generate (from nothing)",
    "continue": "Continue a MIDI file",
    "add": "Add a track",
    "replace": "Replace a track",
    "infill": "Regenerate bars",  # of a variation, from its piano roll (not a mode button)
}
NEEDS_PROMPT = ("continue", "add", "replace")
MAX_UPLOAD_BYTES = 5 * 2**20
# What the page offers: (label on the page, lowest, highest, default); 0 turns top-k and the n-gram ban off.
# The sampling defaults are SamplingConfig's; what a value may be at all, SamplingConfig checks.
BOUNDS = {
    "variations": ("Variations", 1, 8, 2),
    "bars": ("Length in bars", 1, 64, 8),
    "tokens": ("Length in tokens", 16, 2048, 512),
    "temperature": ("Temperature", 0.0, 2.0, SAMPLING.temperature),
    "top_k": ("Top-k", 0, 200, SAMPLING.top_k),
    "no_repeat_ngram": ("No-repeat n-gram", 0, 32, SAMPLING.no_repeat_ngram_size),
    "seed": ("Seed", 0, 2**31 - 1, None),
}


class UploadTooLarge(MidistralError):
    """An upload over MAX_UPLOAD_BYTES."""


def instruments() -> list[dict]:
    """The General MIDI instruments the page offers, drums first (program -1)."""
    return [{"program": p, "name": program_name(p), "family": program_family(p)} for p in range(DRUMS, 128)]


@dataclass
class Request:
    """One generation, checked: the sampler is called with exactly these values."""

    mode: str
    prompt: bytes | None        # the uploaded MIDI file (None: from nothing)
    prompt_name: str            # the upload's file name, for messages and download names
    programs: list[int] | None  # instruments the new music may use (None: the model chooses)
    track_program: int | None   # the instrument of the added / replaced track
    bars: int | None            # length in bars (when the sampler takes bars)
    sampling: SamplingConfig    # how tokens are drawn; its max_new_tokens: the length when not in bars
    variations: int
    seed: int
    style: str | None = None    # the style to write in (None: the model chooses)
    attributes: dict = field(default_factory=dict)  # key, density, polyphony as given (Sampler keywords)
    span: tuple[int, int] | None = None  # Regenerate bars: the bars, 1-based, both included
    tracks: list[int] | None = None     # Regenerate bars: only these instruments (None: all)
    source: str = ""                    # Regenerate bars: the variation's title, for messages

    @property
    def stem(self) -> str:
        """A safe base name for downloads: the prompt's name (letters, digits, - and _) or 'midistral'."""
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", PurePath(self.prompt_name).stem).strip("_")[:40]
        return stem or "midistral"


def number(form, key: str, kind=int):
    """The form's value for `key` within BOUNDS (its default when left empty)."""
    label, lo, hi, default = BOUNDS[key]
    raw = str(form.get(key) or "").strip()
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise MidistralError(f"{label}: {raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not lo <= value <= hi:
        raise MidistralError(f"{label} must be between {lo} and {hi}, got {raw}")
    return value


def program(raw: str, label: str) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise MidistralError(f"{label}: {raw!r} is not an instrument number (-1 = drums, 0..127)") from None
    if not DRUMS <= value <= 127:
        raise MidistralError(f"{label}: {value} is not an instrument number (-1 = drums, 0..127)")
    return value


def shown_name(name: str, limit: int = 60) -> str:
    """An upload's file name as messages show it: its last path part, cut to `limit` characters."""
    name = PurePath(str(name).replace("\\", "/")).name or "the file"
    return name if len(name) <= limit else name[:limit - 1] + "…"


def read_prompt(data: bytes, name: str) -> symusic.Score:
    """The uploaded file as a Score within the bounds of midistral.limits (notes, tracks, length, ticks per
    quarter), or a MidiError saying in plain words why it is not a usable MIDI file."""
    label = shown_name(name)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"{label}: {len(data) / 2**20:.1f} MB; a prompt may have at most "
                             f"{MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        score = load_score(data, label)
    except MidiError as e:
        if "unreadable MIDI" in str(e):  # the parser's own words (chunk lengths, iostream) say nothing to a user
            raise MidiError(f"not a readable MIDI file: {label} (it is cut short or damaged)") from None
        raise
    check_timeline(score, label)
    return score


def describe_prompt(score: symusic.Score, name: str) -> dict:
    """What the page shows about an uploaded prompt (read by read_prompt): its instruments, bars and length."""
    tracks = [{"name": program_name(track_program(t)), "program": track_program(t),
               "notes": len(t.notes)} for t in score.tracks if len(t.notes)]
    return {"name": shown_name(name), "tracks": tracks, "bars": n_bars(score, shown_name(name)),
            "notes": score.note_num(), "seconds": round(score.to("second").end(), 1)}


def parse_request(form, prompt: bytes | None, prompt_name: str, modes: list[str], length_in_bars: bool,
                  styles=()) -> Request:
    """A Request from the page's form fields (strings) and the uploaded file, or a MidistralError.
    `styles`: those the model knows (the style menu's choices)."""
    mode = str(form.get("mode") or "generate")
    if mode not in modes:
        raise MidistralError(f"mode {mode!r} is not available here (available: {', '.join(modes)})")
    if mode in NEEDS_PROMPT:
        if not prompt:
            raise MidistralError(f"{MODES[mode]} needs a MIDI file: choose one, or pick Generate to start from nothing")
        read_prompt(prompt, prompt_name)
    else:
        prompt, prompt_name = None, ""
    raw_programs = [p for p in str(form.get("programs") or "").split(",") if p.strip()]
    track = form.get("track_program")
    if mode in ("add", "replace") and not str(track or "").strip():
        raise MidistralError(f"{MODES[mode]}: choose the instrument of the track")
    seed = number(form, "seed")
    style = str(form.get("style") or "").strip() or None
    if style is not None and style not in styles:
        raise MidistralError(f"Style: {style[:40]!r} is not one the model knows ({', '.join(styles) or 'none'})")
    return Request(
        mode=mode, prompt=prompt, prompt_name=prompt_name,
        programs=[program(p, "Instruments") for p in raw_programs] or None,
        track_program=program(track, "Track instrument") if mode in ("add", "replace") else None,
        bars=number(form, "bars") if length_in_bars and mode not in ("add", "replace") else None,
        sampling=SamplingConfig(temperature=number(form, "temperature", float), top_k=number(form, "top_k"),
                                no_repeat_ngram_size=number(form, "no_repeat_ngram"),
                                max_new_tokens=None if length_in_bars else number(form, "tokens")),
        variations=number(form, "variations"), seed=secrets.randbelow(2**31) if seed is None else seed,
        style=style if mode not in ("add", "replace") else None, attributes=attributes(form, mode))


def attributes(form, mode: str) -> dict:
    """Key, density and polyphony from the form (empty: not asked), checked; the last two steer a new piece."""
    out = {}
    for name, parse in (("key", parse_key), ("density", parse_density), ("polyphony", parse_polyphony)):
        raw = str(form.get(name) or "").strip()
        if raw:
            parse(raw, flag=name.capitalize())
            out[name] = raw
    if mode in ("add", "replace") and (set(out) - {"key"}):
        raise MidistralError(f"{MODES[mode]}: density and polyphony steer new music, not an added track "
                             "(the key applies)")
    return out


def parse_infill(form, piece: symusic.Score, piece_bytes: bytes, prompt_name: str, source: str, max_bars: int,
                 styles=()) -> Request:
    """A Regenerate bars request for the variation `piece` (its MIDI bytes, its title `source`) from the form
    fields first, last (bars, 1-based), tracks (programs, comma-separated; empty: all), variations, seed,
    temperature, top_k, no_repeat_ngram, key and style. `max_bars`: the most bars the model can write at once."""
    n = n_bars(piece, source)
    first, last = (bar_number(form, name, n) for name in ("first", "last"))
    if first > last:
        raise MidistralError(f"Regenerate bars {first}-{last}: the first bar is after the last")
    if last - first + 1 > max_bars:
        raise MidistralError(f"Regenerate bars {first}-{last}: at most {max_bars} bars at once with this model's "
                             "context; select fewer")
    playing = sorted({track_program(t) for t in piece.tracks if len(t.notes)})
    tracks = [program(p, "Tracks") for p in str(form.get("tracks") or "").split(",") if p.strip()] or None
    for p in tracks or ():
        if p not in playing:
            raise MidistralError(f"Tracks: {program_name(p)} does not play in {source} (it has "
                                 f"{', '.join(map(program_name, playing)) or 'no notes'})")
    style = str(form.get("style") or "").strip() or None
    if style is not None and style not in styles:
        raise MidistralError(f"Style: {style[:40]!r} is not one the model knows ({', '.join(styles) or 'none'})")
    seed = number(form, "seed")
    key = str(form.get("key") or "").strip()
    if key:
        parse_key(key, flag="Key")
    return Request(
        mode="infill", prompt=piece_bytes, prompt_name=prompt_name, programs=None, track_program=None, bars=None,
        sampling=SamplingConfig(temperature=number(form, "temperature", float), top_k=number(form, "top_k"),
                                no_repeat_ngram_size=number(form, "no_repeat_ngram")),
        variations=number(form, "variations"), seed=secrets.randbelow(2**31) if seed is None else seed,
        style=style, attributes={"key": key} if key else {}, span=(first, last),
        tracks=tracks and sorted(set(tracks)), source=source)


def bar_number(form, name: str, n: int) -> int:
    """The form's bar `name` (first or last): a whole number in 1..n, the variation's bars."""
    raw = str(form.get(name) or "").strip()
    if raw == "":
        raise MidistralError(f"Regenerate bars: select the bars first (the {name} bar is missing)")
    try:
        value = int(raw)
    except ValueError:
        raise MidistralError(f"Regenerate bars: the {name} bar {raw[:20]!r} is not a whole number") from None
    if not 1 <= value <= n:
        raise MidistralError(f"Regenerate bars: the {name} bar must be between 1 and {n} (the variation's bars), "
                             f"got {value}")
    return value
