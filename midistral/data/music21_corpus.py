"""The multi-style corpus: every score in music21's corpus, converted to MIDI once and cached, with a style each.

music21 ships about 3,200 files (MusicXML, Humdrum `.krn`, ABC, RomanText); nothing is downloaded. Each file is
parsed by music21 and written as MIDI; an ABC collection (an Opus: folk-tune books with hundreds of tunes) gives
one MIDI file per tune. A file whose tunes are the voices of one piece (Josquin's ABC files: Cantus, Altus,
Tenor, Bassus as separate tunes) is merged into one score first.

Cache: CACHE/SOURCE_PATH/NNNN.mid (one per piece) and CACHE/SOURCE_PATH.json, the record of that source written
last and atomically (its pieces and the tunes that failed). A source with a record is never converted again;
one without (killed mid-way) is converted again from scratch.

The style of a piece is that of its music21 folder (STYLE_OF_FOLDER; docs/data.md explains the grouping).
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import symusic
from tqdm import tqdm

from midistral.errors import DataError
from midistral.io import atomic_path, atomic_write_json

STYLES = ("bach", "renaissance", "folk", "classical")

STYLE_OF_FOLDER = {
    # Bach (chorales, the rest of his music21 files) and the other baroque composers
    "bach": "bach", "cpebach": "bach", "handel": "bach", "corelli": "bach",
    # vocal polyphony before 1600: Palestrina's masses, the Italian trecento, Ciconia, Josquin, Monteverdi's madrigals
    "palestrina": "renaissance", "trecento": "renaissance", "ciconia": "renaissance", "luca": "renaissance",
    "lusitano": "renaissance", "josquin": "renaissance", "monteverdi": "renaissance",
    # folk-tune collections (ABC)
    "airdsAirs": "folk", "essenFolksong": "folk", "oneills1850": "folk", "ryansMammoth": "folk", "miscFolk": "folk",
    "nottingham-dataset": "folk",
    # concert music after the baroque: quartets, piano and songs, ragtime and lead sheets
    "beethoven": "classical", "haydn": "classical", "mozart": "classical", "schubert": "classical",
    "schumann_clara": "classical", "schumann_robert": "classical", "chopin": "classical", "weber": "classical",
    "verdi": "classical", "beach": "classical", "schoenberg": "classical", "webern": "classical",
    "joplin": "classical", "johnson_j_r": "classical", "liliuokalani": "classical", "leadSheet": "classical",
}
NOT_MUSIC = {"demos": "a music21 demonstration file, not a piece",
             "theoryExercises": "a music21 theory exercise, not a piece"}
TUNES_ARE_VOICES = {"josquin"}  # folders whose ABC tunes are the parts of one piece
# one file per piece: where a piece ships in several formats, the first of these wins
# Bumped when the conversion changes: a cached source of another version is converted again, unless none of its
# tunes failed (the changes so far only touch tunes that failed).
CONVERTER_VERSION = 2
TASKS_PER_WORKER = 50  # source files a conversion process takes before a fresh one replaces it
FORMAT_RANK = {".mxl": 0, ".musicxml": 1, ".xml": 2, ".krn": 3, ".abc": 4}


def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDISTRAL_CACHE", Path.home() / ".cache" / "midistral")) / "music21"


def style_of(rel: str) -> str | None:
    """The style of a corpus path relative to the corpus root (None: not a piece or an unmapped folder)."""
    return STYLE_OF_FOLDER.get(rel.split("/", 1)[0])


def list_sources(root: Path | None = None) -> tuple[list[str], list[dict]]:
    """The corpus files to convert (relative paths, one format per piece) and the files left out, with why."""
    from music21 import corpus

    root = root or corpus_root()
    best: dict[str, str] = {}
    skipped = []
    for p in sorted(str(Path(p).relative_to(root)) for p in corpus.corpora.CoreCorpus().getPaths()):
        folder, suffix = p.split("/", 1)[0], Path(p).suffix.lower()
        if folder in NOT_MUSIC:
            skipped.append({"file": p, "reason": NOT_MUSIC[folder]})
        elif suffix not in FORMAT_RANK:
            what = "a Roman-numeral analysis" if suffix == ".rntxt" else f"format {suffix}"
            skipped.append({"file": p, "reason": f"{what}, not a score"})
        elif style_of(p) is None:
            skipped.append({"file": p, "reason": f"music21 folder {folder!r} has no style"})
        else:
            key = str(Path(p).with_suffix(""))
            if key in best:
                keep, drop = sorted((best[key], p), key=lambda q: FORMAT_RANK[Path(q).suffix.lower()])
                skipped.append({"file": drop, "reason": f"the same piece as {keep}"})
                best[key] = keep
            else:
                best[key] = p
    return sorted(best.values()), skipped


def _pieces_of(parsed, rel: str) -> list[tuple[str, object]]:
    """(label, score) per piece of a parsed file: the score, or each tune of an Opus (merged if voices)."""
    from music21 import stream

    if not isinstance(parsed, stream.Opus):
        return [(rel, parsed)]
    if rel.split("/", 1)[0] in TUNES_ARE_VOICES:
        return [(rel, parsed.mergeScores())]
    out = []
    for i, s in enumerate(parsed.scores):
        number = getattr(s.metadata, "number", None) if s.metadata is not None else None
        out.append((f"{rel}#{number or i + 1}", s))
    return out


def _drop_repeated_time_signatures(score) -> None:
    """Keep each time-signature object in the first measure that holds it: music21's ABC reader can put one
    object into several measures, and its MIDI writer then refuses to insert it twice (3 of the first 12 of
    O'Neill's tunes, about 1 tune in 10 of the Essen collection)."""
    from music21 import meter, stream

    seen = set()
    for measure in score.recurse().getElementsByClass(stream.Measure):
        for ts in list(measure.getElementsByClass(meter.TimeSignature)):
            if id(ts) in seen:
                measure.remove(ts)
            seen.add(id(ts))


def _write_midi(score, dst: Path) -> None:
    """`score` as MIDI at `dst` (atomically), without empty tracks; a score without notes is an error."""
    from music21.exceptions21 import StreamException

    with atomic_path(dst) as tmp:
        try:
            score.write("midi", fp=str(tmp))
        except StreamException:
            _drop_repeated_time_signatures(score)
            score.write("midi", fp=str(tmp))
        s = symusic.Score.from_midi(tmp.read_bytes())
        s.tracks = [t for t in s.tracks if len(t.notes)]
        if not s.tracks:
            raise ValueError("no notes")
        tmp.write_bytes(s.dumps_midi())


def convert_source(args) -> dict:
    """Worker: convert one corpus file into CACHE/REL/NNNN.mid files; returns (and stores) its record."""
    rel, root, cache = args
    from music21 import converter

    record_path = Path(cache) / (rel + ".json")
    record = {"source": rel, "converter": CONVERTER_VERSION, "pieces": [], "skipped": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pieces = _pieces_of(converter.parse(str(Path(root) / rel), forceSource=True, storePickle=False), rel)
    except Exception as e:  # a file music21 cannot parse is reported, not fatal
        record["skipped"].append({"file": rel, "reason": f"music21 cannot parse it ({e.__class__.__name__}: {e})"[:300]})
        pieces = []
    for i, (label, score) in enumerate(pieces):
        name = f"{rel}/{i:04d}.mid"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _write_midi(score, Path(cache) / name)
            record["pieces"].append({"piece": label, "midi": name})
        except Exception as e:  # one tune that cannot be written is skipped, the others kept
            record["skipped"].append({"file": label, "reason": f"not convertible to MIDI ({e.__class__.__name__}: {e})"[:300]})
    atomic_write_json(record_path, record, indent=None)
    return record


def _cached_record(cache: Path, rel: str) -> dict | None:
    try:
        rec = json.loads((cache / (rel + ".json")).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("converter") != CONVERTER_VERSION and rec.get("skipped"):
        return None  # another version failed some of its tunes: convert the source again
    if not all((cache / p["midi"]).is_file() for p in rec.get("pieces", [])):
        return None  # a piece file went missing: convert the source again
    return rec


def music21_midis(cache_dir: str | Path | None = None, max_files: int = 0, workers: int = 0,
                  progress: bool = True) -> tuple[list[tuple[Path, str]], list[dict]]:
    """(MIDI path, style) of every piece of the corpus (converting what is not cached, in parallel processes),
    and the skip report: every file or tune left out, with the reason. `max_files` > 0: that many source
    files, taken from the styles in turn."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    root = corpus_root()
    sources, skipped = list_sources(root)
    if max_files:  # the first files of every style in turn: a small run still has all the styles
        by_style = [[s for s in sources if style_of(s) == st] for st in STYLES]
        sources = sorted([s for k in range(len(sources)) for group in by_style if k < len(group)
                          for s in group[k:k + 1]][:max_files])
    records = {rel: _cached_record(cache, rel) for rel in sources}
    todo = sorted((r for r, rec in records.items() if rec is None),
                  key=lambda r: -(root / r).stat().st_size if (root / r).is_file() else 0)
    if todo:  # largest first, so that a big collection does not finish last alone
        w = workers or os.cpu_count() or 1
        jobs = [(r, str(root), str(cache)) for r in todo]
        if w > 1:
            # music21 keeps caches: a fresh pool of workers every TASKS_PER_WORKER files each (not the pool's
            # own max_tasks_per_child: on Python 3.11 the pool hangs for good once it replaces a worker)
            batch = w * TASKS_PER_WORKER
            try:
                with tqdm(total=len(jobs), desc="music21 -> MIDI", disable=not progress) as bar:
                    for start in range(0, len(jobs), batch):
                        with ProcessPoolExecutor(w) as ex:
                            futures = [ex.submit(convert_source, job) for job in jobs[start:start + batch]]
                            for future in as_completed(futures):
                                rec = future.result()
                                records[rec["source"]] = rec
                                bar.update()
            except BrokenProcessPool:
                raise DataError("music21 corpus: a conversion process died (out of memory?); run again with fewer "
                                "data.workers: what was converted is cached") from None
        else:
            for job in tqdm(jobs, desc="music21 -> MIDI", disable=not progress):
                records[job[0]] = convert_source(job)
    pieces = []
    for rel in sources:
        rec = records[rel]
        skipped += rec["skipped"]
        pieces += [(cache / p["midi"], style_of(rel)) for p in rec["pieces"]]
    return pieces, skipped
