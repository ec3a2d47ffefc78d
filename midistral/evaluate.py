"""Compare generated MIDI with real music: `python -m midistral.evaluate GENERATED_DIR --reference REAL [--out DIR]`.

For each metric of midistral.metrics, the per-piece values of the two sets are smoothed with a Gaussian
kernel density estimate (Scott's bandwidth, as scipy's gaussian_kde and Yang & Lerch 2018) and compared by
the overlapped area OA = integral of min(p_real, p_generated) (1 = identical distributions, 0 = disjoint) and
the KL divergence KL(real || generated). Yang & Lerch's intra-set/inter-set method is applied to the pitch-
class histograms: the distribution of distances between two real pieces is compared with that between a real
and a generated piece (OA near 1: generated pieces are as far from real ones as real ones are from each other).

REAL is a folder of MIDI files, or a training run folder (or its prepared data folder): then the run's test
split, as listed in its data manifest, is the reference.

Copying: per piece, the share of its bars that occur exactly in the training split and its longest run of
consecutive bars copied from one training piece (midistral.metrics.CopyIndex), for the generated pieces and,
as the baseline, for the real ones (cut to the generated pieces' median number of bars). The training split is
that of the `--train` run (or folder of MIDI files), else that of the `--reference` run.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midistral.errors import ArgumentParser, MidistralError
from midistral.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from midistral.metrics import (
    COPY_INDEX_FILE,
    MAX_COPIED_RUN,
    METRICS,
    CopyIndex,
    bar_hashes,
    collect_notes,
    piece_metrics,
)
from midistral.tokenize import load_score

# The metrics the summary line's mean and min are over (the others describe drums, or repeat one of these).
SUMMARY_METRICS = ("pitch_range", "n_pitches_used", "n_pitch_classes_used", "polyphony", "scale_consistency",
                   "pitch_entropy", "pitch_class_entropy", "empty_beat_rate", "groove_consistency")
GRID_POINTS = 2048
KDE_BLOCK = 8192  # points of a set summed at once into its KDE on the grid (memory: grid x block floats)
MIN_BANDWIDTH_SHARE = 0.1  # bandwidths never go below this share of the pooled sd (two constant sets get it)
DENSITY_FLOOR = 1e-12  # keeps KL finite where the generated density underflows


def midi_files(folder: str | Path, what: str) -> list[Path]:
    """The .mid/.midi files under `folder` (recursively); a one-line MidistralError if there are none."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise MidistralError(f"{what} {str(folder)!r}: no such folder")
    if not folder.is_dir():
        raise MidistralError(f"{what} {str(folder)!r}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())
    if not files:
        raise MidistralError(f"{what} {str(folder)!r}: no .mid/.midi files in it")
    return files


def _manifest_of(run: Path) -> Path | None:
    """The data manifest of a run folder, a checkpoint folder inside it, or a prepared data folder."""
    candidates = [run / "manifest.json", run / "data" / "manifest.json"]
    for ckpt in (run, run / "last", run / "best"):
        cfg_file = ckpt / "train_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            prepared = cfg.get("data", {}).get("prepared_dir") or Path(cfg.get("out_dir", run)) / "data"
            candidates.append(Path(prepared) / "manifest.json")
    return next((c for c in candidates if c.is_file()), None)


def reference_files(ref: str | Path, style: str | None = None, split: str = "test") -> tuple[list[Path], str]:
    """The reference pieces and a label: a run's test split (or `split`; of one `style`) if `ref` is a run
    folder, else its MIDI files."""
    ref = Path(ref).expanduser()
    manifest = _manifest_of(ref) if ref.is_dir() else None
    if manifest is None:
        if style:
            raise MidistralError(f"--style {style}: needs a run folder as --reference (its manifest has the styles)")
        return midi_files(ref, "--reference"), str(ref)
    test = json.loads(manifest.read_text()).get("counts", {}).get(split, {})
    files = test.get("files_list", [])
    if style:
        styles = test.get("styles_list", [])
        if style not in styles:
            known = ", ".join(sorted(set(styles))) or "none: the data has no styles"
            raise MidistralError(f"--style {style}: no {split} piece of that style (styles: {known})")
        files = [f for f, s in zip(files, styles) if s == style]
    if not files:
        raise MidistralError(f"{manifest}: the run has no {split} split (data.split gives it no files)")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise MidistralError(f"{manifest}: {split} file {missing[0]!r} is missing ({len(missing)} of {len(files)} missing)")
    return [Path(f) for f in files], f"{split} split of {ref}" + (f", style {style}" if style else "")


def opening(source, bars: int):
    """The first `bars` bars of a piece (bars of its first time signature), or `source` itself if unreadable
    (measure_set then reports it)."""
    try:
        score = load_score(source)
    except MidistralError:
        return source
    ts = score.time_signatures
    num, den = (ts[0].numerator, ts[0].denominator) if len(ts) else (4, 4)
    return score.clip(0, int(bars * score.ticks_per_quarter * 4 * num / den))  # the notes that start in them


def training_index(files) -> CopyIndex:
    """The bars of these MIDI files (unreadable ones left out)."""
    bars = []
    for f in files:
        try:
            bars.append(bar_hashes(load_score(f)))
        except MidistralError:
            continue
    return CopyIndex.from_bars(bars)


def copy_index_for(source, midi_folder: bool = True) -> CopyIndex | None:
    """The training bars of a model, run, checkpoint or prepared data folder (its stored index, else built
    from the training files its manifest lists), or (`midi_folder`) of a folder of MIDI files; else None."""
    source = Path(source).expanduser()
    if not source.is_dir():
        return None
    if (source / COPY_INDEX_FILE).is_file():  # a model folder shipped with its training bars
        return CopyIndex.load(source / COPY_INDEX_FILE)
    manifest = _manifest_of(source)
    if manifest is None:
        if not midi_folder:
            return None
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())
        return training_index(files) if files else None
    if (manifest.parent / COPY_INDEX_FILE).is_file():
        try:
            return CopyIndex.load(manifest.parent / COPY_INDEX_FILE)
        except (OSError, ValueError, KeyError):
            pass  # damaged: built again from the files below
    files = json.loads(manifest.read_text()).get("counts", {}).get("train", {}).get("files_list", [])
    files = [f for f in files if Path(f).is_file()]
    return training_index(files) if files else None


