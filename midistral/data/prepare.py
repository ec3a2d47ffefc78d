"""Prepare a corpus: MIDI files -> filtered, deduplicated, split, tokenized (BPE) flat token shards.

    OUT/data/{train,val,test}.bin     all pieces' ids back to back (uint16, or uint32 for big vocabularies)
    OUT/data/{train,val,test}.idx.npy piece boundaries: offsets into .bin, one more than pieces
    OUT/data/tokenizer.json           the tokenizer (BPE learned on the train split only)
    OUT/data/copy_index.npz           the training split's bars (midistral.metrics.CopyIndex: the copying check)
    OUT/data/manifest.json            the config it was made with (and its fingerprint), counts, shard sizes,
                                      every skipped file, each file's style, the training split's instruments

Re-running with the same data config reuses what is there; another config prepares the folder again.
The manifest is removed first and written last, every other file is written atomically, and the folder is
locked while it is written: a preparation killed at any point leaves no manifest, so the next run
prepares again (the same shards: every step is deterministic) and nothing half-written is ever used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from midistral.config import DataConfig, RunConfig
from midistral.data.chorales import chorale_midis
from midistral.data.dataset import DATA_FORMAT, read_manifest
from midistral.data.ensembles import ensemble_for
from midistral.data.music21_corpus import default_cache_dir as music21_cache_dir
from midistral.data.music21_corpus import music21_midis
from midistral.errors import ConfigError, DataError, MidistralError
from midistral.io import (
    RunLock,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temps,
)
from midistral.metrics import COPY_INDEX_FILE, CopyIndex, bar_hashes
from midistral.tokenize import REMI, REMIConfig, load_score
from midistral.tokenize.bpe import BPE

SPLITS = ("train", "val", "test")


def prepared_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.prepared_dir or Path(cfg.out_dir) / "data")


def find_midi_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())


def _read_piece(args):
    """Worker: read one file, apply the filters; return (bars of base ids per version, stats, the programs the
    versions play) or an error."""
    path, tok_dict, filters, shifts, ens = args
    try:
        tok = REMI.from_dict_cached(tok_dict)
        score = load_score(path)  # size, note and track bounds checked there (midistral.limits)
        if filters["only_4_4"] and any((t.numerator, t.denominator) != (4, 4) for t in score.time_signatures):
            return path, None, "not 4/4 throughout"
        n_notes = score.note_num()
        if n_notes < filters["min_notes"]:
            return path, None, f"{n_notes} notes (< min_notes={filters['min_notes']})"
        first = _orchestrated(score, path, 0, ens)
        bars = tok.base_ids_by_bar(first)
        if filters["max_bars"] and len(bars) > filters["max_bars"]:
            return path, None, f"{len(bars)} bars (> max_bars={filters['max_bars']})"
        versions, programs = [bars], _programs(first)
        for copy, s in enumerate(shifts, 1):  # transposed copies (drums never shift), then ensemble copies
            t = _orchestrated(score, path, copy, ens)
            if t is score and s == 0:  # an ensemble copy that drew no ensemble: the piece again, not kept
                continue
            t = score.copy() if t is score else t
            for tr in t.tracks:
                if not tr.is_drum:
                    tr.shift_pitch(int(s), inplace=True)  # (without inplace symusic returns a copy)
            try:
                versions.append(tok.base_ids_by_bar(t))
                programs |= _programs(t)
            except MidistralError:
                pass
        return path, (versions, _stats(score, len(bars)), sorted(programs), bar_hashes(score)), None
    except MidistralError as e:
        return path, None, str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)
    except OSError as e:
        return path, None, f"cannot be read ({e.strerror})"


def _programs(score) -> set[int]:
    """The programs of the tracks that play (-1 for drums, as midistral.metrics names them)."""
    return {-1 if t.is_drum else int(t.program) for t in score.tracks if len(t.notes)}


def _orchestrated(score, path: str, copy: int, ens: tuple[float, int, bool, str]):
    """`score` itself, or a copy with the ensemble data.ensembles draws for this file (named ens[3]) and copy."""
    share, seed, general, name = ens
    programs = ensemble_for(score, name, copy, share, seed, general)
    if programs is None:
        return score
    out = score.copy()
    for tr, p in zip(out.tracks, programs):
        tr.program = p
    return out


def _stats(score, n_bars: int) -> dict:
    tempos = [t.qpm for t in score.tempos] or [120.0]
    secs = max(score.to("second").end(), 1e-6)
    return {"bars": n_bars, "tempo": float(np.median(tempos)), "instruments": len([t for t in score.tracks if len(t.notes)]),
            "notes_per_second": score.note_num() / secs}


def _quiet_config(params: dict) -> REMIConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return REMIConfig(**params)


# data keys the loader applies on the fly (data/mixes.py): the shards do not depend on them
LOADER_KEYS = ("infill", "infill_max_bars", "fim_layout", "attributes", "style", "style_repeats")


def made_with(cfg: RunConfig) -> tuple[dict, str]:
    """What the shards depend on (the data and tokenizer config) and its fingerprint."""
    want = {"data": {k: v for k, v in dataclasses.asdict(cfg.data).items()
                     if k not in ("workers", "prepared_dir", *LOADER_KEYS)
                     and not (k in ("ensembles", "ensemble_copies") and v == 0)},  # off: fingerprints as before
            "tokenizer": _quiet_config(cfg.tokenizer_params).to_dict()}
    want = json.loads(json.dumps(want))  # the JSON form, as the manifest holds it
    return want, hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]


def list_files(d: DataConfig, progress: bool = True) -> tuple[list[Path], list[dict], dict[str, str]]:
    """The corpus' MIDI files, the files left out (chorales or music21 scores that could not be converted),
    and each file's style (music21's corpus, the chorales; none for a folder)."""
    styles: dict[str, str] = {}
    if d.source == "music21":
        found, skipped = music21_midis(d.cache_dir or None, d.max_files, d.workers, progress)
        files = [f for f, _ in found]
        styles = {str(f): style for f, style in found}
    elif d.source == "chorales" and not d.dir:
        files, errors = chorale_midis(d.cache_dir or None, d.max_files, d.workers)
        skipped = [{"file": e.split(":")[0], "reason": e} for e in errors]
        styles = {str(f): "bach" for f in files}
    elif d.source in ("folder", "chorales"):
        if not d.dir:
            raise ConfigError("data.dir is empty: point it at a folder of MIDI files (or use data.source=\"chorales\")")
        folder = Path(d.dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.dir {str(folder)!r}: no such folder")
        files, skipped = find_midi_files(folder), []
        if d.max_files:
            files = files[: d.max_files]
    else:
        raise ConfigError(f"data.source={d.source!r}: expected 'folder', 'chorales' or 'music21'")
    if not files:
        raise ConfigError(f"data: no .mid/.midi files found (dir={d.dir!r}, source={d.source!r})")
    return files, skipped, styles


def drop_duplicates(files: list[Path], skipped: list[dict]) -> list[Path]:
    """Files with distinct contents (the first of each), unreadable and duplicate ones added to `skipped`."""
    seen, unique = {}, []
    for f in files:
        try:
            h = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        except OSError as e:
            skipped.append({"file": str(f), "reason": f"cannot be read ({e.strerror})"})
            continue
        if h in seen:
            skipped.append({"file": str(f), "reason": f"duplicate of {seen[h]}"})
            continue
        seen[h] = str(f)
        unique.append(f)
    return unique


def split_by_style(files: list[Path], styles: dict[str, str], d: DataConfig) -> dict[str, str]:
    """`split_files` within each style (files without a style form one group): every style gets its share
    of validation and test pieces. One style (the chorales) or none (a folder) splits as split_files."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(styles.get(str(f), ""), []).append(f)
    split_of: dict[str, str] = {}
    for style in sorted(groups):
        split_of.update(split_files(groups[style], d))
    return split_of


