"""Music on symusic scores, shared by the sampler, the evaluation and the web studio.

    score = name_tracks(score)                       # tracks named by General MIDI instrument
    write_midi(score, "out/song.mid")                # atomic
    png = piano_roll_png(score, "song", start_tick=1920, highlight=2)

The numbers about music (per-piece metrics, the report's failure modes) are in midistral.metrics.
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
from midistral.metrics import DRUM_PROGRAM
from midistral.tokenize import GM_NAMES, load_score

def track_program(track) -> int:
    """The track's GM program, DRUM_PROGRAM (-1) for the drum kit (as --programs and metrics name it)."""
    return DRUM_PROGRAM if track.is_drum else int(track.program)


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
# Notes


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