def copying_rows(index: CopyIndex, sources, max_bars: int = 0) -> list[dict]:
    """CopyIndex.copying of every readable piece (its first `max_bars` bars when > 0) plus its bar count."""
    rows = []
    for src in sources:
        try:
            score = load_score(src)
        except MidistralError:
            continue
        rows.append({**index.copying(score, max_bars=max_bars), "bars": len(bar_hashes(score, max_bars=max_bars))})
    return rows


def copying_summary(rows: list[dict]) -> dict:
    """Mean share of copied bars, mean and largest longest run, and the share of pieces with a run of
    MAX_COPIED_RUN bars or more (what sample.py --reject rejects)."""
    if not rows:
        return {"pieces": 0}
    share = np.array([r["copied_bars"] for r in rows])
    runs = np.array([r["copied_run"] for r in rows])
    return {"pieces": len(rows), "copied_bars": float(share.mean()), "mean_run": float(runs.mean()),
            "max_run": float(runs.max()), "copy_share": float((runs >= MAX_COPIED_RUN).mean())}


def compare_copying(index: CopyIndex, gen_files, real_files) -> dict:
    """Copying of the generated pieces, and of the real ones cut to the generated pieces' median length."""
    gen = copying_rows(index, gen_files)
    bars = int(np.median([r["bars"] for r in gen])) if gen else 0
    real = copying_rows(index, real_files, max_bars=max(bars, 1))
    return {"training_pieces": index.n_pieces, "real_bars": bars, "generated": copying_summary(gen),
            "real": copying_summary(real), "per_generated_piece": gen}