def split_files(files: list[Path], d: DataConfig) -> dict[str, str]:
    """A seeded split by file: path -> "train" | "val" | "test"."""
    order = np.random.default_rng(d.seed).permutation(len(files))
    fr = np.asarray(d.split, dtype=float)
    fr = fr / fr.sum()
    n_val, n_test = int(round(fr[1] * len(files))), int(round(fr[2] * len(files)))
    if len(files) >= 3:
        n_val, n_test = max(n_val, 1 if fr[1] else 0), max(n_test, 1 if fr[2] else 0)
    return {str(files[i]): "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            for rank, i in enumerate(order)}


def _draw_name(f: Path, d: DataConfig) -> str:
    """The name an ensemble draw is seeded with: the file name, or its place in the music21 cache (whose
    files are named by their number within their source), the same on every machine."""
    if d.source != "music21":
        return f.name
    cache = Path(d.cache_dir) if d.cache_dir else music21_cache_dir()
    try:
        return str(Path(f).relative_to(cache))
    except ValueError:
        return f.name


def tokenize_files(files: list[Path], split_of: dict, tok: REMI, d: DataConfig, progress: bool):
    """Read, filter and base-tokenize every file in parallel: (pieces per split, stats, skipped, the training
    split's programs: program -> how many training files play it in any version, the training files' bars)."""
    filters = {k: getattr(d, k) for k in ("only_4_4", "max_bars", "min_notes")}
    lo, hi = d.transpose
    jobs = []
    for f in files:
        shifts = []
        if split_of[str(f)] == "train" and d.transpose_copies and (lo or hi):
            choices = [s for s in range(int(lo), int(hi) + 1) if s != 0]
            frng = np.random.default_rng([d.seed, int(hashlib.sha256(str(f).encode()).hexdigest()[:8], 16)])
            shifts = frng.choice(choices, size=min(d.transpose_copies, len(choices)), replace=False).tolist()
        if split_of[str(f)] == "train" and d.ensembles:
            shifts += [0] * d.ensemble_copies  # copies in other drawn ensembles, pitches unchanged
        jobs.append((str(f), tok.to_dict(), filters, shifts, (d.ensembles, d.seed, d.source == "music21",
                                                              _draw_name(f, d))))
    workers = d.workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) >= 8 else None
    it = pool.map(_read_piece, jobs, chunksize=4) if pool else map(_read_piece, jobs)
    pieces, stats, skipped, programs, train_bars = {s: [] for s in SPLITS}, [], [], {}, []
    for path, res, err in tqdm(it, total=len(jobs), desc="tokenize", disable=not progress):
        if err:
            skipped.append({"file": path, "reason": err})
            continue
        pieces[split_of[path]].append((path, res[0]))
        stats.append(res[1])
        if split_of[path] == "train":
            train_bars.append(res[3])
            for p in res[2]:
                programs[p] = programs.get(p, 0) + 1
    if pool:
        pool.shutdown()
    return pieces, stats, skipped, {str(p): programs[p] for p in sorted(programs)}, CopyIndex.from_bars(train_bars)


