"""Prepare a corpus: MIDI files -> filtered, deduplicated, split, tokenized (BPE) flat token shards.

    OUT/data/{train,val,test}.bin     all pieces' ids back to back (uint16, or uint32 for big vocabularies)
    OUT/data/{train,val,test}.idx.npy piece boundaries: offsets into .bin, one more than pieces
    OUT/data/tokenizer.json           the tokenizer (BPE learned on the train split only)
    OUT/data/manifest.json            the config it was made with, counts, token totals, every skipped file

Re-running with the same data config reuses what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from midistral.errors import ConfigError, MidistralError
from midistral.io import atomic_path, atomic_write_json

SPLITS = ("train", "val", "test")


def prepared_dir(cfg: dict) -> Path:
    return Path(cfg["data"]["prepared_dir"] or Path(cfg["out_dir"]) / "data")


def find_midi_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())


def _read_piece(args):
    """Worker: read one file, apply the filters, return (bars of base ids per transposition, stats) or an error."""
    path, tok_dict, filters, shifts = args
    from midistral.tokenize import REMI, load_score

    try:
        tok = REMI.from_dict_cached(tok_dict)
        score = load_score(path)
        if filters["only_4_4"] and any((t.numerator, t.denominator) != (4, 4) for t in score.time_signatures):
            return path, None, "not 4/4 throughout"
        n_notes = score.note_num()
        if n_notes < filters["min_notes"]:
            return path, None, f"{n_notes} notes (< min_notes={filters['min_notes']})"
        bars = tok.base_ids_by_bar(score)
        if filters["max_bars"] and len(bars) > filters["max_bars"]:
            return path, None, f"{len(bars)} bars (> max_bars={filters['max_bars']})"
        versions = [bars]
        for s in shifts:  # transposed copies; drums never shift
            t = score.copy()
            for tr in t.tracks:
                if not tr.is_drum:
                    tr.shift_pitch(int(s))
            try:
                versions.append(tok.base_ids_by_bar(t))
            except MidistralError:
                pass
        stats = _stats(score, len(bars))
        return path, (versions, stats), None
    except MidistralError as e:
        return path, None, str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)


def _stats(score, n_bars: int) -> dict:
    tempos = [t.qpm for t in score.tempos] or [120.0]
    secs = max(score.to("second").end(), 1e-6)
    return {"bars": n_bars, "tempo": float(np.median(tempos)), "instruments": len([t for t in score.tracks if len(t.notes)]),
            "notes_per_second": score.note_num() / secs}


def _quiet_config(params: dict):
    import warnings

    from midistral.tokenize import REMIConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return REMIConfig(**params)


def prepare(cfg: dict, progress: bool = True) -> Path:
    from tqdm import tqdm

    from midistral.tokenize import REMI
    from midistral.config import tokenizer_params

    d = cfg["data"]
    out = prepared_dir(cfg)
    want = {"data": {k: v for k, v in d.items() if k not in ("workers", "prepared_dir")},
            "tokenizer": _quiet_config(tokenizer_params(cfg)).to_dict()}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("made_with") == json.loads(json.dumps(want)) and all((out / f"{s}.bin").is_file() for s in SPLITS):
                return out
        except ValueError:
            pass

    # 1. the files
    skipped: list[dict] = []
    if d["source"] == "chorales" and not d["dir"]:
        from midistral.data.chorales import chorale_midis

        files, errors = chorale_midis(d["cache_dir"] or None, d["max_files"], d["workers"])
        skipped += [{"file": e.split(":")[0], "reason": e} for e in errors]
    elif d["source"] in ("folder", "chorales"):
        if not d["dir"]:
            raise ConfigError("data.dir is empty: point it at a folder of MIDI files (or use data.source=\"chorales\")")
        folder = Path(d["dir"]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.dir {str(folder)!r}: no such folder")
        files = find_midi_files(folder)
        if d["max_files"]:
            files = files[: d["max_files"]]
    else:
        raise ConfigError(f"data.source={d['source']!r}: expected 'folder' or 'chorales'")
    if not files:
        raise ConfigError(f"data: no .mid/.midi files found (dir={d['dir']!r}, source={d['source']!r})")

    # 2. exact duplicates by content
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

    # 3. seeded split by file
    rng = np.random.default_rng(d["seed"])
    order = rng.permutation(len(unique))
    fr = np.asarray(d["split"], dtype=float)
    if len(fr) != 3 or fr.min() < 0 or fr.sum() <= 0:
        raise ConfigError(f"data.split={d['split']!r}: expected three non-negative fractions")
    fr = fr / fr.sum()
    n_val, n_test = int(round(fr[1] * len(unique))), int(round(fr[2] * len(unique)))
    if len(unique) >= 3:
        n_val, n_test = max(n_val, 1 if fr[1] else 0), max(n_test, 1 if fr[2] else 0)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[str(unique[i])] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"

    # 4. read + filter + base-tokenize every file, in parallel
    tok = REMI(_quiet_config(tokenizer_params(cfg)))
    filters = {k: d[k] for k in ("only_4_4", "max_bars", "min_notes")}
    lo, hi = d["transpose"]
    jobs = []
    for f in unique:
        shifts = []
        if split_of[str(f)] == "train" and d["transpose_copies"] and (lo or hi):
            choices = [s for s in range(int(lo), int(hi) + 1) if s != 0]
            frng = np.random.default_rng([d["seed"], int(hashlib.sha256(str(f).encode()).hexdigest()[:8], 16)])
            shifts = frng.choice(choices, size=min(d["transpose_copies"], len(choices)), replace=False).tolist()
        jobs.append((str(f), tok.to_dict(), filters, shifts))
    workers = d["workers"] or os.cpu_count() or 1
    results = []
    it = map(_read_piece, jobs) if workers == 1 or len(jobs) < 8 else ProcessPoolExecutor(workers).map(_read_piece, jobs, chunksize=4)
    for r in tqdm(it, total=len(jobs), desc="tokenize", disable=not progress):
        results.append(r)
    pieces = {s: [] for s in SPLITS}
    stats = []
    for path, res, err in results:
        if err:
            skipped.append({"file": path, "reason": err})
            continue
        versions, st = res
        pieces[split_of[path]].append((path, versions))
        stats.append(st)
    if not pieces["train"]:
        raise MidistralError(f"data: no usable training piece among {len(files)} files (see skipped reasons)")

    # 5. BPE on the train split only, then encode everything
    if d["bpe_vocab_size"]:
        from midistral.tokenize.bpe import BPE

        special = [tok.vocab[f"{s}_None"] for s in tok.config.special_tokens]
        train_bars = [v for _, versions in pieces["train"] for v in versions]
        tok.bpe = BPE.train(train_bars, len(tok.vocab), d["bpe_vocab_size"], special_ids=special,
                            show_progress=progress and len(train_bars) >= 200, length=len(train_bars))
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    counts = {}
    for s in SPLITS:
        seqs = [v for _, versions in pieces[s] for v in versions]
        if tok.bpe is not None:
            ids = tok.bpe.encode_pieces(seqs) if seqs else []
        else:
            ids = [np.concatenate(b) if b else np.zeros(0, np.int64) for b in seqs]
        offsets = np.r_[0, np.cumsum([len(x) for x in ids])].astype(np.int64)
        flat = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
        with atomic_path(out / f"{s}.bin") as tmp:
            flat.tofile(tmp)
        with atomic_path(out / f"{s}.idx.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, offsets)
        counts[s] = {"files": len(pieces[s]), "pieces": len(seqs), "tokens": int(offsets[-1]),
                     "files_list": [p for p, _ in pieces[s]]}
    tok.save(out / "tokenizer.json")
    atomic_write_json(out / "stats.json", stats, indent=None)
    atomic_write_json(manifest_path, {
        "made_with": want, "vocab_size": len(tok), "dtype": np.dtype(dtype).name,
        "files_found": len(files), "counts": counts, "skipped": skipped,
    })
    if progress:
        tot = {s: counts[s]["tokens"] for s in SPLITS}
        print(f"prepared {out}: {len(files)} files, {sum(c['files'] for c in counts.values())} kept, "
              f"{len(skipped)} skipped; tokens {tot}; vocab {len(tok)}")
    return out
