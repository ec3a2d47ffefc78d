"""The embedded default data set: music21's Bach chorales, converted to MIDI once and cached.

music21 ships the chorales as MusicXML; nothing is downloaded. Each part gets its own woodwind program
(soprano flute, alto oboe, tenor clarinet, bass bassoon) so a chorale is a four-track piece, and the
voices stay distinct tokens instead of merging into one piano track.

`data.ensembles` (a share in [0, 1]) gives pieces and their transposed copies another ensemble when they are
prepared (midistral/data/ensembles.py: one General MIDI program per voice from that voice's pool). The cached
MIDI files keep the winds.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import symusic
from tqdm import tqdm

from midistral.data.ensembles import VOICE_POOLS, draw_ensemble, ensemble_for  # noqa: F401 (their old home)
from midistral.io import atomic_path

VOICE_PROGRAMS = [73, 68, 71, 70]  # flute, oboe, clarinet, bassoon


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDISTRAL_CACHE", Path.home() / ".cache" / "midistral")) / "chorales"


def write_midi_consuming(score, path) -> None:
    """`score.write("midi")` for a score that is dropped afterwards: music21's MIDI writer deep-copies the whole
    score to expand its repeats, two thirds of the write (a chorale: 109 -> 69 ms; the 410 chorales' conversion
    36 -> 25 s on 2 cores). Its repeat expander offers `process(deepcopy=False)` for exactly this case, "a source
    stream ... discarded later"; the written files are byte-identical (tests/test_data.py)."""
    from music21 import repeat

    process = repeat.Expander.process
    repeat.Expander.process = lambda self, deepcopy=True: process(self, deepcopy=False)
    try:
        score.write("midi", fp=str(path))
    finally:
        repeat.Expander.process = process


def _convert(args) -> str | None:
    src, dst = args
    from music21 import corpus  # optional and heavy: only when converting the corpus

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = corpus.parse(src)
            with atomic_path(dst) as tmp:
                write_midi_consuming(score, tmp)
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
