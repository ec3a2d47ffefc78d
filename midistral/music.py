"""Music on symusic scores, shared by the sampler, the evaluation and the web studio.

    score = name_tracks(score)                       # tracks named by General MIDI instrument
    write_midi(score, "out/song.mid")                # atomic
    png = piano_roll_png(score, "song", start_tick=1920, highlight=2)
    modes = failure_modes(score, start_tick=1920)    # {"silent_share", "loop_score", "out_of_key"}

`failure_modes` measures the three ways the report's samples fail (a prompt instrument falls silent,
the piece loops over one or two bars, notes leave the key) on the continuation only: the notes that
start at or after `start_tick`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import symusic

from midistral.errors import MidistralError
from midistral.io import atomic_write_bytes
from midistral.tokenize import GM_NAMES, load_score

DRUMS = -1  # the program number that stands for the drum kit, as in --programs
MAJOR_SCALE = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)


def track_program(track) -> int:
    return DRUMS if track.is_drum else int(track.program)


def name_tracks(score: symusic.Score) -> symusic.Score:
    """Name every track by its General MIDI instrument ("Drums" for the kit), in place."""
    for t in score.tracks:
        t.name = "Drums" if t.is_drum else GM_NAMES[t.program]
    return score


def keep_prompt_meta(score: symusic.Score, prompt) -> symusic.Score:
    """Copy the prompt's tempos / time signatures into `score` where the tokenizer did not encode them.

    `prompt` is a symusic Score, a path or MIDI bytes (None: nothing to copy)."""
    if prompt is None or (len(score.tempos) and len(score.time_signatures)):
        return score
    src = load_score(prompt).resample(score.tpq)
    if not len(score.tempos):
        score.tempos = src.tempos
    if not len(score.time_signatures):
        score.time_signatures = src.time_signatures
    return score


def first_bars(score: symusic.Score, k: int) -> symusic.Score:
    """The score cut at its k-th bar line (bar lines from its time signatures; 4/4 when it has none)."""
    downbeats = score.get_downbeats()
    if len(downbeats) > k:
        return score.clip(0, int(downbeats[k]), clip_end=True)
    return score


def n_bars(score: symusic.Score) -> int:
    """Bars that start before the score's end (0 for a score with no notes)."""
    return int((score.get_downbeats() < score.end()).sum()) if score.note_num() else 0


# ----------------------------------------------------------------------------------------------------
# MIDI bytes and files


def midi_bytes(score: symusic.Score) -> bytes:
    return bytes(score.dumps_midi())


def write_midi(score: symusic.Score, path: str | os.PathLike) -> None:
    """Write `score` as a standard MIDI file, atomically (a crash leaves the old file, never half a file)."""
    atomic_write_bytes(path, midi_bytes(score))


# ----------------------------------------------------------------------------------------------------
# Failure modes of a continuation


def out_of_key_fraction(pitches: np.ndarray) -> float:
    """Share of pitched notes outside the major scale (of 12 transpositions) that covers the most notes."""
    if len(pitches) == 0:
        return 0.0
    hist = np.bincount(np.asarray(pitches, dtype=np.int64) % 12, minlength=12)
    # a minor key uses the same pitch-class set as its relative major
    covered = max(hist[np.roll(MAJOR_SCALE, r)].sum() for r in range(12))
    return 1.0 - covered / len(pitches)


def _bars(score: symusic.Score, start_tick: int) -> tuple[np.ndarray, int]:
    """Bar lines up to the score's end (plus the closing one) and the index of the first continuation bar."""
    end = max(score.end(), 1)
    downbeats = np.asarray(score.get_downbeats(), dtype=np.int64)
    inside = downbeats[downbeats < end]
    if len(inside) == 0:
        inside = np.zeros(1, dtype=np.int64)
    step = int(inside[-1] - inside[-2]) if len(inside) > 1 else 4 * score.tpq
    bars = np.append(inside, max(int(inside[-1]) + step, end))
    return bars, int(np.searchsorted(inside, start_tick, side="left"))


def _bar_patterns(score: symusic.Score, bars: np.ndarray) -> list[bytes]:
    """What each bar plays, relative to its bar line (track, onset, pitch, duration) as bytes, b"" if silent."""
    rows = []
    for i, t in enumerate(score.tracks):
        n = t.notes.numpy()
        bar = np.searchsorted(bars, n["time"], side="right") - 1
        offset = n["time"] - bars[np.clip(bar, 0, len(bars) - 1)]
        rows.append(np.stack([bar, np.full_like(bar, i), offset, n["pitch"], n["duration"]], 1))
    if not rows:
        return [b""] * (len(bars) - 1)
    notes = np.concatenate(rows).astype(np.int64)
    notes = notes[np.lexsort(notes.T[::-1])]
    cuts = np.searchsorted(notes[:, 0], np.arange(len(bars)))
    return [notes[cuts[b]:cuts[b + 1], 1:].tobytes() for b in range(len(bars) - 1)]


def _silent_share(score, bars, first, prompt_programs) -> float:
    """Share of continuation bars in which some instrument of the prompt sounds no note."""
    n_new = len(bars) - 1 - first
    if n_new <= 0 or not prompt_programs:
        return 0.0
    lo, hi = bars[first:-1], bars[first + 1:]
    silent = np.zeros(n_new, dtype=bool)
    by_program = {track_program(t): t.notes.numpy() for t in score.tracks}
    for program in set(prompt_programs):
        n = by_program.get(program)
        if n is None or len(n["time"]) == 0:
            silent[:] = True
            continue
        on, off = n["time"], n["time"] + np.maximum(n["duration"], 1)
        # a bar hears the instrument if one of its notes overlaps [lo, hi)
        sounding = (on[None, :] < hi[:, None]) & (off[None, :] > lo[:, None])
        silent |= ~sounding.any(1)
    return float(silent.mean())


