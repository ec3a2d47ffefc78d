"""The embedded default data set: music21's Bach chorales, converted to MIDI once and cached.

music21 ships the chorales as MusicXML; nothing is downloaded. Each part gets its own woodwind program
(soprano flute, alto oboe, tenor clarinet, bass bassoon) so a chorale is a four-track piece, and the
voices stay distinct tokens instead of merging into one piano track.

`data.ensembles` (a share in [0, 1]) gives pieces and their transposed copies another ensemble when they are
prepared: one General MIDI program per voice, drawn from that voice's pool below (instruments whose range
covers the voice's usual tessitura), seeded by the file name and the copy, so the model learns which
instruments play which role and can add a cello or a bass to a melody and inner voices. The cached MIDI
files keep the winds.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import symusic
from tqdm import tqdm

from midistral.io import atomic_path

VOICE_PROGRAMS = [73, 68, 71, 70]  # flute, oboe, clarinet, bassoon

# Per voice (soprano, alto, tenor, bass): programs whose range covers the voice's usual tessitura in the chorales
# (about D4-F5, A3-C5, D3-G4, E2-D4; tests/test_data.py checks them against instrument ranges).
VOICE_POOLS = (
    (73, 68, 40, 56, 71, 64),      # flute, oboe, violin, trumpet, clarinet, soprano sax
    (71, 41, 60, 40, 69, 65),      # clarinet, viola, French horn, violin, English horn, alto sax (not oboe: Bb3 up)
    (71, 41, 60, 42, 57, 70, 66),  # clarinet, viola, French horn, cello, trombone, bassoon, tenor sax
    (70, 42, 43, 32, 33, 58, 57),  # bassoon, cello, contrabass, acoustic bass, electric bass, tuba, trombone
)


def _roles(n: int) -> list[int]:
    """The voices (0 soprano .. 3 bass) of n parts from the highest to the lowest: S; S B; S A B; S A T B."""
    return {1: [0], 2: [0, 3], 3: [0, 1, 3], 4: [0, 1, 2, 3]}[n]


def draw_ensemble(name: str, copy: int, seed: int = 0, voices: int = 4) -> list[int]:
    """One program per voice, highest part first: distinct, each from its voice's pool; deterministic in
    (file name, copy: 0 the piece itself, 1.. its transposed copies, seed)."""
    rng = _rng(name, copy, seed, 1)
    chosen: list[int] = []
    for role in _roles(voices):
        pool = [p for p in VOICE_POOLS[role] if p not in chosen]
        chosen.append(int(pool[rng.integers(len(pool))]))
    return chosen


def _rng(name: str, copy: int, seed: int, stream: int):
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, h, copy, stream])


def ensemble_for(score, name: str, copy: int, share: float, seed: int = 0) -> list[int] | None:
    """The programs to give `score`'s tracks (in track order) for this copy, or None to keep them: a drawn
    ensemble for a `share` of the copies (seeded like the draw), for pieces of 1 to 4 pitched tracks and no
    drums; the parts' voices are ranked by mean pitch."""
    if share <= 0 or _rng(name, copy, seed, 0).random() >= share:
        return None
    tracks = list(score.tracks)
    if not 1 <= len(tracks) <= 4 or any(t.is_drum or not len(t.notes) for t in tracks):
        return None
    mean = [float(t.notes.numpy()["pitch"].mean()) for t in tracks]
    by_height = sorted(range(len(tracks)), key=lambda i: (-mean[i], i))
    drawn = draw_ensemble(name, copy, seed, len(tracks))
    programs = [0] * len(tracks)
    for rank, i in enumerate(by_height):
        programs[i] = drawn[rank]
    return programs


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDISTRAL_CACHE", Path.home() / ".cache" / "midistral")) / "chorales"


def _convert(args) -> str | None:
    src, dst = args
    from music21 import corpus  # optional and heavy: only when converting the corpus

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = corpus.parse(src)
            with atomic_path(dst) as tmp:
                score.write("midi", fp=str(tmp))
                s = symusic.Score.from_midi(tmp.read_bytes())
                voices = [t for t in s.tracks if len(t.notes)]
                for i, t in enumerate(voices):
                    t.program = VOICE_PROGRAMS[min(i, 3)]
                s.tracks = voices
                tmp.write_bytes(s.dumps_midi())
        return None
    except Exception as e:  # a chorale music21 cannot parse is skipped, not fatal
        return f"{src}: {e.__class__.__name__}: {e}"


def chorale_midis(cache_dir: str | Path | None = None, max_files: int = 0, workers: int = 0) -> tuple[list[Path], list[str]]:
    """Paths of the chorales as MIDI (converting what is missing, in parallel), and conversion errors."""
    from music21 import corpus

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    by_stem: dict[str, Path] = {}  # some chorales ship in two formats: one MIDI per chorale, MusicXML preferred
    for p in sorted(Path(p) for p in corpus.getComposer("bach")):
        rank = {".mxl": 0, ".xml": 1, ".krn": 2}.get(p.suffix)
        if rank is not None and (p.stem not in by_stem or rank < {".mxl": 0, ".xml": 1, ".krn": 2}[by_stem[p.stem].suffix]):
            by_stem[p.stem] = p
    sources = [by_stem[k] for k in sorted(by_stem)]
    if max_files:
        sources = sources[:max_files]
    jobs = [(str(s), str(cache / (s.stem + ".mid"))) for s in sources]
    todo = [j for j in jobs if not Path(j[1]).is_file()]
    errors = []
    if todo:
        w = workers or os.cpu_count() or 1
        with ProcessPoolExecutor(w) as ex:
            for err in tqdm(ex.map(_convert, todo, chunksize=4), total=len(todo), desc="chorales -> MIDI",
                            disable=len(todo) < 20):
                if err:
                    errors.append(err)
    return [Path(d) for _, d in jobs if Path(d).is_file()], errors