def copying_markdown(c: dict) -> str:
    lines = ["", f"copying against {c['training_pieces']} training pieces (real pieces cut to {c['real_bars']} bars):",
             "| set | pieces | bars found in training | longest copied run: mean | max | "
             f"pieces with a run >= {MAX_COPIED_RUN} |", "|---|---|---|---|---|---|"]
    for label in ("generated", "real"):
        s = c[label]
        if s["pieces"]:
            lines.append(f"| {label} | {s['pieces']} | {s['copied_bars']:.3f} | {s['mean_run']:.2f} | {s['max_run']:.0f} | "
                         f"{s['copy_share']:.0%} |")
    return "\n".join(lines) + "\n"


@dataclass
class PieceSet:
    """Per-piece metric values (name -> array over pieces), pitch-class histograms, and unreadable files."""

    values: dict[str, np.ndarray]
    pitch_class_hist: np.ndarray  # (pieces, 12), each row sums to 1 (all zero for a piece without pitched notes)
    unreadable: list[str]

    def __len__(self) -> int:
        return len(self.pitch_class_hist)


def measure_set(sources) -> PieceSet:
    """Metrics of every piece in `sources` (paths, MIDI bytes or symusic Scores); unreadable files are listed."""
    rows, hists, unreadable = [], [], []
    for src in sources:
        try:
            score = load_score(src)
        except MidistralError as e:
            unreadable.append(str(e))
            continue
        notes = collect_notes(score)
        rows.append(piece_metrics(notes))
        pc = np.bincount(notes.pitch[~notes.is_drum] % 12, minlength=12).astype(float)
        hists.append(pc / max(pc.sum(), 1.0))
    values = {name: np.array([r[name] for r in rows], float) for name in METRICS}
    return PieceSet(values, np.array(hists, float).reshape(-1, 12), unreadable)


def _bandwidth(x: np.ndarray, floor: float) -> float:
    """Scott's rule (scipy's gaussian_kde default in 1-D), never below `floor`; 0 for a constant set."""
    sd = x.std(ddof=1) if len(x) > 1 else 0.0
    return max(sd * len(x) ** (-1 / 5), floor) if sd > 0 else 0.0


def _bandwidths(real: np.ndarray, gen: np.ndarray, spread: float) -> list[float]:
    """Each set's kernel width. A constant set has no spread of its own to estimate one from, so it borrows
    the other set's: then OA is about the share of the other set near the constant (17 of 20 generated
    pieces equal to the real constant, 3 far from it: OA ~0.85) instead of the ratio of an arbitrary narrow
    spike to the other set's kernel. Two constant sets both get MIN_BANDWIDTH_SHARE x the pooled sd."""
    floor = MIN_BANDWIDTH_SHARE * spread
    bws = [_bandwidth(real, floor), _bandwidth(gen, floor)]
    if not bws[0] and not bws[1]:
        return [floor, floor]
    return [bws[0] or bws[1], bws[1] or bws[0]]