def failure_modes(score: symusic.Score, start_tick: int = 0, prompt_programs=None) -> dict[str, float]:
    """The report's failure modes in the continuation (bars from `start_tick` on), each a share in [0, 1]:

    - silent_share: bars in which an instrument of the prompt plays nothing (programs, -1 = drums;
      default: the instruments with notes before start_tick);
    - loop_score: non-empty bars that repeat one of the previous two bars exactly (every track's onsets,
      pitches and durations relative to the bar line);
    - out_of_key: pitched notes outside the best-fitting major/minor scale.
    """
    if prompt_programs is None:
        prompt_programs = [track_program(t) for t in score.tracks
                           if len(t.notes) and int(t.notes.numpy()["time"].min()) < start_tick]
    bars, first = _bars(score, start_tick)
    patterns = _bar_patterns(score, bars)
    new = range(first, len(patterns))
    loops = sum(1 for b in new if patterns[b] and patterns[b] in patterns[max(b - 2, 0):b])
    pitched = [t.notes.numpy() for t in score.tracks if not t.is_drum]
    pitches = np.concatenate([n["pitch"][n["time"] >= start_tick] for n in pitched]) if pitched else []
    return {
        "silent_share": _silent_share(score, bars, first, prompt_programs),
        "loop_score": loops / len(new) if len(new) else 0.0,
        "out_of_key": out_of_key_fraction(np.asarray(pitches, dtype=np.int64)),
    }


def new_notes_per_track(score: symusic.Score, start_tick: int) -> list[tuple[str, int]]:
    """(track name, notes starting at or after start_tick) per track."""
    return [(t.name, int((t.notes.numpy()["time"] >= start_tick).sum())) for t in score.tracks]


# ----------------------------------------------------------------------------------------------------
# Piano roll


def piano_roll_png(score: symusic.Score, title: str, start_tick: int | None = None,
                   highlight: int | None = None) -> bytes:
    """A piano roll (quarter notes across, pitch up) as PNG bytes; one colour per track.

    `start_tick` draws a dashed line where the continuation starts; `highlight` (a track index) draws
    that track strongly and the others faded, e.g. a new accompaniment track over the original piece."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    tpq = score.tpq
    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    colors = plt.get_cmap("tab10")
    for i, t in enumerate(score.tracks):
        n = t.notes.numpy()
        if len(n["time"]) == 0:
            continue
        x0, x1 = n["time"] / tpq, (n["time"] + np.maximum(n["duration"], 1)) / tpq
        y0, y1 = n["pitch"] - 0.4, n["pitch"] + 0.4
        boxes = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1),
                          np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)
        strong = highlight is None or i == highlight
        ax.add_collection(PolyCollection(
            boxes, facecolors=colors(i % 10), alpha=0.85 if strong else 0.25, zorder=2 if strong else 1,
            edgecolors="black" if highlight == i else "none", linewidths=0.6,
            label=t.name + (" (new)" if highlight == i else "")))
    end = max(score.end(), 1) / tpq
    for b in score.get_downbeats():
        if b / tpq <= end:
            ax.axvline(b / tpq, color="0.85", lw=0.5, zorder=0)
    if start_tick:
        ax.axvline(start_tick / tpq, color="red", lw=1.2, ls="--", label="continuation starts")
    ax.set_xlim(0, end)
    ax.set_ylim(20, 109)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("pitch")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_piano_roll(score: symusic.Score, path: str | os.PathLike, title: str, start_tick: int | None = None,
                     highlight: int | None = None) -> None:
    atomic_write_bytes(path, piano_roll_png(score, title, start_tick, highlight))


# ----------------------------------------------------------------------------------------------------
# Audio

# General MIDI SoundFonts installed by system packages, best first: fluid-soundfont-gm (Debian/Ubuntu,
# Fedora, Arch paths), the distribution's default-GM link, timgm6mb-soundfont.
SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
)


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """`soundfont`, else $MIDISTRAL_SOUNDFONT, else the first of SOUNDFONTS present; never downloads one."""
    given = soundfont or os.environ.get("MIDISTRAL_SOUNDFONT")
    if given:
        if not Path(given).is_file():
            raise MidistralError(f"{given}: no such SoundFont file")
        return Path(given)
    for candidate in SOUNDFONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise MidistralError("no General MIDI SoundFont found (install fluid-soundfont-gm, or pass a .sf2 file)")


def render_wav(score: symusic.Score, soundfont: str | os.PathLike | None = None, sample_rate: int = 44100) -> bytes:
    """The score played with a General MIDI SoundFont, as WAV bytes (16-bit stereo, `sample_rate` Hz).

    Played by the system's FluidSynth program: symusic 0.6's own Synthesizer renders but cannot hand
    its buffer to Python ("Unable to convert function return value")."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise MidistralError("fluidsynth not found: install the fluidsynth package to render audio")
    sf = find_soundfont(soundfont)
    with tempfile.TemporaryDirectory(prefix="midistral-audio-") as tmp:
        midi, wav = Path(tmp) / "score.mid", Path(tmp) / "score.wav"
        midi.write_bytes(midi_bytes(score))
        # -n -i: no MIDI input, no shell; -g 0.5: louder than the default 0.2 without clipping a quartet
        r = subprocess.run([exe, "-n", "-i", "-q", "-g", "0.5", "-r", str(sample_rate), "-T", "wav", "-O", "s16",
                            "-F", str(wav), str(sf), str(midi)], capture_output=True, text=True)
        if r.returncode != 0 or not wav.is_file():
            reason = (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[0]
            raise MidistralError(f"{sf}: fluidsynth could not render the score ({reason})")
        return wav.read_bytes()
