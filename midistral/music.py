"""Music on symusic scores, shared by the sampler, the evaluation and the web studio.

    score = name_tracks(score)                       # tracks named by General MIDI instrument
    write_midi(score, "out/song.mid")                # atomic
    png = piano_roll_png(score, "song", start_tick=1920, highlight=2)

The numbers about music (per-piece metrics, the reference setup's failure modes) are in midistral.metrics.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import symusic

from midistral.errors import MidiError, MidistralError
from midistral.general_midi import DRUMS
from midistral.io import atomic_write_bytes
from midistral.limits import MAX_BARS, check_timeline
from midistral.tokenize import GM_NAMES, load_score

def track_program(track) -> int:
    """The track's GM program, DRUMS (-1) for the drum kit (as --programs and metrics name it)."""
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


def downbeats(score: symusic.Score, label: str = "score") -> np.ndarray:
    """Bar lines in ticks (int64) up to the score's end: a new bar at every time signature, 4/4 before the
    first. The same lines as symusic's get_downbeats, which never returns past tick 2^24; a score beyond
    the limits of midistral.limits.check_timeline is a MidiError naming `label`."""
    check_timeline(score, label)
    tpq, end = int(score.tpq), int(score.end())
    sigs = {0: (4, 4)}
    for ts in sorted(score.time_signatures, key=lambda ts: ts.time):
        sigs[int(ts.time)] = (int(ts.numerator), int(ts.denominator))
    starts = sorted(sigs)
    lines, total = [], 0
    for i, start in enumerate(starts):
        if start >= end:
            break
        num, den = sigs[start]
        # a bar of tpq * 4 * num / den ticks, which may be a fraction: line k at round(k * bar), half up
        bar_num, bar_den = tpq * 4 * max(num, 1), max(den, 1)
        stop = min(starts[i + 1] if i + 1 < len(starts) else end, end)
        count = -(-(stop - start) * bar_den // bar_num)  # lines k with k * bar < stop - start
        total += count
        if total > MAX_BARS:
            raise MidiError(f"{label}: more than {MAX_BARS:,} bars (meter {num}/{den}); midistral reads fewer")
        k = np.arange(count, dtype=np.int64)
        ticks = start + (2 * k * bar_num + bar_den) // (2 * bar_den)
        lines.append(ticks[ticks < stop])  # a rounded last line may reach the next meter
    return np.concatenate(lines) if lines else np.zeros(0, np.int64)


def first_bars(score: symusic.Score, k: int) -> symusic.Score:
    """The score cut at its k-th bar line (bar lines from its time signatures; 4/4 when it has none)."""
    lines = downbeats(score)
    if len(lines) > k:
        return score.clip(0, int(lines[k]), clip_end=True)
    return score


def merge_doubled_notes(score: symusic.Score, start_tick: int = 0) -> symusic.Score:
    """`score` with the notes that start at or after `start_tick` (the new music) played once per instrument,
    onset and pitch (in place): of notes doubled there the longest is kept. To a MIDI player a doubled note is one
    note whose first note-off cuts the others; a DAW shows them stacked. Real music has none (0 of 34,491 notes of
    the Bach and Renaissance test openings, 1.1% of classical's), the model writes 10-21% in polyphonic styles
    (bench/RESULTS.md). Notes before `start_tick` (a prompt) are never touched."""
    for track in score.tracks:
        a = track.notes.numpy()
        new = np.flatnonzero(a["time"] >= start_tick)
        if len(new) < 2:
            continue
        order = new[np.lexsort((-a["duration"][new], a["pitch"][new], a["time"][new]))]  # longest first per key
        same = (np.diff(a["time"][order]) == 0) & (np.diff(a["pitch"][order]) == 0)
        if not same.any():
            continue
        keep = np.ones(len(a["time"]), bool)
        keep[order[1:][same]] = False
        track.notes = symusic.Note.from_numpy(**{k: v[keep] for k, v in a.items()}, ttype=score.ttype)
    return score


def end_at_last_bar(score: symusic.Score) -> symusic.Score:
    """`score` with every note held past the bar line after its last onset ended at that line (in place): a piece
    asked for N bars is N bars long in a DAW, not N + 2 for a final chord the model held over two more bars."""
    onsets = [int(t.notes.numpy()["time"].max()) for t in score.tracks if len(t.notes)]
    if not onsets:
        return score
    lines = downbeats(score)
    after = lines[lines > max(onsets)]
    if len(after):
        end = int(after[0])
        for track in score.tracks:
            for note in track.notes:
                if note.time + note.duration > end:
                    note.duration = end - note.time
    return score


def n_bars(score: symusic.Score, label: str = "score") -> int:
    """Bars that start before the score's end (0 for a score with no notes)."""
    return int((downbeats(score, label) < score.end()).sum()) if score.note_num() else 0


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


MAX_LEGEND = 24  # instruments named in a piano roll's legend


def plain_text(text: str, limit: int = 90) -> str:
    """A title or label cut to `limit` characters, never starting with "_" (which hides a legend entry).
    It is drawn with parse_math=False: a file name with a pair of $ is not matplotlib math."""
    text = str(text) if len(str(text)) <= limit else str(text)[:limit - 1] + "…"
    return text.lstrip("_") or " "


def piano_roll_png(score: symusic.Score, title: str, start_tick: int | None = None,
                   highlight: int | None = None) -> bytes:
    """A piano roll (quarter notes across, pitch up) as PNG bytes; one colour per track.

    `start_tick` draws a dashed line where the continuation starts; `highlight` (a track index) draws
    that track strongly and the others faded, e.g. a new accompaniment track over the original piece."""
    # a Figure of its own, no pyplot: pyplot's import (about 0.5 s) was a tenth of sample.py's run, and the
    # figure needs no backend switching or closing
    import matplotlib
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tpq = score.tpq
    lines = downbeats(score)  # first: a score beyond midistral.limits is refused before any drawing
    with matplotlib.rc_context({"font.size": 15, "axes.titlesize": 18, "legend.fontsize": 14}):
        fig = Figure(figsize=(14, 5), dpi=100)
        ax = fig.subplots()
        colors = matplotlib.colormaps["tab10"]
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
                label=plain_text(t.name + (" (new)" if highlight == i else ""))))
        end = max(score.end(), 1) / tpq
        ax.vlines(lines / tpq, 20, 109, color="0.85", lw=0.5, zorder=0)  # bar lines, one collection
        if start_tick:
            ax.axvline(start_tick / tpq, color="red", lw=1.2, ls="--", label="continuation starts")
        ax.set_xlim(0, end)
        ax.set_ylim(20, 109)
        ax.set_xlabel("quarter notes")
        ax.set_ylabel("pitch")
        ax.set_title(plain_text(title), parse_math=False)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            if len(handles) > MAX_LEGEND:  # an untrained model may write dozens of instruments
                more = len(handles) - MAX_LEGEND + 1
                handles, labels = handles[:MAX_LEGEND - 1] + [Patch(alpha=0)], labels[:MAX_LEGEND - 1] + [
                    f"+{more} more"]
            legend = ax.legend(handles, labels, loc="upper right", ncol=-(-len(handles) // 8),
                               fontsize=None if len(handles) <= 8 else "small")
            for text in legend.get_texts():
                text.set_parse_math(False)
        with warnings.catch_warnings():  # a tall legend: the layout stays as it is, which is fine
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
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