def _densities(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Both Gaussian KDEs on one grid, or None when both sets are the same constant."""
    pooled = np.concatenate([real, gen])
    spread = pooled.std()
    if spread == 0:
        return None
    bws = _bandwidths(real, gen, spread)
    grid = np.linspace(pooled.min() - 4 * max(bws), pooled.max() + 4 * max(bws), GRID_POINTS)
    dens = []
    for x, bw in zip((real, gen), bws):
        total = np.zeros(len(grid))
        for part in np.array_split(x, max(1, len(x) // KDE_BLOCK)):  # a grid x block at a time: the pairwise
            z = (grid[:, None] - part[None, :]) / bw                   # distances of 1,272 pieces are 808,356
            total += np.exp(-0.5 * z * z).sum(axis=1)                  # points (12 GB in one array)
        dens.append(total / (len(x) * bw * np.sqrt(2 * np.pi)))
    return grid, dens[0], dens[1]


def overlap_area(real, gen) -> float:
    """Overlapped area of the two sets' Gaussian KDEs (1 = same distribution, ~0 = disjoint)."""
    d = _densities(np.asarray(real, float), np.asarray(gen, float))
    if d is None:
        return 1.0
    grid, p, q = d
    return float(min(1.0, np.trapezoid(np.minimum(p, q), grid)))


def kl_divergence(real, gen) -> float:
    """KL(real || generated) of the two sets' Gaussian KDEs, in nats (0 = same distribution)."""
    d = _densities(np.asarray(real, float), np.asarray(gen, float))
    if d is None:
        return 0.0
    grid, p, q = d
    p, q = np.maximum(p, DENSITY_FLOOR), np.maximum(q, DENSITY_FLOOR)
    return float(max(0.0, np.trapezoid(p * np.log(p / q), grid)))


def _pairwise(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between the rows of a and b (b None: the distinct pairs within a)."""
    other = a if b is None else b
    dist = np.sqrt(((a[:, None, :] - other[None, :, :]) ** 2).sum(-1))
    return dist[np.triu_indices(len(a), 1)] if b is None else dist.ravel()


def compare(real: PieceSet, gen: PieceSet, distances: bool = True) -> dict:
    """Per metric: real/generated mean and sd, OA and KL; plus the intra/inter-set pitch-class distances
    (`distances=False` leaves them out: with 1,272 real pieces their KDE is most of the time)."""
    rows = []
    for name in METRICS:
        r, g = real.values[name], gen.values[name]
        r, g = r[~np.isnan(r)], g[~np.isnan(g)]
        if len(r) < 2 or len(g) < 2:  # undefined here (drum metrics without drums), or too few to smooth
            continue
        rows.append({"metric": name, "real_mean": float(r.mean()), "real_sd": float(r.std(ddof=1)),
                     "gen_mean": float(g.mean()), "gen_sd": float(g.std(ddof=1)),
                     "oa": overlap_area(r, g), "kl": kl_divergence(r, g)})
    summary = [row["oa"] for row in rows if row["metric"] in SUMMARY_METRICS]
    result = {"rows": rows, "n_real": len(real), "n_gen": len(gen),
              "mean_oa": float(np.mean(summary)) if summary else float("nan"),
              "min_oa": float(np.min(summary)) if summary else float("nan")}
    if not distances:
        return result
    intra_real, inter = _pairwise(real.pitch_class_hist), _pairwise(real.pitch_class_hist, gen.pitch_class_hist)
    pcd = {"intra_real_mean": float(intra_real.mean()) if len(intra_real) else float("nan"),
           "intra_gen_mean": float(_pairwise(gen.pitch_class_hist).mean()) if len(gen) > 1 else float("nan"),
           "inter_mean": float(inter.mean()),
           "oa": overlap_area(intra_real, inter) if len(intra_real) > 1 else float("nan"),
           "kl": kl_divergence(intra_real, inter) if len(intra_real) > 1 else float("nan")}
    return result | {"pitch_class_distance": pcd}


def markdown(result: dict, gen_label: str, ref_label: str) -> str:
    """The comparison as a markdown table with a summary line."""
    lines = [f"generated: {gen_label} ({result['n_gen']} pieces); reference: {ref_label} ({result['n_real']} pieces)", "",
             "| metric | real mean | real sd | generated mean | generated sd | OA | KL |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = "" if r["metric"] in SUMMARY_METRICS else " *"
        lines.append(f"| {r['metric']}{mark} | {r['real_mean']:.3f} | {r['real_sd']:.3f} | {r['gen_mean']:.3f} | "
                     f"{r['gen_sd']:.3f} | {r['oa']:.2f} | {r['kl']:.3f} |")
    pcd = result["pitch_class_distance"]
    lines += ["", f"mean OA {result['mean_oa']:.2f} (min {result['min_oa']:.2f}) over the {len(SUMMARY_METRICS)} "
              "metrics without *",
              f"pitch-class histogram distances (Yang & Lerch intra/inter-set): real-real {pcd['intra_real_mean']:.3f}, "
              f"generated-generated {pcd['intra_gen_mean']:.3f}, real-generated {pcd['inter_mean']:.3f}; "
              f"OA(real-real, real-generated) {pcd['oa']:.2f}, KL {pcd['kl']:.3f}"]
    return "\n".join(lines) + "\n"


def distributions_png(real: PieceSet, gen: PieceSet, result: dict) -> bytes:
    """One panel per compared metric: the real and generated KDEs side by side, titled with the OA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cols = 4
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(4 * cols, 2.6 * -(-len(rows) // cols)), squeeze=False)
    for ax, row in zip(axes.ravel(), rows):
        r, g = real.values[row["metric"]], gen.values[row["metric"]]
        r, g = r[~np.isnan(r)], g[~np.isnan(g)]
        d = _densities(r, g)
        if d is None:
            ax.axvline(r[0], color="C0", label="real")
            ax.axvline(g[0], color="C1", ls="--", label="generated")
            ax.set_xlim(r[0] - 1, r[0] + 1)
        else:
            ax.plot(d[0], d[1], color="C0", label="real")
            ax.plot(d[0], d[2], color="C1", label="generated")
            ax.fill_between(d[0], np.minimum(d[1], d[2]), color="C2", alpha=0.3)
        ax.set_title(f"{row['metric']}  OA {row['oa']:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(rows):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m midistral.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("generated", help="a folder of generated .mid files (searched recursively)")
    ap.add_argument("--reference", required=True, help="a folder of real MIDI files, or a run folder (its test split)")
    ap.add_argument("--train", help="a run folder (its training split) or a folder of MIDI files for the copying "
                    "check (default: the --reference run's training split)")
    ap.add_argument("--style", help="with a run folder as --reference: only its test pieces of this style")
    ap.add_argument("--bars", type=int, default=0, help="compare with the real pieces' first N bars (samples of N bars)")
    ap.add_argument("--out", help="where report.md, metrics.json and distributions.png go (default GENERATED/evaluation)")
    args = ap.parse_args(argv)
    try:
        gen_files = midi_files(args.generated, "generated folder")
        ref_files, ref_label = reference_files(args.reference, args.style)
        if args.bars < 0:
            raise MidistralError(f"--bars {args.bars}: expected a number of bars >= 1")
        train = args.train or (args.reference if Path(args.reference).is_dir() and _manifest_of(Path(args.reference)) else None)
        if args.train and not Path(args.train).expanduser().is_dir():
            raise MidistralError(f"--train {args.train!r}: no such folder")
        t0 = time.perf_counter()
        gen = measure_set(gen_files)
        real = measure_set([opening(f, args.bars) for f in ref_files] if args.bars else ref_files)
        if args.bars:
            ref_label += f", first {args.bars} bars"
        seconds = time.perf_counter() - t0
        for label, s in (("generated", gen), ("reference", real)):
            if len(s) < 2:
                raise MidistralError(f"{label}: {len(s)} readable MIDI file(s), need at least 2"
                                     + (f" ({s.unreadable[0]})" if s.unreadable else ""))
    except MidistralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = compare(real, gen)
    text = markdown(result, args.generated, ref_label)
    index = copy_index_for(train) if train else None
    if index is not None and index.n_pieces:
        result["copying"] = compare_copying(index, gen_files, ref_files)
        text += copying_markdown(result["copying"])
    else:
        text += "\nno copying check: no training split (give --train, or a run folder as --reference)\n"
    out = Path(args.out) if args.out else Path(args.generated) / "evaluation"
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "metrics.json", {**result, "unreadable": gen.unreadable + real.unreadable})
    atomic_write_bytes(out / "distributions.png", distributions_png(real, gen, result))
    print(text, end="")
    for msg in gen.unreadable + real.unreadable:
        print(f"skipped: {msg}")
    print(f"{len(gen) + len(real)} pieces measured in {seconds:.2f} s ({(len(gen) + len(real)) / seconds:.0f} pieces/s); "
          f"wrote {out}/report.md, metrics.json, distributions.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