def write_shards(out: Path, tok: REMI, pieces: dict, styles: dict[str, str]) -> tuple[dict, dict, str]:
    """Each split's .bin and .idx.npy (atomically): (counts per split, shard sizes and hashes, dtype name).
    With styles, each split also lists its files' styles and each piece's (`piece_styles`, in shard order)."""
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    counts, shards = {}, {}
    for s in SPLITS:
        seqs = [v for _, versions in pieces[s] for v in versions]
        if tok.bpe is not None:
            ids = tok.bpe.encode_pieces(seqs) if seqs else []
        else:
            ids = [np.concatenate(b) if b else np.zeros(0, np.int64) for b in seqs]
        offsets = np.r_[0, np.cumsum([len(x) for x in ids])].astype(np.int64)
        flat = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
        with atomic_path(out / f"{s}.idx.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, offsets)
        for name, data in ((f"{s}.bin", flat.tobytes()), (f"{s}.idx.npy", (out / f"{s}.idx.npy").read_bytes())):
            if name.endswith(".bin"):
                atomic_write_bytes(out / name, data)
            shards[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        counts[s] = {"files": len(pieces[s]), "pieces": len(seqs), "tokens": int(offsets[-1]),
                     "files_list": [p for p, _ in pieces[s]]}
        if styles:
            counts[s]["styles_list"] = [styles[p] for p, _ in pieces[s]]
            counts[s]["piece_styles"] = [styles[p] for p, versions in pieces[s] for _ in versions]
            counts[s]["piece_offsets"] = offsets
    return counts, shards, np.dtype(dtype).name


def style_counts(counts: dict) -> dict:
    """Per style and split: files, pieces and tokens."""
    out: dict[str, dict] = {}
    for s in SPLITS:
        c = counts[s]
        lengths = np.diff(c["piece_offsets"]) if "piece_offsets" in c else []
        for style in sorted(set(c["styles_list"])):
            out.setdefault(style, {x: {"files": 0, "pieces": 0, "tokens": 0} for x in SPLITS})
        for style in c["styles_list"]:
            out[style][s]["files"] += 1
        for style, n in zip(c["piece_styles"], lengths):
            out[style][s]["pieces"] += 1
            out[style][s]["tokens"] += int(n)
    return out


def is_prepared(out: Path, fingerprint: str) -> bool:
    """The folder holds whole shards made with this config (a manifest of another config or version: no)."""
    try:
        man = read_manifest(out)
    except DataError:
        return False
    if man.get("fingerprint") != fingerprint:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == info["bytes"]
               for name, info in man["shards"].items())


def prepare(cfg: RunConfig, progress: bool = True) -> Path:
    """Prepare cfg's corpus into prepared_dir(cfg) (or reuse it); returns the folder."""
    d, out = cfg.data, prepared_dir(cfg)
    want, fingerprint = made_with(cfg)
    if is_prepared(out, fingerprint):
        return out
    with RunLock(out, wait=True, what="a data preparation"):  # a second run on the same folder waits, then reuses
        if is_prepared(out, fingerprint):
            return out
        if (out / "manifest.json").exists():
            print(f"note: {out} was prepared with another data config; preparing it again", file=sys.stderr)
            (out / "manifest.json").unlink()  # from here until the end the folder is "not prepared"
        remove_stale_temps(out)
        files, skipped, styles = list_files(d, progress)
        unique = drop_duplicates(files, skipped)
        split_of = split_by_style(unique, styles, d)
        tok = REMI(_quiet_config(cfg.tokenizer_params))
        pieces, stats, bad, programs, copy_index = tokenize_files(unique, split_of, tok, d, progress)
        skipped += bad
        if not pieces["train"]:
            raise DataError(f"data: no usable training piece among {len(files)} files (see the skipped reasons)")
        if d.bpe_vocab_size:  # BPE learned on the train split only
            special = [tok.vocab[f"{s}_None"] for s in tok.config.special_tokens]
            train_bars = [v for _, versions in pieces["train"] for v in versions]
            tok.bpe = BPE.train(train_bars, len(tok.vocab), d.bpe_vocab_size, special_ids=special,
                                show_progress=progress and len(train_bars) >= 200, length=len(train_bars))
        counts, shards, dtype = write_shards(out, tok, pieces, styles)
        by_style = style_counts(counts) if styles else None
        for c in counts.values():
            c.pop("piece_offsets", None)
        tok.save(out / "tokenizer.json")
        with atomic_path(out / COPY_INDEX_FILE) as tmp:
            with open(tmp, "wb") as fh:
                copy_index.save(fh)
        atomic_write_json(out / "stats.json", stats, indent=None)
        warnings = [f"the {s} split kept none of its {sum(v == s for v in split_of.values())} files: training "
                    "needs a validation piece (add files, or change data.split or the filters)"
                    for s in ("val",) if not pieces[s]]
        atomic_write_json(out / "manifest.json", {
            **DATA_FORMAT, "made_with": want, "fingerprint": fingerprint, "vocab_size": len(tok), "dtype": dtype,
            "files_found": len(files), "counts": counts, "shards": shards, "skipped": skipped, "warnings": warnings,
            "programs": programs, **({"styles": by_style} if by_style else {}),
        })
    for w in warnings:
        print(f"warning: {out}: {w}", file=sys.stderr)
    if progress:
        tot = {s: counts[s]["tokens"] for s in SPLITS}
        print(f"prepared {out}: {len(files)} files, {sum(c['files'] for c in counts.values())} kept, "
              f"{len(skipped)} skipped; tokens {tot}; vocab {len(tok)}")
        for style, row in (by_style or {}).items():
            print(f"  {style}: " + "; ".join(f"{s} {row[s]['files']} files, {row[s]['pieces']} pieces, "
                                             f"{row[s]['tokens']} tokens" for s in SPLITS))
        for kind, n in skip_summary(skipped):
            print(f"  skipped {n}: {kind}")
    return out


def skip_summary(skipped: list[dict]) -> list[tuple[str, int]]:
    """The skip report by kind of reason (the reason up to its first detail), most frequent first."""
    kinds: dict[str, int] = {}
    for s in skipped:
        kind = re.sub(r"\b\d+\b", "N", re.split(r" \(| of | as |: ", s["reason"], maxsplit=1)[0])
        kinds[kind] = kinds.get(kind, 0) + 1
    return sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
